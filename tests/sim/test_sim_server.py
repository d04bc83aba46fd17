"""The standalone simulator: the link WebSocket, and the `wamd-sim` command."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from tests.sim.sim_helpers import wait_until
from wamd_server.sim.network import SimNetwork

PHONE = "60123456789"
CONTACT = "60198765432"
REPO = Path(__file__).resolve().parents[2]

Client = TestClient[Any, Any]


class WsPeer:
    """A raw link client: sends requests, sorts incoming frames into replies and events."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                await self.frames.put(json.loads(msg.data))

    async def next(self, match: Any = None, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if match is None or match(frame):
                    return frame

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(json.dumps(frame))


async def test_link_websocket_pairs_and_sends(client: Client, network: SimNetwork) -> None:
    peer = WsPeer(await client.ws_connect("/api/sim/link"))
    await peer.send(req=1, op="pair_qr", sid="dev-1")
    assert await peer.next(lambda f: f.get("re") == 1) == {"re": 1, "ok": True}
    qr = await peer.next(lambda f: f.get("ev") == "qr")
    assert qr["sid"] == "dev-1" and qr["code"].startswith("2@")
    scan = await client.post("/api/sim/scan", json={"qr": qr["code"], "phone": PHONE})
    assert scan.status == 200
    paired = await peer.next(lambda f: f.get("ev") == "paired")
    assert paired["jid"] == f"{PHONE}:1@s.whatsapp.net" and paired["secret"]
    await peer.next(lambda f: f.get("ev") == "connected")
    await peer.send(req=2, op="send", sid="dev-1", to=f"{CONTACT}@s.whatsapp.net", id="3EB0X", text="hi")
    ack = await peer.next(lambda f: f.get("re") == 2)
    assert ack["ok"] and ack["id"] == "3EB0X"
    receipt = await peer.next(lambda f: f.get("ev") == "receipt")
    assert receipt["ids"] == ["3EB0X"] and receipt["type"] == "delivered"
    await peer.ws.close()


async def test_requests_run_concurrently(client: Client, network: SimNetwork) -> None:
    peer = WsPeer(await client.ws_connect("/api/sim/link"))
    await peer.send(req=1, op="pair_qr", sid="slow")
    qr = await peer.next(lambda f: f.get("ev") == "qr")
    await network.scan(qr["code"], PHONE)
    await peer.next(lambda f: f.get("ev") == "connected")
    await network.set_faults(PHONE, latency_ms=2000)
    await peer.send(req=2, op="send", sid="slow", to=f"{CONTACT}@s.whatsapp.net", id="S1", text="slow")
    await peer.send(req=3, op="pair_qr", sid="other")
    first_reply = await peer.next(lambda f: "re" in f)
    assert first_reply["re"] == 3  # answered while the slow send is still waiting
    await peer.ws.close()


async def test_bad_frames_get_error_replies(client: Client) -> None:
    peer = WsPeer(await client.ws_connect("/api/sim/link"))
    await peer.ws.send_str("{nope")
    reply = await peer.next()
    assert reply["ok"] is False and reply["error"]["code"] == "bad_json"
    await peer.send(req=5, op="connect", sid="x")
    reply = await peer.next()
    assert reply["re"] == 5 and reply["error"]["code"] == "bad_request"
    await peer.ws.close()


async def test_closing_the_socket_closes_the_link(client: Client, network: SimNetwork) -> None:
    peer = WsPeer(await client.ws_connect("/api/sim/link"))
    await peer.send(req=1, op="pair_qr", sid="dev-1")
    qr = await peer.next(lambda f: f.get("ev") == "qr")
    jid = await network.scan(qr["code"], PHONE)
    await peer.next(lambda f: f.get("ev") == "connected")
    assert network.stats()["online"] == [jid]
    await peer.ws.close()
    await wait_until(lambda: network.stats()["online"] == [])
    assert network.linked_devices(PHONE) == [jid]  # dropped, not logged out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wamd_server.sim.cli", "--log-level", "WARNING", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_listens_and_stops_on_signal() -> None:
    port = _free_port()
    proc = _start_cli("--port", str(port), "--qr-ttl", "0.5", "--qr-next-ttl", "0.5", "--qr-codes", "2")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == f"wamd-sim listening on http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cli_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start_cli("--port", str(port))
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in err
