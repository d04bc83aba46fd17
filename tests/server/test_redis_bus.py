"""The Redis event bus: several API processes on one Redis and one Postgres behave as one server.

Two `Runtime`s in this test process stand for two API replicas: they share the database, the Redis and a
standalone `wamd-sim`, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import (
    ADMIN_EMAIL,
    EVENT_TIMEOUT,
    Server,
    ServerFactory,
    StandaloneSim,
    server_env,
    truncate_all,
)
from wamd_server.config import load_config
from wamd_server.domain.ports import BusEvent
from wamd_server.infra.bus.redis import RedisEventBus
from wamd_server.runtime import Runtime

PeerFactory = Callable[[Server], Awaitable[Server]]


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    """Start another API process on the same database, Redis and simulator as a server from `make_server`.

    `make_server` cannot start the second one: each server gets its own random admin password, and the
    admin row already exists in the shared database, so the second login would fail.
    """
    started: list[Server] = []

    async def start(first: Server) -> Server:
        cfg = first.runtime.config
        extra = {
            "REDIS_URL": cfg.redis_url or "",
            "WAMD_SIM_URL": cfg.sim_url or "",
            "WAMD_REDIS_PREFIX": cfg.redis_prefix,
        }
        env = server_env(cfg.database_url, tmp_path / f"peer-{uuid.uuid4().hex[:6]}", first.admin_password, **extra)
        runtime = Runtime(load_config(env))
        await runtime.start()
        server = Server(runtime, runtime.url, aiohttp.ClientSession(), first.admin_password, sim_url=first.sim_url)
        started.append(server)
        server.admin_token = await server.login(ADMIN_EMAIL, first.admin_password)
        return server

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def pair_of_servers(
    make_server: ServerFactory, peer: PeerFactory, pg_url: str, redis_url: str, standalone_sim: StandaloneSim
) -> tuple[Server, Server]:
    truncate_all(pg_url)
    # A channel prefix of their own: other test runs may use the same Redis at the same time.
    prefix = unique_prefix()
    first = await make_server(pg_url, redis_url=redis_url, sim_url=standalone_sim.url, WAMD_REDIS_PREFIX=prefix)
    assert first.runtime.config.redis_prefix == prefix
    second = await peer(first)
    return first, second


async def test_both_report_the_redis_bus(pair_of_servers: tuple[Server, Server]) -> None:
    for server in pair_of_servers:
        health = await server.ok("GET", "/api/health")
        assert (health["status"], health["db"], health["bus"]) == ("ok", "ok", "redis")


async def test_an_event_of_server_a_reaches_clients_of_both(pair_of_servers: tuple[Server, Server]) -> None:
    a, b = pair_of_servers
    on_a, on_b = await a.ws(), await b.ws()
    device = await a.create_device("Shared")

    await a.ok("POST", f"/api/devices/{device['id']}/pair", json={"method": "qr"})
    qr = await on_b.wait_event("device.qr", device["id"])
    assert qr["code"] == (await on_a.wait_event("device.qr", device["id"]))["code"]
    await a.sim("POST", "/scan", {"qr": qr["code"], "phone": "60123000301"})
    for client in (on_b, on_a):
        paired = await client.wait_event("device.paired", device["id"])
        assert paired["phone"] == "60123000301"
        await client.wait_event("device.status", device["id"], lambda e: e["status"] == "online")
    assert (await b.ok("GET", f"/api/devices/{device['id']}"))["status"] == "online"

    await a.sim("POST", "/send", {"from_phone": "60199000002", "to_phone": "60123000301", "text": "via redis"})
    for client in (on_b, on_a):
        message = await client.wait_event("message.new", device["id"])
        assert message["message"]["text"] == "via redis"


async def test_grants_and_deactivation_made_on_a_apply_to_sockets_on_b(pair_of_servers: tuple[Server, Server]) -> None:
    a, b = pair_of_servers
    staff_id, _ = await a.create_user("remote-staff@example.com")
    staff_on_b = await b.ws(await b.login("remote-staff@example.com", "staff-pass-123"))
    admin_on_a = await a.ws()
    device = await a.create_device("Granted later")
    await a.pair_by_qr(device["id"], "60123000302", admin_on_a)

    await a.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [device["id"]]})
    await a.sim("POST", "/send", {"from_phone": "60199000003", "to_phone": "60123000302", "text": "for staff"})
    message = await staff_on_b.wait_event("message.new", device["id"])
    assert message["message"]["text"] == "for staff"

    await a.ok("PATCH", f"/api/users/{staff_id}", json={"is_active": False})
    await asyncio.wait_for(staff_on_b.closed.wait(), EVENT_TIMEOUT)
    assert staff_on_b.ws.close_code == 4001


# --- RedisEventBus on its own -------------------------------------------------------------------------------


@pytest.fixture
async def buses(redis_url: str) -> AsyncIterator[Callable[[str], Awaitable[RedisEventBus]]]:
    """Start buses, each with a Redis client of its own (as in separate processes)."""
    started: list[tuple[RedisEventBus, Redis]] = []

    async def start(prefix: str) -> RedisEventBus:
        client = Redis.from_url(redis_url)
        bus = RedisEventBus(client, channel_prefix=prefix)
        started.append((bus, client))
        await bus.start()
        return bus

    yield start
    for bus, client in started:
        await bus.close()
        await client.aclose()


def unique_prefix() -> str:
    return f"wamd-test-{uuid.uuid4().hex}"


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[BusEvent] = asyncio.Queue()

    async def __call__(self, event: BusEvent) -> None:
        await self.queue.put(event)

    async def next(self) -> BusEvent:
        return await asyncio.wait_for(self.queue.get(), EVENT_TIMEOUT)


async def test_publish_reaches_every_bus_on_the_channel_including_the_publisher(
    buses: Callable[[str], Awaitable[RedisEventBus]],
) -> None:
    prefix = unique_prefix()
    one, two = await buses(prefix), await buses(prefix)
    assert (one.kind, await one.ping()) == ("redis", True)
    at_one, at_two = Inbox(), Inbox()
    one.subscribe(at_one)
    two.subscribe(at_two)

    event = BusEvent(
        "message.new",
        {"device_id": "d", "message": {"text": "héllo", "n": 3, "ok": True, "none": None}},
        device_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
    )
    await one.publish(event)
    assert await at_two.next() == event
    assert await at_one.next() == event

    bare = BusEvent("campaign.progress", {"done": 1})
    await two.publish(bare)
    assert await at_one.next() == bare
    assert await at_two.next() == bare


async def test_a_failing_handler_does_not_stop_the_others(
    buses: Callable[[str], Awaitable[RedisEventBus]], caplog: pytest.LogCaptureFixture
) -> None:
    bus = await buses(unique_prefix())
    calls: list[str] = []

    async def broken(event: BusEvent) -> None:
        calls.append("broken")
        raise RuntimeError("handler bug")

    inbox = Inbox()
    bus.subscribe(broken)
    bus.subscribe(inbox)
    for n in range(3):
        await bus.publish(BusEvent("chat.updated", {"n": n}))
    assert [(await inbox.next()).data["n"] for _ in range(3)] == [0, 1, 2]
    assert calls == ["broken"] * 3
    assert any("event handler failed" in r.getMessage() for r in caplog.records)


async def test_unsubscribe_and_malformed_messages(
    buses: Callable[[str], Awaitable[RedisEventBus]], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await buses(unique_prefix())
    kept, removed = Inbox(), Inbox()
    bus.subscribe(kept)
    remove = bus.subscribe(removed)
    remove()
    remove()  # twice is harmless

    raw = Redis.from_url(redis_url)
    try:
        await raw.publish(bus.channel, "this is not json")
        await raw.publish(bus.channel, '{"no": "type"}')
    finally:
        await raw.aclose()
    await bus.publish(BusEvent("device.status", {"status": "online"}))
    assert (await kept.next()).data == {"status": "online"}  # the listener survived the garbage
    assert removed.queue.empty()
    assert any("malformed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_buses_with_other_prefixes_do_not_hear_each_other(
    buses: Callable[[str], Awaitable[RedisEventBus]],
) -> None:
    mine, theirs = await buses(unique_prefix()), await buses(unique_prefix())
    assert mine.channel != theirs.channel
    heard = Inbox()
    theirs.subscribe(heard)
    await mine.publish(BusEvent("device.status", {"whose": "mine"}))
    await theirs.publish(BusEvent("device.status", {"whose": "theirs"}))
    # Redis delivers to a subscriber in publish order: had `theirs` heard `mine`, it would come first.
    assert (await heard.next()).data == {"whose": "theirs"}
    assert heard.queue.empty()
