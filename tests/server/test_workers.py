"""Device workers: leases, hand-over between workers, fencing, and the health watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
import uuid

import psycopg

from tests.conftest import Server, ServerFactory, StandaloneSim, eventually, libpq_url, truncate_all
from wamd_server.domain import errors
from wamd_server.infra.bus.rpc import rebuild_error
from wamd_server.services.watchdog import WatchdogSettings

PHONE = "60123000051"
FAST_WATCHDOG = {"WAMD_WATCHDOG_INTERVAL_S": "0.3", "WAMD_PROBE_TIMEOUT_S": "0.3"}


async def pair(server: Server, name: str, phone: str) -> str:
    ws = await server.ws()
    device = await server.create_device(name)
    await server.pair_by_qr(device["id"], phone, ws)
    await ws.close()
    server.sockets.remove(ws)
    return str(device["id"])


async def test_watchdog_reconnects_a_device_whose_link_stops_answering(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url, **FAST_WATCHDOG)
    device_id = await pair(server, "Sales", PHONE)
    ws = await server.ws()
    await server.sim("POST", "/faults", {"phone": PHONE, "unresponsive": True})
    suspect = await ws.wait_event("device.status", device_id, lambda e: e["status"] == "connecting")
    assert "not answering" in suspect["reason"]
    await server.sim("POST", "/faults", {"phone": PHONE, "unresponsive": False})
    await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online", timeout=20)
    assert (await server.sim("GET", "/stats"))["double_connection_total"] == 0


async def test_watchdog_leaves_logged_out_and_banned_devices_alone(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url)
    banned = await pair(server, "Banned", "60123000052")
    logged_out = await pair(server, "Out", "60123000053")
    ws = await server.ws()
    await server.sim("POST", "/faults", {"phone": "60123000052", "ban_seconds": 600})
    await ws.wait_event("device.status", banned, lambda e: e["status"] == "banned")
    await server.ok("POST", f"/api/devices/{logged_out}/logout")
    worker = server.runtime.worker
    assert worker is not None
    assert await worker.watchdog.check_once() == []
    devices = {d["id"]: d["status"] for d in (await server.ok("GET", "/api/devices"))["items"]}
    assert devices == {banned: "banned", logged_out: "logged_out"}


async def test_watchdog_probes_every_device_with_few_probes_in_flight(server: Server) -> None:
    phones = [f"6012300006{n}" for n in range(5)]
    devices = {phone: await pair(server, f"Sales {phone[-1]}", phone) for phone in phones}
    worker = server.runtime.worker
    assert worker is not None
    worker.watchdog.settings = WatchdogSettings(probe_timeout_s=0.3, failures_to_act=2, concurrency=2)
    transport = worker.watchdog.pool.transport
    probe = transport.probe
    probed: list[uuid.UUID] = []
    in_flight = [0, 0]  # now, most

    async def counted(device_id: uuid.UUID, timeout_s: float) -> bool:
        probed.append(device_id)
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            return await probe(device_id, timeout_s)
        finally:
            in_flight[0] -= 1

    transport.probe = counted  # type: ignore[method-assign]
    await server.sim("POST", "/faults", {"phone": phones[3], "unresponsive": True})
    try:
        assert await worker.watchdog.check_once() == []  # one failed probe is not enough
        assert sorted(probed) == sorted(uuid.UUID(d) for d in devices.values()) and in_flight[1] == 2
        assert await worker.watchdog.check_once() == [uuid.UUID(devices[phones[3]])]
    finally:
        transport.probe = probe  # type: ignore[method-assign]
        await server.sim("POST", "/faults", {"phone": phones[3], "unresponsive": False})


async def test_stopping_a_worker_hands_its_devices_to_another(
    make_server: ServerFactory, pg_url: str, redis_url: str, standalone_sim: StandaloneSim
) -> None:
    truncate_all(pg_url)
    shared = {
        "sim_url": standalone_sim.url,
        "redis_url": redis_url,
        "WAMD_REDIS_PREFIX": f"t-{secrets.token_hex(3)}",
        "WAMD_LEASE_TTL_S": "2",
    }
    first = await make_server(pg_url, **shared)
    ids = [await pair(first, f"D{n}", f"6012300006{n}") for n in range(4)]
    second = await make_server(pg_url, **shared)
    await first.runtime.stop()  # graceful: its leases are handed back at once
    assert second.runtime.worker is not None
    worker = second.runtime.worker

    async def all_online_on_second() -> bool:
        statuses = {d["status"] for d in (await second.ok("GET", "/api/devices"))["items"]}
        return worker.held == {uuid.UUID(d) for d in ids} and statuses == {"online"}

    await eventually(all_online_on_second, timeout=20)
    stats = await second.sim("GET", "/stats")
    assert stats["double_connection_total"] == 0
    # Commands now reach the devices through the new owner.
    assert await second.ok("POST", f"/api/devices/{ids[0]}/refresh") == {"status": "online"}


async def test_a_new_worker_gets_its_fair_share(
    make_server: ServerFactory, pg_url: str, redis_url: str, standalone_sim: StandaloneSim
) -> None:
    truncate_all(pg_url)
    shared = {
        "sim_url": standalone_sim.url,
        "redis_url": redis_url,
        "WAMD_REDIS_PREFIX": f"t-{secrets.token_hex(3)}",
        "WAMD_LEASE_TTL_S": "1",
    }
    first = await make_server(pg_url, **shared)
    for n in range(8):
        await pair(first, f"D{n}", f"6012300007{n}")
    second = await make_server(pg_url, **shared)
    assert first.runtime.worker is not None and second.runtime.worker is not None
    ws = await second.ws()
    while len(second.runtime.worker.held) < 3:
        await ws.wait_event("device.status", test=lambda e: e["status"] == "online", timeout=20)
    assert len(first.runtime.worker.held) + len(second.runtime.worker.held) == 8
    assert not first.runtime.worker.held & second.runtime.worker.held
    assert (await second.sim("GET", "/stats"))["double_connection_total"] == 0


async def test_a_worker_that_cannot_renew_its_leases_stops_its_sessions(
    make_server: ServerFactory, pg_url: str, standalone_sim: StandaloneSim
) -> None:
    """Fencing: before its leases could expire, a cut-off worker disconnects, so no other can double-connect."""
    truncate_all(pg_url)
    server = await make_server(pg_url, sim_url=standalone_sim.url, WAMD_LEASE_TTL_S="2")
    device_id = await pair(server, "Sales", PHONE)
    jid = f"{PHONE}:1@s.whatsapp.net"
    assert jid in standalone_sim.network.stats()["online"]
    name = pg_url.rsplit("/", 1)[1]
    admin = libpq_url(pg_url).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    try:
        # The worker's own lease loop notices; the lease would expire 2 s after the last renewal.
        deadline = time.monotonic() + 10
        while jid in standalone_sim.network.stats()["online"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert jid not in standalone_sim.network.stats()["online"]
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    # Once the database answers again, the worker runs its device again.
    deadline = time.monotonic() + 20
    while jid not in standalone_sim.network.stats()["online"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert jid in standalone_sim.network.stats()["online"]
    assert (await server.ok("GET", f"/api/devices/{device_id}"))["status"] == "online"


def test_worker_errors_keep_their_code_across_processes() -> None:
    busy = rebuild_error({"code": "device_busy", "message": "linked"})
    assert isinstance(busy, errors.DeviceBusy) and busy.message == "linked"
    missing = rebuild_error({"code": "qr_required", "message": "pair again", "retryable": False})
    assert isinstance(missing, errors.SessionMissing) and not missing.retryable
    odd = rebuild_error({"code": "something_new", "message": "?"})
    assert type(odd) is errors.DomainError and odd.code == "something_new"


async def test_a_server_that_cannot_mark_its_devices_offline_still_closes_their_sessions(
    make_server: ServerFactory, database_url: str, standalone_sim: StandaloneSim
) -> None:
    # A database error at the stop (here a trigger refuses the "server stopped" status) ended the stop there: the
    # WhatsApp sessions stayed open and nothing after it was shut down.
    server = await make_server(database_url, sim_url=standalone_sim.url)
    await pair(server, "Phone", PHONE)
    assert len((await server.sim("GET", "/stats"))["online"]) == 1
    try:
        # In a thread: the server goes on using the database meanwhile (its heartbeat may hold the write lock).
        await asyncio.to_thread(refuse_stop, database_url, True)
        await server.runtime.stop()
        assert (await server.sim("GET", "/stats"))["online"] == []
        assert server.runtime.engine is None  # the rest of the stop ran too
        assert stored_statuses(database_url) == ["online"]  # the refusal did happen
    finally:
        refuse_stop(database_url, False)


def refuse_stop(database_url: str, refuse: bool) -> None:
    """Make the database refuse (or accept again) marking devices offline because the server stops."""
    if database_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(database_url.split("///", 1)[1], timeout=30)) as conn, conn:
            if refuse:
                conn.execute(
                    "CREATE TRIGGER refuse_stop BEFORE UPDATE ON devices WHEN NEW.status_reason = 'server stopped' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            else:
                conn.execute("DROP TRIGGER IF EXISTS refuse_stop")
        return
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        if refuse:
            conn.execute(
                "CREATE OR REPLACE FUNCTION refuse_stop() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
            )
            conn.execute(
                "CREATE TRIGGER refuse_stop BEFORE UPDATE ON devices FOR EACH ROW "
                "WHEN (NEW.status_reason = 'server stopped') EXECUTE FUNCTION refuse_stop()"
            )
        else:
            conn.execute("DROP FUNCTION IF EXISTS refuse_stop() CASCADE")


def stored_statuses(database_url: str) -> list[str]:
    if database_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(database_url.split("///", 1)[1])) as conn:
            return [row[0] for row in conn.execute("SELECT status FROM devices")]
    with psycopg.connect(libpq_url(database_url)) as conn:
        return [row[0] for row in conn.execute("SELECT status FROM devices")]
