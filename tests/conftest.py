"""Shared fixtures: a fresh Postgres database per test run, Redis, the simulator, real servers and clients.

Postgres and Redis must be running (`.ci/run` starts them). Their addresses can be changed with
WAMD_TEST_PG (an admin URL, database `postgres`) and WAMD_TEST_REDIS.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import redis as redis_sync
from aiohttp import web

from wamd_server.config import load_config
from wamd_server.runtime import Runtime
from wamd_server.sim.config import SimConfig
from wamd_server.sim.network import SimNetwork
from wamd_server.sim.server import create_sim_app

PG_ADMIN = os.environ.get("WAMD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WAMD_TEST_REDIS", "redis://127.0.0.1:6379/0")
ADMIN_EMAIL = "admin@example.com"
EVENT_TIMEOUT = 10.0

# Fast QR rotation for tests; pairing sessions end after qr_codes codes.
TEST_SIM = SimConfig(qr_first_s=3.0, qr_next_s=2.0, qr_codes=3)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = EVENT_TIMEOUT, what: str = "") -> None:
    """Poll `check` until it holds; fails after `timeout` seconds. For states (not single events) to reach."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what or check.__name__}")
        await asyncio.sleep(0.05)


# --- databases and Redis -------------------------------------------------------------------------------


def _pg_admin_conn() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} ({exc}); start it (see .ci/run)", pytrace=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database created for this test run and dropped after it."""
    name = f"wamd_test_{secrets.token_hex(4)}"
    with _pg_admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    with _pg_admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq_url(url: str) -> str:
    """A SQLAlchemy Postgres URL as psycopg (libpq) takes it directly."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def truncate_all(pg_url: str) -> None:
    dsn = libpq_url(pg_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
        ]
        if tables:
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis_sync.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except redis_sync.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); start it (see .ci/run)", pytrace=False)
    return REDIS_URL


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on the run's Postgres database (emptied first) and on a new SQLite file."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
        truncate_all(url)
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'wamd.db'}"


# --- the simulator -------------------------------------------------------------------------------------


@dataclass
class StandaloneSim:
    url: str
    network: SimNetwork


@pytest.fixture
async def standalone_sim() -> AsyncIterator[StandaloneSim]:
    """A wamd-sim server (the real aiohttp app) on a free port of this machine."""
    network = SimNetwork(TEST_SIM)
    runner = web.AppRunner(create_sim_app(network))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield StandaloneSim(f"http://127.0.0.1:{port}", network)
    await runner.cleanup()
    await network.close()


# --- servers and clients -------------------------------------------------------------------------------


class ApiError(AssertionError):
    pass


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class WsClient:
    ws: aiohttp.ClientWebSocketResponse
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    results: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    next_id: int = 1
    reader: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = msg.json()
                if data.get("type") == "event":
                    await self.events.put(data)
                elif data.get("id") in self.results:
                    self.results.pop(data["id"]).set_result(data)
        finally:
            self.closed.set()

    async def command(self, type_: str, **fields: Any) -> dict[str, Any]:
        msg_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.results[msg_id] = future
        await self.ws.send_json({"id": msg_id, "type": type_, **fields})
        return await asyncio.wait_for(future, EVENT_TIMEOUT)

    async def subscribe(self, **fields: Any) -> int:
        answer = await self.command("subscribe_events", **fields)
        assert answer["success"], answer
        return int(answer["id"])

    async def wait_event(
        self,
        event_type: str,
        device_id: str | None = None,
        test: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = EVENT_TIMEOUT,
    ) -> dict[str, Any]:
        """The next matching event; earlier non-matching events are dropped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no {event_type} event for {device_id} within {timeout}s")
            message = await asyncio.wait_for(self.events.get(), remaining)
            event = message["event"]
            same_device = device_id is None or event.get("device_id") == device_id
            if event["type"] == event_type and same_device and test(event):
                return event

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


