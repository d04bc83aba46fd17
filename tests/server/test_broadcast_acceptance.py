"""A broadcast to 2,000 leads over 20 simulated devices (pacing off): every lead's phone holds exactly one
message, from its owner device, with the template rendered, and the report totals match."""

from __future__ import annotations

import re

import aiohttp

from tests.conftest import Server, eventually
from tests.server.test_campaigns import FAST

DEVICES = 20
LEADS = 2000
TEMPLATE = "{Hi|Hello} {name}! Your code is {code}. See https://example.com/p?id=42&x=1"
RENDERED = re.compile(r"^(Hi|Hello) Lead (\d+)! Your code is C(\d+)\. See https://example\.com/p\?id=42&x=1$")


async def test_broadcast_2000_leads_over_20_devices(server: Server) -> None:
    ws = await server.ws()
    devices = []
    for n in range(DEVICES):
        device = await server.create_device(f"Sender {n}")
        await server.pair_by_qr(device["id"], f"6012320{n:04d}", ws)
        devices.append(await server.ok("PATCH", f"/api/devices/{device['id']}", json=FAST))
    rows = ["name,phone,niche,device_id,code"]
    rows += [f"Lead {n},+6019{n:07d},bulk,{devices[n % DEVICES]['id']},C{n}" for n in range(LEADS)]
    form = aiohttp.FormData()
    form.add_field("file", "\n".join(rows).encode(), filename="leads.csv", content_type="text/csv")
    imported = await server.ok("POST", "/api/leads/import", data=form)
    assert (imported["created"], imported["failed"]) == (LEADS, [])

    campaign = await server.ok("POST", "/api/campaigns", json={"title": "Bulk", "message": TEMPLATE, "niche": "bulk"})

    async def finished() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return report["remaining_send"] == 0 and report["should_send"] == LEADS

    await eventually(finished, timeout=240)

    network = server.runtime.sim_network
    assert network is not None
    for n in range(LEADS):
        inbox = network.inbox(f"6019{n:07d}")
        assert len(inbox) == 1, (n, inbox)
        owner = devices[n % DEVICES]
        assert inbox[0]["from_phone"] == owner["phone"]
        match = RENDERED.match(inbox[0]["text"])
        assert match and match[2] == str(n) and match[3] == str(n), inbox[0]["text"]

    report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
    assert (report["should_send"], report["done_send"], report["failed_send"], report["remaining_send"]) == (
        LEADS,
        LEADS,
        0,
        0,
    )
    assert sum(d["done_send"] for d in report["devices"]) == LEADS
    assert {d["done_send"] for d in report["devices"]} == {LEADS // DEVICES}
    summary = await server.ok("GET", "/api/campaigns/summary")
    assert summary["broadcast_stats"]["total_done_send"] == LEADS
    sent = await server.ok("GET", f"/api/campaigns/{campaign['id']}/recipients?status=sent&limit=1000")
    assert len(sent["items"]) == 1000 and sent["next_cursor"]
