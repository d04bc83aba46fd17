"""Device lifecycle through the API and WebSocket, on the in-process simulated network."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import select

from tests.conftest import Server, ServerFactory
from wamd_server.domain.events import Connected
from wamd_server.infra.db.tables import messages, transport_sessions
from wamd_server.services.device_pool import ConnectPacer
from wamd_server.sim.config import SimConfig
from wamd_server.sim.network import SimNetwork

PHONE = "60123000011"


async def paired_device(server: Server, phone: str = PHONE) -> tuple[str, str]:
    ws = await server.ws()
    device = await server.create_device("Sales")
    paired = await server.pair_by_qr(device["id"], phone, ws)
    return device["id"], paired["jid"]


async def test_pair_by_qr_then_logout_keeps_phone_and_jid(server: Server) -> None:
    ws = await server.ws()
    device = await server.create_device("Sales")
    assert device["status"] == "unpaired"

    paired = await server.pair_by_qr(device["id"], PHONE, ws)
    assert paired["phone"] == PHONE
    assert paired["jid"] == f"{PHONE}:1@s.whatsapp.net"

    after = await server.ok("GET", f"/api/devices/{device['id']}")
    assert (after["status"], after["phone"], after["jid"]) == ("online", PHONE, paired["jid"])

    await server.ok("POST", f"/api/devices/{device['id']}/logout")
    event = await ws.wait_event("device.logged_out", device["id"])
    assert event["reason"] == "user"
    after = await server.ok("GET", f"/api/devices/{device['id']}")
    assert (after["status"], after["phone"], after["jid"]) == ("logged_out", PHONE, paired["jid"])
    assert after["status_reason"] == "logged out by user"
    assert await server.ok("POST", f"/api/devices/{device['id']}/refresh") == {"status": "qr_required"}
    # The phone no longer lists the device under "Linked devices".
    stats = await server.sim("GET", "/stats")
    assert paired["jid"] not in stats["online"]


async def test_qr_codes_rotate_and_are_served_until_pairing_times_out(
    make_server: ServerFactory, database_url: str
) -> None:
    network = SimNetwork(SimConfig(qr_first_s=0.4, qr_next_s=0.3, qr_codes=3))
    server = await make_server(database_url, sim_network=network)
    ws = await server.ws()
    device = await server.create_device()
    qr_path = f"/api/devices/{device['id']}/qr"
    before = await server.call("GET", qr_path, server.admin_token)
    assert before.status == 409 and before.body["error"]["code"] == "conflict"

    await server.ok("POST", f"/api/devices/{device['id']}/pair", json={"method": "qr"})
    codes = [(await ws.wait_event("device.qr", device["id"]))["code"] for _ in range(3)]
    assert len(set(codes)) == 3
    assert all(code.startswith("2@") for code in codes)
    timed_out = await ws.wait_event("device.status", device["id"], lambda e: e["status"] == "unpaired")
    assert "expired" in timed_out["reason"]
    # An expired code no longer links anything.
    stale = await server.call("POST", "/api/sim/scan", server.admin_token, json={"qr": codes[0], "phone": PHONE})
    assert 400 <= stale.status < 500
    assert (await server.call("GET", qr_path, server.admin_token)).status == 409


async def test_pair_by_phone_code(server: Server) -> None:
    ws = await server.ws()
    device = await server.create_device()
    answer = await server.ok(
        "POST", f"/api/devices/{device['id']}/pair", json={"method": "code", "phone": "012-300 0012"}
    )
    assert answer["status"] == "pairing"
    assert len(answer["pair_code"].replace("-", "")) == 8
    await server.sim("POST", "/pair-code", {"code": answer["pair_code"], "phone": "60123000012"})
    paired = await ws.wait_event("device.paired", device["id"])
    assert paired["phone"] == "60123000012"
    await ws.wait_event("device.status", device["id"], lambda e: e["status"] == "online")


async def test_pairing_a_linked_device_is_refused(server: Server) -> None:
    device_id, _ = await paired_device(server)
    reply = await server.call("POST", f"/api/devices/{device_id}/pair", server.admin_token, json={"method": "qr"})
    assert reply.status == 409
    assert reply.body["error"]["code"] == "device_busy"
    assert (await server.ok("GET", f"/api/devices/{device_id}"))["status"] == "online"


async def test_unlink_from_phone_logs_the_device_out(server: Server) -> None:
    device_id, jid = await paired_device(server)
    ws = await server.ws()
    await server.sim("POST", "/unlink", {"phone": PHONE})
    event = await ws.wait_event("device.logged_out", device_id)
    assert event["reason"] == "logged_out"
    device = await server.ok("GET", f"/api/devices/{device_id}")
    assert (device["status"], device["status_reason"], device["jid"]) == ("logged_out", "unlinked from the phone", jid)
    assert await server.ok("POST", f"/api/devices/{device_id}/refresh") == {"status": "qr_required"}


async def test_temporary_ban_then_reconnect_when_it_ends(server: Server) -> None:
    device_id, _ = await paired_device(server)
    ws = await server.ws()
    await server.sim("POST", "/faults", {"phone": PHONE, "ban_seconds": 1})
    banned = await ws.wait_event("device.status", device_id, lambda e: e["status"] == "banned")
    assert "temporarily banned" in banned["reason"]
    await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")


async def test_remote_disconnect_reconnects_by_itself(server: Server) -> None:
    device_id, jid = await paired_device(server)
    ws = await server.ws()
    await server.sim("POST", "/faults", {"phone": PHONE, "disconnect": True})
    dropped = await ws.wait_event("device.status", device_id, lambda e: e["status"] == "connecting")
    assert "reconnecting" in dropped["reason"]
    await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")
    stats = await server.sim("GET", "/stats")
    assert stats["double_connection_total"] == 0
    assert jid in stats["online"]


async def test_logout_is_not_undone_by_a_late_connect(server: Server) -> None:
    """A reconnect racing a logout must lose: a Connected reported after the logout is disconnected."""
    device_id, jid = await paired_device(server)
    await server.ok("POST", f"/api/devices/{device_id}/logout")
    pool = server.runtime.pool
    assert pool is not None
    await pool.on_event(Connected(uuid.UUID(device_id)))
    await pool.settled()
    assert (await server.ok("GET", f"/api/devices/{device_id}"))["status"] == "logged_out"
    assert jid not in (await server.sim("GET", "/stats"))["online"]


async def test_concurrent_refreshes_keep_one_session(server: Server) -> None:
    device_id, jid = await paired_device(server)
    answers = await asyncio.gather(*[server.ok("POST", f"/api/devices/{device_id}/refresh") for _ in range(10)])
    assert {a["status"] for a in answers} == {"online"}
    stats = await server.sim("GET", "/stats")
    assert stats["double_connection_total"] == 0
    assert stats["connections"][jid] == 1


async def test_delete_unlinks_and_forgets_the_session(server: Server) -> None:
    device_id, jid = await paired_device(server)
    engine = server.runtime.engine
    assert engine is not None
    async with engine.connect() as conn:
        assert (await conn.execute(select(transport_sessions.c.jid))).scalars().all() == [jid]
    await server.ok("DELETE", f"/api/devices/{device_id}")
    assert (await server.call("GET", f"/api/devices/{device_id}", server.admin_token)).status == 404
    assert jid not in (await server.sim("GET", "/stats"))["online"]
    async with engine.connect() as conn:
        assert (await conn.execute(select(transport_sessions.c.jid))).scalars().all() == []


async def test_inbound_messages_are_stored_once_and_announced(server: Server) -> None:
    device_id, _ = await paired_device(server)
    ws = await server.ws()
    network = server.runtime.sim_network
    assert network is not None
    wa_id = await network.contact_send("60198000001", PHONE, "Hi there", push_name="Aisyah")
    event = await ws.wait_event("message.new", device_id)
    assert (event["message"]["wa_id"], event["message"]["text"]) == (wa_id, "Hi there")
    assert event["message"]["push_name"] == "Aisyah"
    assert event["chat_jid"] == "60198000001@s.whatsapp.net"
    # The same message id again (a redelivery) is neither stored nor announced twice.
    await network.contact_send("60198000001", PHONE, "Hi there", wa_id=wa_id)
    second = await network.contact_send("60198000001", PHONE, "Second")
    assert (await ws.wait_event("message.new", device_id))["message"]["wa_id"] == second
    engine = server.runtime.engine
    assert engine is not None
    async with engine.connect() as conn:
        stored = (await conn.execute(select(messages.c.wa_message_id))).scalars().all()
    assert sorted(stored) == sorted([wa_id, second])


async def test_restart_reconnects_every_linked_device_without_qr(make_server: ServerFactory, database_url: str) -> None:
    network = SimNetwork(SimConfig(qr_first_s=5, qr_next_s=3, qr_codes=3))
    first = await make_server(database_url, sim_network=network, WAMD_CONNECTS_PER_SECOND="20")
    ws = await first.ws()
    jids = {}
    for n in range(5):
        device = await first.create_device(f"D{n}")
        jids[device["id"]] = (await first.pair_by_qr(device["id"], f"6012300010{n}", ws))["jid"]
    await first.close()

    second = await make_server(database_url, sim_network=network, WAMD_CONNECTS_PER_SECOND="20")
    ws = await second.ws()
    pending = {d["id"] for d in (await second.ok("GET", "/api/devices"))["items"] if d["status"] != "online"}
    while pending:
        event = await ws.wait_event("device.status", test=lambda e: e["status"] == "online")
        pending.discard(event["device_id"])
    stats = await second.sim("GET", "/stats")
    assert stats["double_connection_total"] == 0
    assert all(stats["connections"][jid] == 2 for jid in jids.values())


async def test_connect_pacer_spaces_connects_by_the_configured_rate() -> None:
    clock = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    pacer = ConnectPacer(4.0, now=lambda: clock[0], sleep=sleep)
    slots = [await pacer.wait() for _ in range(5)]
    assert slots == [100.0, 100.25, 100.5, 100.75, 101.0]
    assert slept == [0.25, 0.25, 0.25, 0.25]
