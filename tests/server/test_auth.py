"""Authentication: login, tokens, logout, /api/me, login rate limits and how secrets are stored."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_sync
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN_EMAIL, EVENT_TIMEOUT, Reply, Server, ServerFactory, truncate_all
from wamd_server.infra.db.tables import api_tokens, users

STAFF_PASSWORD = "staff-pass-123"
BAD_LOGIN = "invalid email or password"


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The JSON error envelope with this status and code; returns the `error` object."""
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert set(error) <= {"code", "message", "details"}, error
    return error


def engine_of(server: Server) -> AsyncEngine:
    assert server.runtime.engine is not None
    return server.runtime.engine


async def token_count(server: Server) -> int:
    async with engine_of(server).connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(api_tokens))).scalar_one())


async def login_reply(server: Server, email: str, password: str, **kw: Any) -> Reply:
    return await server.call("POST", "/api/auth/login", json={"email": email, "password": password}, **kw)


# --- login, /api/me, logout -----------------------------------------------------------------------------


async def test_login_returns_a_token_and_the_user(server: Server) -> None:
    reply = await login_reply(server, ADMIN_EMAIL, server.admin_password)
    assert reply.status == 200, reply.body
    token, user = reply.body["token"], reply.body["user"]
    assert isinstance(token, str) and len(token) >= 32
    assert user["email"] == ADMIN_EMAIL
    assert (user["role"], user["is_active"]) == ("admin", True)
    assert user["last_login_at"] is not None
    assert "password" not in str(reply.body).lower()

    me = await server.ok("GET", "/api/me", token)
    assert me["id"] == user["id"]
    assert (me["email"], me["role"]) == (ADMIN_EMAIL, "admin")
    assert me["device_ids"] is None  # admins see every device

    staff_id, staff_token = await server.create_user("staff@example.com")
    staff_me = await server.ok("GET", "/api/me", staff_token)
    assert (staff_me["id"], staff_me["role"], staff_me["device_ids"]) == (staff_id, "staff", [])


async def test_wrong_password_unknown_email_and_inactive_user_get_the_same_401(server: Server) -> None:
    staff_id, _ = await server.create_user("staff@example.com")
    await server.ok("PATCH", f"/api/users/{staff_id}", json={"is_active": False})
    tokens_before = await token_count(server)

    attempts = [
        (ADMIN_EMAIL, "wrong-password"),
        ("nobody@example.com", server.admin_password),
        ("staff@example.com", STAFF_PASSWORD),  # right password, deactivated account
    ]
    for email, password in attempts:
        reply = await login_reply(server, email, password)
        error = assert_error(reply, 401, "unauthorized")
        assert error["message"] == BAD_LOGIN, (email, error)
        assert "token" not in reply.body
    assert await token_count(server) == tokens_before


async def test_login_email_is_case_insensitive(server: Server) -> None:
    await server.create_user("Mixed.Case@Example.com")
    for email in ("mixed.case@example.com", "MIXED.CASE@EXAMPLE.COM", "  Mixed.Case@example.com "):
        reply = await login_reply(server, email, STAFF_PASSWORD)
        assert reply.status == 200, (email, reply.body)
        assert reply.body["user"]["email"] == "mixed.case@example.com"


async def test_logout_revokes_only_that_token(server: Server) -> None:
    first = await server.login(ADMIN_EMAIL, server.admin_password)
    second = await server.login(ADMIN_EMAIL, server.admin_password)

    assert await server.ok("POST", "/api/auth/logout", first) == {"ok": True}
    assert_error(await server.call("GET", "/api/me", first), 401, "unauthorized")
    assert_error(await server.call("POST", "/api/auth/logout", first), 401, "unauthorized")
    assert (await server.ok("GET", "/api/me", second))["email"] == ADMIN_EMAIL

    # a revoked token cannot open a WebSocket either
    ws = await server.http.ws_connect(server.url + "/api/ws")
    await ws.send_json({"type": "auth", "token": first})
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer["type"] == "auth_invalid", answer
    await ws.close()


