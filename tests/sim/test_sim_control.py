"""The control API over a real aiohttp server: answers, and a JSON error envelope for every bad input."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.sim.sim_helpers import FrameRecorder
from wamd_server.sim.control import Handler, control_routes
from wamd_server.sim.network import SimNetwork

PHONE = "60123456789"
CONTACT = "60198765432"

Client = TestClient[Any, Any]


async def start_pairing(network: SimNetwork, sid: str = "dev-1") -> FrameRecorder:
    frames = FrameRecorder()
    link = network.open_link(frames)
    assert (await link.request({"op": "pair_qr", "sid": sid}))["ok"]
    await frames.event("qr", sid)
    return frames


async def expect_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


async def test_pair_by_qr_over_http(client: Client, network: SimNetwork) -> None:
    frames = await start_pairing(network)
    qr = await (await client.get("/api/sim/qr/dev-1")).json()
    assert qr["code"].startswith("2@") and qr["expires_at"]
    response = await client.post("/api/sim/scan", json={"qr": qr["code"], "phone": PHONE})
    assert response.status == 200
    assert await response.json() == {"jid": f"{PHONE}:1@s.whatsapp.net"}
    await frames.event("connected", "dev-1")
    stats = await (await client.get("/api/sim/stats")).json()
    assert stats["online"] == [f"{PHONE}:1@s.whatsapp.net"]
    assert stats["connections"] == {f"{PHONE}:1@s.whatsapp.net": 1}
    assert stats["double_connection_total"] == 0


async def test_pair_by_code_over_http(client: Client, network: SimNetwork) -> None:
    frames = FrameRecorder()
    link = network.open_link(frames)
    code = (await link.request({"op": "pair_code", "sid": "dev-1", "phone": PHONE}))["code"]
    await expect_error(
        await client.post("/api/sim/pair-code", json={"code": code, "phone": CONTACT}), 409, "wrong_phone"
    )
    await expect_error(
        await client.post("/api/sim/pair-code", json={"code": "ZZZZ-ZZZZ", "phone": PHONE}), 404, "unknown_code"
    )
    response = await client.post("/api/sim/pair-code", json={"code": code, "phone": PHONE})
    assert await response.json() == {"jid": f"{PHONE}:1@s.whatsapp.net"}


async def test_send_inbox_read_unlink_reset(client: Client, network: SimNetwork) -> None:
    frames = await start_pairing(network)
    qr = await (await client.get("/api/sim/qr/dev-1")).json()
    await client.post("/api/sim/scan", json={"qr": qr["code"], "phone": PHONE})
    response = await client.post("/api/sim/send", json={"from_phone": CONTACT, "to_phone": PHONE, "text": "hi"})
    wa_id = (await response.json())["wa_id"]
    await frames.event("message", "dev-1", id=wa_id)
    inbox = await (await client.get(f"/api/sim/inbox/{PHONE}")).json()
    assert [(i["wa_id"], i["from_phone"], i["text"], i["has_media"]) for i in inbox["items"]] == [
        (wa_id, CONTACT, "hi", False)
    ]
    assert inbox["items"][0]["at"]
    assert await (await client.get(f"/api/sim/inbox/{CONTACT}")).json() == {"items": []}
    read = await client.post("/api/sim/read", json={"phone": PHONE, "from_phone": CONTACT})
    assert await read.json() == {"read": 1}
    unlink = await client.post("/api/sim/unlink", json={"phone": PHONE})
    assert await unlink.json() == {"unlinked": [f"{PHONE}:1@s.whatsapp.net"]}
    await frames.event("logged_out", "dev-1")
    assert await (await client.post("/api/sim/reset")).json() == {"ok": True}
    assert (await (await client.get("/api/sim/stats")).json())["linked"] == 0


async def test_faults_over_http(client: Client, network: SimNetwork) -> None:
    response = await client.post("/api/sim/faults", json={"phone": CONTACT, "not_on_whatsapp": True})
    assert await response.json() == {"ok": True}
    await expect_error(
        await client.post("/api/sim/send", json={"from_phone": PHONE, "to_phone": CONTACT, "text": "x"}),
        409,
        "not_on_whatsapp",
    )
    ok = await client.post("/api/sim/faults", json={"fail_rate": 0.5, "latency_ms": 10, "disconnect": True})
    assert ok.status == 200


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/sim/scan", {"qr": "2@x,y,z,w"}, 400),  # missing phone
        ("/api/sim/scan", {"qr": "2@x,y,z,w", "phone": "hello"}, 400),
        ("/api/sim/scan", {"qr": "2@x,y,z,w", "phone": "60123456789", "extra": 1}, 400),
        ("/api/sim/scan", {"qr": "", "phone": "60123456789"}, 400),
        ("/api/sim/scan", {"qr": "2@x,y,z,w", "phone": "60123456789"}, 404),
        ("/api/sim/scan", [1, 2], 400),
        ("/api/sim/pair-code", {"code": 12, "phone": "60123456789"}, 400),
        ("/api/sim/send", {"from_phone": "60123456789", "to_phone": "60198765432", "text": ""}, 400),
        ("/api/sim/send", {"from_phone": "60123456789", "to_phone": "60198765432"}, 400),
        ("/api/sim/unlink", {"phone": "60123456789"}, 404),
        ("/api/sim/unlink", {"phone": "60123456789", "jid": "60123456789:9@s.whatsapp.net"}, 404),
        ("/api/sim/faults", {"fail_rate": 2}, 400),
        ("/api/sim/faults", {"latency_ms": -1}, 400),
        ("/api/sim/faults", {"ban_seconds": "soon"}, 400),
        ("/api/sim/faults", {"disconnect": "maybe"}, 400),
        ("/api/sim/faults", {"phone": "+"}, 400),
        ("/api/sim/read", {"phone": "60123456789"}, 400),
    ],
)
async def test_bad_bodies_get_an_error_envelope(client: Client, path: str, body: Any, status: int) -> None:
    await expect_error(await client.post(path, json=body), status)


async def test_malformed_requests(client: Client) -> None:
    await expect_error(await client.post("/api/sim/scan", data=b"{not json"), 400, "bad_json")
    await expect_error(await client.post("/api/sim/scan", data=b"\xff\xfe"), 400, "bad_json")
    await expect_error(await client.post("/api/sim/scan"), 400, "invalid_input")  # empty body = {}
    await expect_error(await client.get("/api/sim/inbox/abc"), 400, "invalid_input")
    await expect_error(await client.get("/api/sim/qr/nobody"), 404, "no_pairing")
    await expect_error(await client.get("/api/sim/nothing-here"), 404, "not_found")
    await expect_error(await client.get("/api/sim/scan"), 405, "method_not_allowed")
    assert await (await client.get("/api/health")).json() == {"status": "ok"}


async def test_expired_qr_is_a_conflict(client: Client, network: SimNetwork) -> None:
    frames = await start_pairing(network)
    first = frames.events("qr", "dev-1")[0]["code"]
    await frames.event("qr", "dev-1", after=1)
    await expect_error(await client.post("/api/sim/scan", json={"qr": first, "phone": PHONE}), 409, "qr_expired")


async def test_routes_can_be_wrapped_by_another_app(network: SimNetwork) -> None:
    """The wamd web app mounts the same handlers behind its own check; the tuples make that easy."""
    seen: list[str] = []

    def admin_only(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            seen.append(request.path)
            if request.headers.get("X-Admin") != "yes":
                return web.json_response({"error": {"code": "forbidden", "message": "admins only"}}, status=403)
            return await handler(request)

        return wrapped

    app = web.Application()
    for method, path, handler in control_routes(network):
        app.router.add_route(method, path, admin_only(handler))
    async with TestClient(TestServer(app)) as http:
        assert (await http.get("/api/sim/stats")).status == 403
        response = await http.get("/api/sim/stats", headers={"X-Admin": "yes"})
        assert response.status == 200 and (await response.json())["linked"] == 0
    assert seen == ["/api/sim/stats", "/api/sim/stats"]
