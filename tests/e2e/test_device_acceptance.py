"""Issue acceptance, through the API alone: a real `wamd-server` process against a real `wamd-sim` process,
on Postgres + Redis and on SQLite, including a server restart."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_EMAIL, EVENT_TIMEOUT, WsClient, truncate_all
from tests.e2e.processes import Process, free_port, wamd_server, wamd_sim

PHONE = "60123000021"


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = wamd_sim(port, tmp_path, "--qr-ttl", "5", "--qr-next-ttl", "3", "--qr-codes", "3")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    asyncio.run(proc.wait_http(url + "/api/health"))
    yield url
    assert proc.stop() == 0, proc.text()


@pytest.fixture(params=["postgres+redis", "sqlite"])
def server_env(request: pytest.FixtureRequest, tmp_path: Path, sim_process: str) -> dict[str, str]:
    env = {
        "WAMD_TRANSPORT": "sim",
        "WAMD_SIM_URL": sim_process,
        "PORT": str(free_port()),
        "WAMD_DATA_DIR": str(tmp_path / "data"),
        "WAMD_ADMIN_EMAIL": ADMIN_EMAIL,
        "WAMD_ADMIN_PASSWORD": secrets.token_urlsafe(12),
    }
    if request.param == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'wamd.db'}"
    else:
        pg_url: str = request.getfixturevalue("pg_url")
        truncate_all(pg_url)
        # The form Railway hands out.
        env["DATABASE_URL"] = pg_url.replace("postgresql+psycopg://", "postgres://")
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    return env


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str, sim_url: str) -> None:
        self.http, self.url, self.sim_url, self.token = http, url, sim_url, ""

    async def call(self, method: str, path: str, json: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.http.request(method, self.url + path, json=json, headers=headers) as resp:
            body = await resp.json()
            assert resp.status < 300, f"{method} {path} → {resp.status} {body}"
            return body

    async def sim(self, path: str, json: Any) -> Any:
        async with self.http.post(self.sim_url + "/api/sim" + path, json=json) as resp:
            body = await resp.json()
            assert resp.status < 300, f"sim {path} → {resp.status} {body}"
            return body

    async def ws(self) -> WsClient:
        ws = await self.http.ws_connect(self.url + "/api/ws")
        await ws.send_json({"type": "auth", "token": self.token})
        assert (await ws.receive_json(timeout=EVENT_TIMEOUT))["type"] == "auth_ok"
        client = WsClient(ws)
        client.start()
        await client.subscribe()
        return client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_server(env: dict[str, str], tmp_path: Path) -> Process:
    proc = wamd_server(env, tmp_path)
    proc.start()
    await proc.wait_http(f"http://127.0.0.1:{env['PORT']}/api/health")
    return proc


async def test_device_lifecycle_against_standalone_sim(
    server_env: dict[str, str], sim_process: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(server_env, tmp_path)
    try:
        api = Client(http, f"http://127.0.0.1:{server_env['PORT']}", sim_process)
        api.token = (
            await api.call(
                "POST", "/api/auth/login", {"email": ADMIN_EMAIL, "password": server_env["WAMD_ADMIN_PASSWORD"]}
            )
        )["token"]
        health = await api.call("GET", "/api/health")
        assert health["bus"] == ("redis" if "REDIS_URL" in server_env else "local")
        ws = await api.ws()

        # Pair by QR: the code arrives as an event and at GET /qr; the phone scans it.
        device = await api.call("POST", "/api/devices", {"name": "Sales A"})
        device_id = device["id"]
        await api.call("POST", f"/api/devices/{device_id}/pair", {"method": "qr"})
        qr = await ws.wait_event("device.qr", device_id)
        assert (await api.call("GET", f"/api/devices/{device_id}/qr"))["code"] == qr["code"]
        await api.sim("/scan", {"qr": qr["code"], "phone": PHONE})
        paired = await ws.wait_event("device.paired", device_id)
        assert paired["jid"] == f"{PHONE}:1@s.whatsapp.net"
        await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")

        # Logout unlinks but keeps phone and JID; refresh then needs a QR.
        await api.call("POST", f"/api/devices/{device_id}/logout")
        await ws.wait_event("device.logged_out", device_id)
        row = await api.call("GET", f"/api/devices/{device_id}")
        assert (row["status"], row["phone"], row["jid"]) == ("logged_out", PHONE, paired["jid"])
        assert await api.call("POST", f"/api/devices/{device_id}/refresh") == {"status": "qr_required"}

        # Pair again by phone code, typed on the phone.
        answer = await api.call("POST", f"/api/devices/{device_id}/pair", {"method": "code", "phone": "+" + PHONE})
        await api.sim("/pair-code", {"code": answer["pair_code"], "phone": PHONE})
        await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")

        # Unlinked from the phone: logged out at once.
        unlinked_at = time.monotonic()
        await api.sim("/unlink", {"phone": PHONE})
        await ws.wait_event("device.logged_out", device_id)
        assert time.monotonic() - unlinked_at < 1.0
        assert (await api.call("GET", f"/api/devices/{device_id}"))["status"] == "logged_out"

        # Link once more, then restart the server: the device comes back online without a QR.
        await api.call("POST", f"/api/devices/{device_id}/pair", {"method": "qr"})
        qr = await ws.wait_event("device.qr", device_id)
        await api.sim("/scan", {"qr": qr["code"], "phone": PHONE})
        await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")
        await ws.close()
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.text()

    server = await start_server(server_env, tmp_path)
    try:
        ws = await api.ws()
        row = await api.call("GET", f"/api/devices/{device_id}")
        if row["status"] != "online":
            await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")
        async with http.get(sim_process + "/api/sim/stats") as resp:
            stats = await resp.json()
        assert stats["double_connection_total"] == 0
        await ws.close()
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.text()
    assert "Traceback" not in server.text()


async def test_killed_server_reconnects_devices_on_start(
    server_env: dict[str, str], sim_process: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A crash (kill -9) leaves devices marked online; the next start reconnects them from their sessions."""
    server = await start_server(server_env, tmp_path)
    api = Client(http, f"http://127.0.0.1:{server_env['PORT']}", sim_process)
    try:
        login = {"email": ADMIN_EMAIL, "password": server_env["WAMD_ADMIN_PASSWORD"]}
        api.token = (await api.call("POST", "/api/auth/login", login))["token"]
        ws = await api.ws()
        ids = []
        for n in range(3):
            device_id = (await api.call("POST", "/api/devices", {"name": f"D{n}"}))["id"]
            await api.call("POST", f"/api/devices/{device_id}/pair", {"method": "qr"})
            qr = await ws.wait_event("device.qr", device_id)
            await api.sim("/scan", {"qr": qr["code"], "phone": f"6012300003{n}"})
            await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online")
            ids.append(device_id)
        await ws.close()
    finally:
        server.stop(signal.SIGKILL)

    server = await start_server(server_env, tmp_path)
    try:
        ws = await api.ws()
        pending = set(ids)
        for device in (await api.call("GET", "/api/devices"))["items"]:
            if device["status"] == "online":
                pending.discard(device["id"])
        while pending:
            # The killed server's leases must expire first (WAMD_LEASE_TTL_S, 10 s by default).
            event = await ws.wait_event("device.status", test=lambda e: e["status"] == "online", timeout=30.0)
            pending.discard(event["device_id"])
        await ws.close()
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.text()