async def test_missing_malformed_unknown_and_expired_tokens_get_401(server: Server) -> None:
    expired = await server.login(ADMIN_EMAIL, server.admin_password)
    async with engine_of(server).begin() as conn:
        digest = hashlib.sha256(expired.encode()).hexdigest()
        result = await conn.execute(
            update(api_tokens)
            .where(api_tokens.c.token_hash == digest)
            .values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        assert result.rowcount == 1

    headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": f"Basic {server.admin_token}"},
        {"Authorization": server.admin_token},
        {"Authorization": "Bearer " + secrets.token_urlsafe(32)},
        {"Authorization": "Bearer " + server.admin_token[:-1]},
        {"Authorization": f"Bearer {expired}"},
    ]
    for header in headers:
        for method, path in (("GET", "/api/me"), ("GET", "/api/devices"), ("POST", "/api/devices")):
            reply = await server.call(method, path, headers=header, json={"name": "Nope"})
            assert_error(reply, 401, "unauthorized")
    assert (await server.ok("GET", "/api/devices"))["items"] == []

    # the scheme name is case-insensitive, as HTTP says
    me = await server.ok("GET", "/api/me", headers={"Authorization": f"bearer {server.admin_token}"})
    assert me["email"] == ADMIN_EMAIL

    ws = await server.http.ws_connect(server.url + "/api/ws")
    await ws.send_json({"type": "auth", "token": expired})
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer["type"] == "auth_invalid", answer
    closing = await ws.receive(timeout=EVENT_TIMEOUT)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert ws.close_code == 4001
    await ws.close()


# --- rate limits ---------------------------------------------------------------------------------------


async def test_five_failed_logins_lock_the_account_with_retry_after(server: Server) -> None:
    await server.create_user("staff@example.com")
    for _ in range(5):
        assert_error(await login_reply(server, "staff@example.com", "wrong-password"), 401, "unauthorized")

    # even the right password is refused now, with a hint when to try again
    reply = await login_reply(server, "STAFF@example.com", STAFF_PASSWORD)
    error = assert_error(reply, 429, "rate_limited")
    retry_after = int(reply.headers["Retry-After"])
    assert 1 <= retry_after <= 15 * 60
    assert error["details"] == {"retry_after_s": retry_after}

    # other accounts from the same address are not locked; existing tokens keep working
    assert (await login_reply(server, ADMIN_EMAIL, server.admin_password)).status == 200
    assert (await server.ok("GET", "/api/me"))["email"] == ADMIN_EMAIL


async def test_a_successful_login_resets_the_account_counter(server: Server) -> None:
    await server.create_user("staff@example.com")
    for _ in range(4):
        assert_error(await login_reply(server, "staff@example.com", "wrong-password"), 401, "unauthorized")
    assert (await login_reply(server, "staff@example.com", STAFF_PASSWORD)).status == 200

    for _ in range(5):  # five more failures are allowed after the reset
        assert_error(await login_reply(server, "staff@example.com", "wrong-password"), 401, "unauthorized")
    assert_error(await login_reply(server, "staff@example.com", STAFF_PASSWORD), 429, "rate_limited")


async def test_thirty_failed_logins_from_one_address_block_it(make_server: ServerFactory, tmp_path: Path) -> None:
    # The limiter does not depend on the database, so one backend is enough (30 argon2 checks are not free).
    server = await make_server(f"sqlite+aiosqlite:///{tmp_path / 'address.db'}")
    await server.create_user("staff@example.com")
    # X-Forwarded-For is not trusted unless configured: varying it does not spread the failures out
    replies = await asyncio.gather(
        *(
            login_reply(
                server, f"guess{i}@example.com", "wrong-password", headers={"X-Forwarded-For": f"203.0.113.{i}"}
            )
            for i in range(30)
        )
    )
    for reply in replies:
        assert_error(reply, 401, "unauthorized")

    # every account is refused from this address now, right password or not
    for email, password in (("staff@example.com", STAFF_PASSWORD), (ADMIN_EMAIL, server.admin_password)):
        reply = await login_reply(server, email, password, headers={"X-Forwarded-For": "198.51.100.1"})
        assert_error(reply, 429, "rate_limited")
        assert 1 <= int(reply.headers["Retry-After"]) <= 15 * 60
    # tokens given out before keep working
    assert (await server.ok("GET", "/api/me"))["email"] == ADMIN_EMAIL


