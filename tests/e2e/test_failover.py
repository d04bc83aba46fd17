"""Failover on Postgres + Redis + a standalone wamd-sim: one API process, two worker processes, 200 linked
devices; one worker is killed with SIGKILL and the other takes its devices over."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from tests.conftest import ADMIN_EMAIL, libpq_url
from tests.e2e.processes import Process, start_stack, wamd_server
from tests.e2e.test_device_acceptance import Client

DEVICES = 200
LEADS = 2000
TAKEOVER_DEADLINE_S = 30.0


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str, redis_url: str) -> AsyncIterator[tuple[Client, list[Process], str]]:
    stack = await start_stack(tmp_path, pg_url, redis_url, "failover", WAMD_CONNECTS_PER_SECOND="100")
    env, sim, sim_url, api_port = stack.env, stack.sim, stack.sim_url, stack.api_port
    api = wamd_server(env, tmp_path, "api")
    api.start()
    await api.wait_http(f"http://127.0.0.1:{api_port}/api/health")
    workers = []
    for n in range(2):
        worker = Process(
            [*wamd_server(env, tmp_path).args, "worker", "--capacity", "500"], env, tmp_path / f"worker-{n}.log"
        )
        worker.start()
        workers.append(worker)
    async with aiohttp.ClientSession() as http:
        client = Client(http, f"http://127.0.0.1:{api_port}", sim_url)
        login = {"email": ADMIN_EMAIL, "password": env["WAMD_ADMIN_PASSWORD"]}
        client.token = (await client.call("POST", "/api/auth/login", login))["token"]
        await wait_for_workers(pg_url, 2)
        yield client, workers, sim_url
    for proc in [*workers, api, sim]:
        proc.stop()


async def wait_for_workers(pg_url: str, count: int) -> None:
    dsn = libpq_url(pg_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with psycopg.connect(dsn) as conn:
            live = conn.execute("SELECT count(*) FROM workers WHERE heartbeat_at > now() - interval '10 s'")
            if live.fetchone()[0] >= count:  # type: ignore[index]
                return
        await asyncio.sleep(0.2)
    raise AssertionError("the workers did not register")


async def import_leads(client: Client, csv: str) -> None:
    form = aiohttp.FormData()
    form.add_field("file", csv.encode(), filename="leads.csv", content_type="text/csv")
    headers = {"Authorization": f"Bearer {client.token}"}
    async with client.http.post(client.url + "/api/leads/import", data=form, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["failed"] == [], body


def owners(pg_url: str) -> dict[str, str]:
    dsn = libpq_url(pg_url)
    with psycopg.connect(dsn) as conn:
        return {str(d): w for d, w in conn.execute("SELECT device_id, worker_id FROM device_leases")}


async def test_killed_worker_devices_come_back_on_the_other(
    cluster: tuple[Client, list[Process], str], pg_url: str
) -> None:
    client, workers, sim_url = cluster
    ws = await client.ws()
    ids = []
    for n in range(DEVICES):
        device_id = (await client.call("POST", "/api/devices", {"name": f"Device {n}"}))["id"]
        await client.call("POST", f"/api/devices/{device_id}/pair", {"method": "qr"})
        qr = await ws.wait_event("device.qr", device_id)
        await client.sim("/scan", {"qr": qr["code"], "phone": f"60123{n:06d}"})
        ids.append(device_id)
    online: set[str] = {
        d["id"] for d in (await client.call("GET", "/api/devices?limit=1000"))["items"] if d["status"] == "online"
    }
    while len(online) < DEVICES:
        event = await ws.wait_event("device.status", test=lambda e: e["status"] == "online", timeout=30)
        online.add(event["device_id"])

    held = owners(pg_url)
    assert set(held) == set(ids)
    by_worker: dict[str, list[str]] = {}
    for device_id, worker_id in held.items():
        by_worker.setdefault(worker_id, []).append(device_id)
    assert len(by_worker) == 2, "commands spread the devices over both workers"

    # Messages in flight when the worker dies: a campaign to one lead per device, sent without pacing.
    fast = {"min_delay_s": 0, "max_delay_s": 0, "hourly_cap": 10_000, "daily_cap": 100_000, "typing": False}
    for device_id in ids:
        await client.call("PATCH", f"/api/devices/{device_id}", fast)
    rows = ["name,phone,niche,device_id"] + [f"L{n},+6019{n:07d},failover,{ids[n % DEVICES]}" for n in range(LEADS)]
    await import_leads(client, "\n".join(rows))
    first = await client.call(
        "POST", "/api/campaigns", {"title": "Before", "message": "Hi {name}", "niche": "failover"}
    )
    while (await client.call("GET", f"/api/campaigns/{first['id']}/report"))["done_send"] < LEADS // 10:
        await asyncio.sleep(0.02)

    victim_pid = workers[0].proc.pid  # type: ignore[union-attr]
    victim = next(w for w in by_worker if f"-{victim_pid}-" in w)
    orphaned = set(by_worker[victim])
    killed_at = time.monotonic()
    workers[0].stop(signal.SIGKILL)
    # Messages queued while the dead worker's devices have no worker.
    second = await client.call(
        "POST", "/api/campaigns", {"title": "During", "message": "Again {name}", "niche": "failover"}
    )

    # Every device of the killed worker reports online again (from the survivor), without a QR.
    pending = set(orphaned)
    while pending:
        remaining = TAKEOVER_DEADLINE_S - (time.monotonic() - killed_at)
        event = await ws.wait_event(
            "device.status", test=lambda e: e["status"] == "online", timeout=max(remaining, 0.1)
        )
        pending.discard(event["device_id"])
    took = time.monotonic() - killed_at
    print(f"takeover of {len(orphaned)} devices took {took:.1f}s")

    survivor = next(w for w in by_worker if w != victim)
    assert set(owners(pg_url).values()) == {survivor}
    devices = (await client.call("GET", "/api/devices?limit=1000"))["items"]
    assert {d["status"] for d in devices} == {"online"}
    async with aiohttp.ClientSession() as http, http.get(sim_url + "/api/sim/stats") as resp:
        stats = await resp.json()
    assert stats["double_connection_total"] == 0
    assert len(stats["online"]) == DEVICES

    # Nothing queued before or during the failover is lost or sent twice.
    for campaign in (first, second):
        deadline = time.monotonic() + 120
        while (report := await client.call("GET", f"/api/campaigns/{campaign['id']}/report"))["remaining_send"]:
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.2)
        assert (report["should_send"], report["done_send"], report["failed_send"]) == (LEADS, LEADS, 0)
    async with aiohttp.ClientSession() as http, http.get(sim_url + "/api/sim/inbox-counts") as resp:
        counts = (await resp.json())["counts"]
    received = {phone: counts.get(phone, 0) for phone in (f"6019{n:07d}" for n in range(LEADS))}
    assert set(received.values()) == {2}, {p: n for p, n in received.items() if n != 2}
    await ws.close()
