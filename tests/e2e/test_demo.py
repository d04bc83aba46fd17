"""`wamd-server --demo` as a newcomer runs it: healthy within seconds, printed credentials work, devices live."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import EVENT_TIMEOUT, WsClient
from tests.e2e.processes import free_port, wamd_server

CREDENTIALS = re.compile(r"log in:\s+(\S+) / (\S+)")


async def test_demo_starts_and_shows_life(tmp_path: Path) -> None:
    port = free_port()
    # Like a fresh machine: no database or transport configured, only where to listen.
    demo = wamd_server({"PORT": str(port), "WAMD_DATA_DIR": str(tmp_path / "data")}, tmp_path, "--demo")
    demo.start()
    try:
        url = f"http://127.0.0.1:{port}"
        healthy_after = await demo.wait_http(url + "/api/health", timeout=10.0)
        assert healthy_after < 10.0
        deadline = time.monotonic() + 20
        while not CREDENTIALS.search(demo.text()) and time.monotonic() < deadline:
            await demo.wait_http(url + "/api/health")
        match = CREDENTIALS.search(demo.text())
        assert match, demo.text()
        assert url in demo.text()

        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/api/auth/login", json={"email": match[1], "password": match[2]}) as resp:
                assert resp.status == 200
                token = (await resp.json())["token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(url + "/api/devices", headers=headers) as resp:
                devices = (await resp.json())["items"]
            assert len(devices) == 3
            assert {d["status"] for d in devices} == {"online"}

            ws = await http.ws_connect(url + "/api/ws")
            await ws.send_json({"type": "auth", "token": token})
            assert (await ws.receive_json(timeout=EVENT_TIMEOUT))["type"] == "auth_ok"
            client = WsClient(ws)
            client.start()
            await client.subscribe(event_types=["message.new"])
            event = await client.wait_event("message.new", timeout=30.0)
            assert event["device_id"] in {d["id"] for d in devices}
            assert event["message"]["text"]
            await client.close()
    finally:
        assert demo.stop(signal.SIGINT) == 0, demo.text()
    assert "Traceback" not in demo.text()