async def test_trusted_forwarded_address_is_limited_per_client(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server(f"sqlite+aiosqlite:///{tmp_path / 'fwd.db'}", WAMD_TRUST_FORWARDED="true")
    await server.create_user("staff@example.com")
    attacker = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    replies = await asyncio.gather(
        *(login_reply(server, f"guess{i}@example.com", "wrong-password", headers=attacker) for i in range(30))
    )
    for reply in replies:
        assert_error(reply, 401, "unauthorized")
    assert_error(await login_reply(server, "staff@example.com", STAFF_PASSWORD, headers=attacker), 429, "rate_limited")

    other = {"X-Forwarded-For": "198.51.100.4"}
    assert (await login_reply(server, "staff@example.com", STAFF_PASSWORD, headers=other)).status == 200


async def test_login_limits_are_shared_through_redis(
    make_server: ServerFactory, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Two API processes on one Redis count failures together (the scaled deployment)."""
    truncate_all(pg_url)
    first = await make_server(pg_url, redis_url=redis_url, WAMD_TRUST_FORWARDED="true")
    second = await make_server(
        f"sqlite+aiosqlite:///{tmp_path / 'second.db'}", redis_url=redis_url, WAMD_TRUST_FORWARDED="true"
    )
    email = f"shared-{secrets.token_hex(4)}@example.com"
    address = f"test-{secrets.token_hex(6)}"
    client = {"X-Forwarded-For": address}
    try:
        for server in (first, second):
            await server.create_user(email)
        for server in (first, first, first, second, second):
            assert_error(await login_reply(server, email, "wrong-password", headers=client), 401, "unauthorized")
        for server in (first, second):
            reply = await login_reply(server, email, STAFF_PASSWORD, headers=client)
            assert_error(reply, 429, "rate_limited")
            assert 1 <= int(reply.headers["Retry-After"]) <= 15 * 60
    finally:
        with redis_sync.Redis.from_url(redis_url) as redis:
            redis.delete(f"wamd:rl:login:account:{email}", f"wamd:rl:login:address:{address}")


async def test_bad_login_bodies_do_not_count_as_failures(server: Server) -> None:
    await server.create_user("staff@example.com")
    for _ in range(8):
        reply = await server.call("POST", "/api/auth/login", json={"email": "staff@example.com"})
        assert_error(reply, 400, "invalid_input")
    assert (await login_reply(server, "staff@example.com", STAFF_PASSWORD)).status == 200


# --- what is stored --------------------------------------------------------------------------------------


async def test_passwords_are_stored_argon2id_hashed(server: Server) -> None:
    await server.create_user("staff@example.com", password="a-secret-password")
    async with engine_of(server).connect() as conn:
        rows = (await conn.execute(select(users.c.email, users.c.password_hash))).all()
    assert {email for email, _ in rows} == {ADMIN_EMAIL, "staff@example.com"}
    for email, password_hash in rows:
        assert password_hash.startswith("$argon2id$"), email
    hashes = " ".join(h for _, h in rows)
    assert "a-secret-password" not in hashes and server.admin_password not in hashes


async def test_tokens_are_stored_only_as_sha256_digests(server: Server) -> None:
    _, staff_token = await server.create_user("staff@example.com")
    raw_tokens = [server.admin_token, staff_token]
    async with engine_of(server).connect() as conn:
        rows = (await conn.execute(select(api_tokens))).mappings().all()
    stored = repr([dict(r) for r in rows])
    for token in raw_tokens:
        assert token not in stored
    digests = {r["token_hash"] for r in rows}
    assert {hashlib.sha256(t.encode()).hexdigest() for t in raw_tokens} <= digests
