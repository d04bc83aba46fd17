"""Bad input gets a clear 4xx JSON error, changes nothing, and never shows a traceback."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import EVENT_TIMEOUT, Reply, Server, ServerFactory
from wamd_server.infra.db.tables import api_tokens, device_grants, devices, users

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


# --- helpers ---------------------------------------------------------------------------------------------


def engine_of(server: Server) -> AsyncEngine:
    assert server.runtime.engine is not None
    return server.runtime.engine


async def snapshot(server: Server) -> dict[str, list[str]]:
    """Every row of the tables an API call could touch (users, devices, grants, tokens)."""
    state = {}
    async with engine_of(server).connect() as conn:
        for table in (users, devices, device_grants, api_tokens):
            rows = (await conn.execute(select(table))).all()
            state[table.name] = sorted(repr(tuple(row)) for row in rows)
    return state


def assert_clean_4xx(reply: Reply, what: object, status: int | None = None) -> dict[str, Any]:
    """A 4xx answer with the JSON error envelope, and nothing that looks like a stack trace."""
    text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
    assert "Traceback" not in text and 'File "' not in text, (what, text)
    assert 400 <= reply.status < 500, (what, reply.status, reply.body)
    if status is not None:
        assert reply.status == status, (what, reply.status, reply.body)
    assert reply.headers.get("Content-Type", "").startswith("application/json"), (what, reply.headers)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, (what, reply.body)
    error: dict[str, Any] = reply.body["error"]
    assert set(error) <= {"code", "message", "details"}, (what, error)
    assert isinstance(error["code"], str) and error["code"], (what, error)
    assert isinstance(error["message"], str) and error["message"], (what, error)
    return error


class World:
    """A server with a staff user and a device, and the state to compare against."""

    def __init__(self, server: Server, staff_id: str, staff_token: str, device: dict[str, Any]) -> None:
        self.server = server
        self.staff_id = staff_id
        self.staff_token = staff_token
        self.device = device
        self.before: dict[str, list[str]] = {}

    @classmethod
    async def make(cls, server: Server) -> World:
        staff_id, staff_token = await server.create_user("staff@example.com")
        device = await server.create_device("Phone")
        await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [device["id"]]})
        world = cls(server, staff_id, staff_token, device)
        world.before = await snapshot(server)
        return world

    async def send(self, method: str, path: str, *, token: str | None = "admin", **kw: Any) -> Reply:
        auth = self.server.admin_token if token == "admin" else token
        return await self.server.call(method, path, auth, **kw)

    async def assert_unchanged(self, what: object) -> None:
        assert await snapshot(self.server) == self.before, f"state changed after {what}"

    def body_routes(self) -> list[tuple[str, str, str | None]]:
        """(method, path, token) of every route that takes a JSON body."""
        return [
            ("POST", "/api/auth/login", None),
            ("POST", "/api/users", "admin"),
            ("PATCH", f"/api/users/{self.staff_id}", "admin"),
            ("PUT", f"/api/users/{self.staff_id}/devices", "admin"),
            ("POST", "/api/devices", "admin"),
            ("POST", "/api/devices", self.staff_token),
            ("PATCH", f"/api/devices/{self.device['id']}", "admin"),
            ("PATCH", f"/api/devices/{self.device['id']}", self.staff_token),
            ("POST", f"/api/devices/{self.device['id']}/pair", "admin"),
        ]


# --- bodies ----------------------------------------------------------------------------------------------

MALFORMED: list[tuple[bytes, str]] = [
    (b"", "invalid_json"),
    (b"   \n", "invalid_json"),
    (b"{", "invalid_json"),
    (b'{"name": "x"', "invalid_json"),
    (b"{'name': 'x'}", "invalid_json"),
    (b'{"name": "x",}', "invalid_json"),
    (b'{"name": "x"} {"name": "y"}', "invalid_json"),
    (b"nul", "invalid_json"),
    (b"name=x&email=y", "invalid_json"),
    (b'{"name": "\xff\xfe"}', "invalid_json"),
    (b"[" * 20_000 + b"]" * 20_000, "invalid_json"),
    (b"{" + b'"a":{' * 5_000 + b"}" * 5_001, "invalid_json"),
]
NOT_OBJECTS = [b"[]", b'[{"name": "x"}]', b'"text"', b"42", b"-1.5", b"null", b"true"]


async def test_malformed_json_and_bodies_that_are_not_objects(server: Server) -> None:
    world = await World.make(server)
    for method, path, token in world.body_routes():
        for raw, code in MALFORMED:
            what = (method, path, raw[:40])
            error = assert_clean_4xx(await world.send(method, path, token=token, data=raw, headers=JSON), what, 400)
            assert error["code"] == code, (what, error)
        for raw in NOT_OBJECTS:
            what = (method, path, raw)
            error = assert_clean_4xx(await world.send(method, path, token=token, data=raw, headers=JSON), what, 400)
            assert error["code"] == "invalid_input", (what, error)
            assert "object" in error["message"], (what, error)
    await world.assert_unchanged("malformed bodies")


def field_cases(world: World) -> list[tuple[str, str, str | None, Any, str | None]]:
    """(method, path, token, body, field named in the error or None) of valid JSON that is not valid input."""
    device = f"/api/devices/{world.device['id']}"
    user = f"/api/users/{world.staff_id}"
    grants = f"{user}/devices"
    pair = f"{device}/pair"
    staff = world.staff_token
    too_long = "x" * 5000
    cases: list[tuple[str, str, str | None, Any, str | None]] = [
        # login
        ("POST", "/api/auth/login", None, {}, "email"),
        ("POST", "/api/auth/login", None, {"email": "staff@example.com"}, "password"),
        ("POST", "/api/auth/login", None, {"email": 5, "password": "staff-pass-123"}, "email"),
        ("POST", "/api/auth/login", None, {"email": "staff@example.com", "password": None}, "password"),
        (
            "POST",
            "/api/auth/login",
            None,
            {"email": "staff@example.com", "password": "x", "remember": True},
            "remember",
        ),
        ("POST", "/api/auth/login", None, {"email": "staff@example.com", "password": ""}, "password"),
        ("POST", "/api/auth/login", None, {"email": "x" * 400 + "@example.com", "password": "abcdefgh"}, "email"),
        ("POST", "/api/auth/login", None, {"email": "st\x00aff@example.com", "password": "abcdefgh"}, "email"),
        # create user
        ("POST", "/api/users", "admin", {}, "email"),
        ("POST", "/api/users", "admin", {"email": "new@example.com"}, "password"),
        ("POST", "/api/users", "admin", {"email": "not-an-email", "password": "new-password-1"}, "email"),
        ("POST", "/api/users", "admin", {"email": "a b@example.com", "password": "new-password-1"}, "email"),
        ("POST", "/api/users", "admin", {"email": ["new@example.com"], "password": "new-password-1"}, "email"),
        ("POST", "/api/users", "admin", {"email": "new@example.com", "password": "short"}, "password"),
        ("POST", "/api/users", "admin", {"email": "new@example.com", "password": 123456789}, "password"),
        ("POST", "/api/users", "admin", {"email": "new@example.com", "password": "p" * 1025}, "password"),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "role": "owner"},
            "role",
        ),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "role": "ADMIN"},
            "role",
        ),
        ("POST", "/api/users", "admin", {"email": "new@example.com", "password": "new-password-1", "name": 7}, "name"),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "name": too_long},
            "name",
        ),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "is_active": False},
            "is_active",
        ),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "id": str(uuid.uuid4())},
            "id",
        ),
        ("POST", "/api/users", "admin", {"email": "new@example.com", "password": "new-\x00password"}, "password"),
        (
            "POST",
            "/api/users",
            "admin",
            {"email": "new@example.com", "password": "new-password-1", "name": "N\x00"},
            "name",
        ),
        # change user
        ("PATCH", user, "admin", {"role": "root"}, "role"),
        ("PATCH", user, "admin", {"is_active": "false"}, "is_active"),
        ("PATCH", user, "admin", {"is_active": 0}, "is_active"),
        ("PATCH", user, "admin", {"password": "short"}, "password"),
        ("PATCH", user, "admin", {"password": 12345678}, "password"),
        ("PATCH", user, "admin", {"name": 7}, "name"),
        ("PATCH", user, "admin", {"name": too_long}, "name"),
        ("PATCH", user, "admin", {"email": "taken-over@example.com"}, "email"),
        ("PATCH", user, "admin", {"role": "admin", "device_ids": []}, "device_ids"),
        ("PATCH", user, "admin", {"name": "Ok", "role": "staff", "is_active": "yes"}, "is_active"),
        # grants
        ("PUT", grants, "admin", {}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": None}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": world.device["id"]}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": [1, 2]}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": ["not-a-uuid"]}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": [str(uuid.uuid4())]}, "device_ids"),
        ("PUT", grants, "admin", {"device_ids": [], "user_id": world.staff_id}, "user_id"),
        # create device
        ("POST", "/api/devices", "admin", {}, "name"),
        ("POST", "/api/devices", "admin", {"name": None}, "name"),
        ("POST", "/api/devices", "admin", {"name": 5}, "name"),
        ("POST", "/api/devices", "admin", {"name": ["Phone"]}, "name"),
        ("POST", "/api/devices", "admin", {"name": ""}, "name"),
        ("POST", "/api/devices", "admin", {"name": "   "}, "name"),
        ("POST", "/api/devices", "admin", {"name": "x" * 101}, "name"),
        ("POST", "/api/devices", "admin", {"name": "a\x00b"}, "name"),
        ("POST", "/api/devices", "admin", {"name": "Phone", "status": "online"}, "status"),
        ("POST", "/api/devices", staff, {"name": "Phone", "owner": "me"}, "owner"),
        # change device
        ("PATCH", device, "admin", {"name": ""}, "name"),
        ("PATCH", device, "admin", {"name": "   "}, "name"),
        ("PATCH", device, "admin", {"name": "\x00"}, "name"),
        ("PATCH", device, "admin", {"min_delay_s": "5"}, "min_delay_s"),
        ("PATCH", device, "admin", {"min_delay_s": -1}, "min_delay_s"),
        ("PATCH", device, "admin", {"max_delay_s": 3601}, "max_delay_s"),
        ("PATCH", device, "admin", {"min_delay_s": 50, "max_delay_s": 10}, "min_delay_s"),
        ("PATCH", device, "admin", {"min_delay_s": 40}, "min_delay_s"),  # above the stored max (30)
        ("PATCH", device, "admin", {"hourly_cap": 1.5}, "hourly_cap"),
        ("PATCH", device, "admin", {"hourly_cap": True}, "hourly_cap"),
        ("PATCH", device, "admin", {"hourly_cap": 0}, "hourly_cap"),
        ("PATCH", device, "admin", {"hourly_cap": 10**30}, "hourly_cap"),
        ("PATCH", device, "admin", {"hourly_cap": 600}, "hourly_cap"),  # above the stored daily cap (500)
        ("PATCH", device, "admin", {"daily_cap": -5}, "daily_cap"),
        ("PATCH", device, "admin", {"status": "online"}, "status"),
        ("PATCH", device, "admin", {"phone": "60123000099"}, "phone"),
        ("PATCH", device, staff, {"name": "Mine", "jid": "x@s.whatsapp.net"}, "jid"),
        # pair
        ("POST", pair, "admin", {}, "method"),
        ("POST", pair, "admin", {"method": "sms"}, "method"),
        ("POST", pair, "admin", {"method": "QR"}, "method"),
        ("POST", pair, "admin", {"method": None}, "method"),
        ("POST", pair, "admin", {"method": "qr", "phone": "60123000099"}, "phone"),
        ("POST", pair, "admin", {"method": "code"}, "phone"),
        ("POST", pair, "admin", {"method": "code", "phone": 60123000099}, "phone"),
        ("POST", pair, "admin", {"method": "code", "phone": "not a phone"}, "phone"),
        ("POST", pair, "admin", {"method": "code", "phone": "12345"}, "phone"),
        ("POST", pair, "admin", {"method": "code", "phone": "60123000099", "push": True}, "push"),
    ]
    return cases


async def test_missing_wrong_typed_unknown_and_out_of_range_fields(server: Server) -> None:
    world = await World.make(server)
    for method, path, token, body, field in field_cases(world):
        what = (method, path, body if len(str(body)) < 200 else str(body)[:200])
        error = assert_clean_4xx(await world.send(method, path, token=token, json=body), what, 400)
        assert error["code"] == "invalid_input", (what, error)
        if field is not None:
            assert field in json.dumps(error), (what, error)  # the error names the offending field
        await world.assert_unchanged(what)
    # the device did not start pairing and nobody was logged in or locked out
    assert (await server.ok("GET", f"/api/devices/{world.device['id']}"))["status"] == "unpaired"
    assert await server.login("staff@example.com", "staff-pass-123")


async def test_unknown_and_malformed_ids_in_paths(server: Server) -> None:
    world = await World.make(server)
    bad_ids = [str(uuid.uuid4()), "not-a-uuid", "123", world.device["id"] + "0", world.device["id"][:-1], "%20", "null"]
    for bad in bad_ids:
        routes: list[tuple[str, str, Any]] = [
            ("GET", f"/api/devices/{bad}", None),
            ("PATCH", f"/api/devices/{bad}", {"name": "Renamed"}),
            ("DELETE", f"/api/devices/{bad}", None),
            ("POST", f"/api/devices/{bad}/pair", {"method": "qr"}),
            ("GET", f"/api/devices/{bad}/qr", None),
            ("POST", f"/api/devices/{bad}/logout", None),
            ("POST", f"/api/devices/{bad}/refresh", None),
            ("GET", f"/api/users/{bad}", None),
            ("PATCH", f"/api/users/{bad}", {"name": "Renamed"}),
            ("DELETE", f"/api/users/{bad}", None),
            ("GET", f"/api/users/{bad}/devices", None),
            ("PUT", f"/api/users/{bad}/devices", {"device_ids": []}),
        ]
        for method, path, body in routes:
            error = assert_clean_4xx(await world.send(method, path, json=body), (method, path), 404)
            assert error["code"] == "not_found", (method, path, error)
    await world.assert_unchanged("unknown ids")


async def test_unknown_routes_and_wrong_methods(server: Server) -> None:
    world = await World.make(server)
    for path in ("/api/nope", "/api/devices/x/y/z", f"/api/devices/{world.device['id']}/unknown", "/api/users/"):
        for token in ("admin", None):
            error = assert_clean_4xx(await world.send("GET", path, token=token), path, 404)
            assert error["code"] == "not_found"
    for method, path, allowed in (
        ("PUT", "/api/devices", {"GET", "POST"}),
        ("DELETE", "/api/devices", {"GET", "POST"}),
        ("POST", "/api/me", {"GET"}),
        ("GET", "/api/auth/login", {"POST"}),
        ("PUT", f"/api/devices/{world.device['id']}", {"GET", "PATCH", "DELETE"}),
        ("POST", f"/api/users/{world.staff_id}", {"GET", "PATCH", "DELETE"}),
    ):
        reply = await world.send(method, path, json={"name": "x"})
        error = assert_clean_4xx(reply, (method, path), 405)
        assert error["code"] == "method_not_allowed"
        assert set(reply.headers["Allow"].split(",")) >= allowed, reply.headers
    await world.assert_unchanged("unknown routes")


async def test_bad_pagination_parameters(server: Server) -> None:
    world = await World.make(server)
    short = base64.urlsafe_b64encode(b"\x01" * 15).decode().rstrip("=")
    bad = [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1001", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("limit=1e3", "limit"),
        ("limit=10abc", "limit"),
        ("cursor=!!!", "cursor"),
        ("cursor=abc", "cursor"),
        (f"cursor={short}", "cursor"),
        ("cursor=%00", "cursor"),
        ("limit=5&cursor=not-a-cursor", "cursor"),
    ]
    for path in ("/api/devices", "/api/users"):
        for query, field in bad:
            what = f"{path}?{query}"
            error = assert_clean_4xx(await world.send("GET", what), what, 400)
            assert error["code"] == "invalid_input", (what, error)
            assert field in json.dumps(error), (what, error)
        for query in ("limit=1", "limit=1000", "limit=1000&cursor="):
            page = await server.ok("GET", f"{path}?{query}")
            assert page["items"], (path, query)
    # staff get the same answers on their device list
    error = assert_clean_4xx(await world.send("GET", "/api/devices?limit=0", token=world.staff_token), "staff", 400)
    assert error["code"] == "invalid_input"
    await world.assert_unchanged("pagination")


# --- sizes -----------------------------------------------------------------------------------------------


async def chunks(total: int, tail: bytes = b"", size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length)."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b" " * piece
        sent += piece
    if tail:
        yield tail


async def test_json_bodies_are_limited_to_one_mib(server: Server) -> None:
    world = await World.make(server)
    too_big = json.dumps({"name": "x" * (MiB + 10)}).encode()
    reply = await world.send("POST", "/api/devices", data=too_big, headers=JSON)
    error = assert_clean_4xx(reply, "content-length", 413)
    assert error["code"] == "payload_too_large"

    reply = await world.send("POST", "/api/devices", data=chunks(MiB + 1, b'{"name": "Chunked"}'), headers=JSON)
    error = assert_clean_4xx(reply, "chunked", 413)
    assert error["code"] == "payload_too_large"

    reply = await world.send("PATCH", f"/api/users/{world.staff_id}", data=too_big, headers=JSON)
    assert_clean_4xx(reply, "patch user", 413)
    await world.assert_unchanged("oversized bodies")

    # a body just under the limit is read whole, even when it arrives in many pieces
    padding = MiB - 100
    body = b" " * padding + b'{"name": "Big"}'
    created = await server.ok("POST", "/api/devices", data=body, headers=JSON)
    assert created["name"] == "Big"
    created = await server.ok("POST", "/api/devices", data=chunks(padding, b'{"name": "Chunked"}'), headers=JSON)
    assert created["name"] == "Chunked"


async def test_whole_requests_are_limited_to_the_configured_size(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server(f"sqlite+aiosqlite:///{tmp_path / 'limit.db'}", WAMD_MAX_BODY_MB="2")
    before = await snapshot(server)
    # The simulator's control API reads the whole body (as uploads do), so WAMD_MAX_BODY_MB applies there.
    body = json.dumps({"from_phone": "60123000001", "to_phone": "60123000002", "text": "x" * (3 * MiB)}).encode()
    reply = await server.call("POST", "/api/sim/send", server.admin_token, data=body, headers=JSON)
    error = assert_clean_4xx(reply, "whole request", 413)
    assert error["code"] == "payload_too_large"
    # JSON routes keep their own, lower limit
    reply = await server.call(
        "POST", "/api/devices", server.admin_token, data=json.dumps({"name": "x" * (MiB + MiB // 2)}), headers=JSON
    )
    assert_clean_4xx(reply, "json route", 413)
    assert await snapshot(server) == before
    assert await server.sim("GET", "/inbox/60123000001") == {"items": []}


# --- WebSocket -------------------------------------------------------------------------------------------


async def test_websocket_bad_messages(server: Server) -> None:
    world = await World.make(server)
    for first in ("not json", json.dumps({"type": "hello"}), json.dumps({"type": "auth"}), json.dumps([1, 2])):
        ws = await server.http.ws_connect(server.url + "/api/ws")
        await ws.send_str(first)
        answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
        assert answer["type"] == "auth_invalid", (first, answer)
        await ws.receive(timeout=EVENT_TIMEOUT)
        assert ws.closed and ws.close_code == 4001, first
        await ws.close()

    ws = await server.http.ws_connect(server.url + "/api/ws")
    await ws.send_bytes(b"\x00\x01")
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer["type"] == "auth_invalid"
    await ws.close()

    client = await server.ws(world.staff_token, subscribe=False)
    raw: aiohttp.ClientWebSocketResponse = client.ws
    # answers without an id come back as results with id null; read them off the socket's reader by id
    for message in ("nonsense", json.dumps({"type": "ping"}), json.dumps({"id": "x", "type": "ping"})):
        await raw.send_str(message)
    answer = await client.command("bogus_command")
    assert (answer["success"], answer["error"]["code"]) == (False, "unknown_command")
    answer = await client.command("subscribe_events", event_types=["no.such.event"])
    assert (answer["success"], answer["error"]["code"]) == (False, "invalid_input")
    answer = await client.command("subscribe_events", event_types="device.qr")
    assert (answer["success"], answer["error"]["code"]) == (False, "invalid_input")
    answer = await client.command("subscribe_events", device_id="not-a-uuid")
    assert (answer["success"], answer["error"]["code"]) == (False, "not_found")
    answer = await client.command("unsubscribe_events", subscription="x")
    assert (answer["success"], answer["error"]["code"]) == (False, "invalid_input")
    answer = await client.command("unsubscribe_events", subscription=999)
    assert (answer["success"], answer["error"]["code"]) == (False, "not_found")
    assert (await client.command("ping"))["type"] == "pong"  # the connection survived all of it
    assert not raw.closed
    await world.assert_unchanged("websocket messages")