@dataclass
class Server:
    runtime: Runtime
    url: str
    http: aiohttp.ClientSession
    admin_password: str
    admin_token: str = ""
    sim_url: str | None = None  # standalone simulator; None: in-process, control API under this server
    sockets: list[WsClient] = field(default_factory=list)

    async def call(self, method: str, path: str, token: str | None = None, json: Any = None, **kw: Any) -> Reply:
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url + path, json=json, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                body: Any = await resp.json(content_type=None) if text else None
            except ValueError:
                body = text
            return Reply(resp.status, body, dict(resp.headers))

    async def ok(self, method: str, path: str, token: str | None = None, json: Any = None, **kw: Any) -> Any:
        reply = await self.call(method, path, token or self.admin_token, json, **kw)
        if reply.status >= 300:
            raise ApiError(f"{method} {path} answered {reply.status}: {reply.body}")
        return reply.body

    async def login(self, email: str, password: str) -> str:
        body = await self.ok("POST", "/api/auth/login", json={"email": email, "password": password})
        return str(body["token"])

    async def create_user(self, email: str, password: str = "staff-pass-123", role: str = "staff") -> tuple[str, str]:
        user = await self.ok("POST", "/api/users", json={"email": email, "password": password, "role": role})
        return user["id"], await self.login(email, password)

    async def ws(self, token: str | None = None, subscribe: bool = True, **sub: Any) -> WsClient:
        ws = await self.http.ws_connect(self.url + "/api/ws")
        await ws.send_json({"type": "auth", "token": token or self.admin_token})
        first = await ws.receive_json(timeout=EVENT_TIMEOUT)
        assert first["type"] == "auth_ok", first
        client = WsClient(ws)
        client.start()
        self.sockets.append(client)
        if subscribe:
            await client.subscribe(**sub)
        return client

    # the simulator's control API (standalone wamd-sim, or this server's /api/sim for admins)
    async def sim(self, method: str, path: str, json: Any = None) -> Any:
        if self.sim_url is None:
            return await self.ok(method, "/api/sim" + path, json=json)
        async with self.http.request(method, self.sim_url + "/api/sim" + path, json=json) as resp:
            body = await resp.json()
            if resp.status >= 300:
                raise ApiError(f"sim {method} {path} answered {resp.status}: {body}")
            return body

    async def create_device(self, name: str = "Phone", token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok("POST", "/api/devices", token, json={"name": name})
        return body

    async def pair_by_qr(self, device_id: str, phone: str, ws: WsClient, token: str | None = None) -> dict[str, Any]:
        """Pair through the API and the simulated phone; returns the device.paired event."""
        await self.ok("POST", f"/api/devices/{device_id}/pair", token, json={"method": "qr"})
        qr = await ws.wait_event("device.qr", device_id)
        await self.sim("POST", "/scan", {"qr": qr["code"], "phone": phone})
        paired = await ws.wait_event("device.paired", device_id)
        await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")
        return paired

    async def close(self) -> None:
        for sock in self.sockets:
            await sock.close()
        await self.http.close()
        await self.runtime.stop()


ServerFactory = Callable[..., Awaitable[Server]]


def server_env(database_url: str, data_dir: Path, admin_password: str, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "WAMD_TRANSPORT": "sim",
        "PORT": "0",
        "HOST": "127.0.0.1",
        "WAMD_DATA_DIR": str(data_dir),
        "WAMD_ADMIN_EMAIL": ADMIN_EMAIL,
        "WAMD_ADMIN_PASSWORD": admin_password,
        "WAMD_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start real servers (Runtime + aiohttp on a free port); each is stopped after the test."""
    started: list[Server] = []
    networks: list[SimNetwork] = []
    # Per test: servers on the same database share the admin account, servers on the same Redis their
    # channels (and no other test's).
    password = secrets.token_urlsafe(12)
    redis_prefix = f"test-{secrets.token_hex(4)}"

    async def make(
        database_url: str,
        *,
        sim_url: str | None = None,
        redis_url: str | None = None,
        sim_network: SimNetwork | None = None,
        plugins: list[object] | None = None,
        clock: Any = None,
        **env: str,
    ) -> Server:
        extra = dict(env)
        if sim_url:
            extra["WAMD_SIM_URL"] = sim_url
        if redis_url:
            extra["REDIS_URL"] = redis_url
            extra.setdefault("WAMD_REDIS_PREFIX", redis_prefix)
        if sim_network is not None and sim_network not in networks:
            networks.append(sim_network)
        config = load_config(server_env(database_url, tmp_path / f"data-{uuid.uuid4().hex[:6]}", password, **extra))
        runtime = Runtime(config, clock=clock)
        for plugin in plugins or []:
            runtime.plugins.register(plugin)
        if sim_network is not None:
            runtime.sim_network = sim_network
        await runtime.start()
        server = Server(runtime, runtime.url, aiohttp.ClientSession(), password, sim_url=sim_url)
        started.append(server)
        server.admin_token = await server.login(ADMIN_EMAIL, password)
        return server

    yield make
    for server in reversed(started):
        await server.close()
    for network in networks:
        await network.close()


@pytest.fixture
async def server(make_server: ServerFactory, database_url: str) -> Server:
    """A server on each backend with the in-process simulated network."""
    return await make_server(database_url)
