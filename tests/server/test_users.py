"""User administration: create, list (paged), change, deactivate, delete, and the last-admin rules."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from tests.conftest import ADMIN_EMAIL, EVENT_TIMEOUT, Reply, Server
from wamd_server.infra.db.tables import users

STAFF_PASSWORD = "staff-pass-123"


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The JSON error envelope with this status and code; returns the `error` object."""
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


async def all_users(server: Server, token: str | None = None) -> list[dict[str, Any]]:
    page = await server.ok("GET", "/api/users?limit=1000", token)
    assert page["next_cursor"] is None
    items: list[dict[str, Any]] = page["items"]
    return items


async def admin_id(server: Server) -> str:
    me: dict[str, Any] = await server.ok("GET", "/api/me")
    return str(me["id"])


async def test_admin_creates_reads_and_changes_a_user(server: Server) -> None:
    created = await server.ok(
        "POST", "/api/users", json={"email": "Ana@Example.com", "password": STAFF_PASSWORD, "name": " Ana "}
    )
    assert created["email"] == "ana@example.com"
    assert (created["name"], created["role"], created["is_active"]) == ("Ana", "staff", True)
    assert created["last_login_at"] is None
    assert "password" not in created and "password_hash" not in created

    assert await server.ok("GET", f"/api/users/{created['id']}") == created
    assert created in await all_users(server)

    token = await server.login("ana@example.com", STAFF_PASSWORD)
    renamed = await server.ok("PATCH", f"/api/users/{created['id']}", json={"name": "Ana B"})
    assert (renamed["name"], renamed["email"], renamed["role"]) == ("Ana B", "ana@example.com", "staff")
    assert renamed["last_login_at"] is not None
    # a change of name keeps the user's sessions
    assert (await server.ok("GET", "/api/me", token))["name"] == "Ana B"

    promoted = await server.ok("PATCH", f"/api/users/{created['id']}", json={"role": "admin"})
    assert promoted["role"] == "admin"
    assert (await server.ok("GET", "/api/users", token))["items"]  # now an admin route works for them


async def test_emails_are_unique_ignoring_case(server: Server) -> None:
    await server.create_user("staff@example.com")
    before = await all_users(server)
    for email in ("staff@example.com", "STAFF@example.com", " Staff@Example.COM ", ADMIN_EMAIL.upper()):
        reply = await server.call(
            "POST", "/api/users", server.admin_token, json={"email": email, "password": "another-pass-1"}
        )
        assert_error(reply, 409, "conflict")
    assert await all_users(server) == before
    # the original password still works: the duplicate did not overwrite anything
    await server.login("staff@example.com", STAFF_PASSWORD)


async def test_deactivating_a_user_revokes_tokens_closes_sockets_and_blocks_login(server: Server) -> None:
    staff_id, token = await server.create_user("staff@example.com")
    other_token = await server.login("staff@example.com", STAFF_PASSWORD)
    ws = await server.ws(token)

    updated = await server.ok("PATCH", f"/api/users/{staff_id}", json={"is_active": False})
    assert updated["is_active"] is False
    for t in (token, other_token):
        assert_error(await server.call("GET", "/api/me", t), 401, "unauthorized")
    await asyncio.wait_for(ws.closed.wait(), EVENT_TIMEOUT)
    assert ws.ws.close_code == 4001
    reply = await server.call(
        "POST", "/api/auth/login", json={"email": "staff@example.com", "password": STAFF_PASSWORD}
    )
    assert_error(reply, 401, "unauthorized")

    await server.ok("PATCH", f"/api/users/{staff_id}", json={"is_active": True})
    new_token = await server.login("staff@example.com", STAFF_PASSWORD)
    assert (await server.ok("GET", "/api/me", new_token))["id"] == staff_id
    assert_error(await server.call("GET", "/api/me", token), 401, "unauthorized")  # old ones stay revoked


async def test_changing_a_password_revokes_tokens(server: Server) -> None:
    staff_id, token = await server.create_user("staff@example.com")
    await server.ok("PATCH", f"/api/users/{staff_id}", json={"password": "a-new-password"})

    assert_error(await server.call("GET", "/api/me", token), 401, "unauthorized")
    old = await server.call("POST", "/api/auth/login", json={"email": "staff@example.com", "password": STAFF_PASSWORD})
    assert_error(old, 401, "unauthorized")
    new_token = await server.login("staff@example.com", "a-new-password")
    assert (await server.ok("GET", "/api/me", new_token))["id"] == staff_id
    # other users' sessions are untouched
    assert (await server.ok("GET", "/api/me"))["email"] == ADMIN_EMAIL


async def test_deleting_a_user_ends_their_sessions(server: Server) -> None:
    staff_id, token = await server.create_user("staff@example.com")
    device = await server.create_device("Granted")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [device["id"]]})

    assert await server.ok("DELETE", f"/api/users/{staff_id}") == {"ok": True}
    assert_error(await server.call("GET", "/api/me", token), 401, "unauthorized")
    assert_error(await server.call("GET", f"/api/users/{staff_id}", server.admin_token), 404, "not_found")
    assert_error(await server.call("DELETE", f"/api/users/{staff_id}", server.admin_token), 404, "not_found")
    assert [u["email"] for u in await all_users(server)] == [ADMIN_EMAIL]
    # the device stays; only the grant went with the user
    assert (await server.ok("GET", f"/api/devices/{device['id']}"))["name"] == "Granted"
    # the email can be used again
    await server.create_user("staff@example.com")


async def test_the_only_admin_cannot_be_demoted_deactivated_or_deleted(server: Server) -> None:
    me = await admin_id(server)
    before = await all_users(server)
    for method, body in (("PATCH", {"role": "staff"}), ("PATCH", {"is_active": False}), ("DELETE", None)):
        reply = await server.call(method, f"/api/users/{me}", server.admin_token, json=body)
        assert_error(reply, 409, "conflict")
    assert await all_users(server) == before
    assert (await server.ok("GET", "/api/me"))["role"] == "admin"  # the admin's token still works


async def test_an_admin_cannot_delete_themselves(server: Server) -> None:
    second_id, second_token = await server.create_user("second@example.com", role="admin")
    me = await admin_id(server)

    error = assert_error(await server.call("DELETE", f"/api/users/{me}", server.admin_token), 409, "conflict")
    assert "own" in error["message"]
    assert await server.ok("GET", "/api/me")

    # another admin may delete them; then the remaining admin is the last one
    assert await server.ok("DELETE", f"/api/users/{me}", second_token) == {"ok": True}
    assert_error(await server.call("GET", "/api/me", server.admin_token), 401, "unauthorized")
    for method, body in (("PATCH", {"role": "staff"}), ("PATCH", {"is_active": False}), ("DELETE", None)):
        reply = await server.call(method, f"/api/users/{second_id}", second_token, json=body)
        assert_error(reply, 409, "conflict")
    assert [(u["email"], u["role"]) for u in await all_users(server, second_token)] == [("second@example.com", "admin")]


async def test_an_admin_may_be_demoted_or_deactivated_while_another_remains(server: Server) -> None:
    second_id, second_token = await server.create_user("second@example.com", role="admin")
    me = await admin_id(server)

    demoted = await server.ok("PATCH", f"/api/users/{second_id}", json={"role": "staff"})
    assert demoted["role"] == "staff"
    assert_error(await server.call("GET", "/api/users", second_token), 403, "forbidden")  # applies at once
    assert_error(
        await server.call("PATCH", f"/api/users/{me}", server.admin_token, json={"role": "staff"}), 409, "conflict"
    )

    await server.ok("PATCH", f"/api/users/{second_id}", json={"role": "admin"})
    deactivated = await server.ok("PATCH", f"/api/users/{second_id}", json={"is_active": False})
    assert deactivated["is_active"] is False
    reply = await server.call("PATCH", f"/api/users/{me}", server.admin_token, json={"is_active": False})
    assert_error(reply, 409, "conflict")


async def test_an_inactive_admin_can_be_demoted_and_deleted(server: Server) -> None:
    """Only active admins keep the server administrable; an inactive one is no 'last active admin'."""
    second_id, _ = await server.create_user("second@example.com", role="admin")
    await server.ok("PATCH", f"/api/users/{second_id}", json={"is_active": False})

    demoted = await server.ok("PATCH", f"/api/users/{second_id}", json={"role": "staff"})
    assert (demoted["role"], demoted["is_active"]) == ("staff", False)
    await server.ok("PATCH", f"/api/users/{second_id}", json={"role": "admin"})
    assert await server.ok("DELETE", f"/api/users/{second_id}") == {"ok": True}
    assert [u["email"] for u in await all_users(server)] == [ADMIN_EMAIL]


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(server: Server) -> None:
    """The last-admin rule must hold under concurrency: the check and the change are one step."""
    second_id, second_token = await server.create_user("second@example.com", role="admin")
    me = await admin_id(server)
    tokens = {me: server.admin_token, second_id: second_token}

    for round_ in range(10):  # a race: give it a few chances to show
        first, second = await asyncio.gather(
            server.call("PATCH", f"/api/users/{second_id}", server.admin_token, json={"role": "staff"}),
            server.call("PATCH", f"/api/users/{me}", second_token, json={"role": "staff"}),
        )
        assert server.runtime.engine is not None
        async with server.runtime.engine.connect() as conn:
            roles = {str(uid): role for uid, role in (await conn.execute(select(users.c.id, users.c.role))).all()}
        admins = [uid for uid, role in roles.items() if role == "admin"]
        assert admins, f"round {round_}: both demotions went through ({first.status}, {second.status}); no admin left"
        statuses = sorted([first.status, second.status])  # 403: the loser was no admin any more when it got in
        assert statuses in ([200, 403], [200, 409], [409, 409]), (first.body, second.body)
        for uid in (me, second_id):  # make both admins again for the next round
            if uid not in admins:
                await server.ok("PATCH", f"/api/users/{uid}", tokens[admins[0]], json={"role": "admin"})


async def test_users_pages_walk_every_user_exactly_once(server: Server) -> None:
    created = await asyncio.gather(*(server.create_user(f"user{i}@example.com") for i in range(7)))
    expected = {uid for uid, _ in created} | {await admin_id(server)}

    first_page = await server.ok("GET", "/api/users")  # default limit 100: everything, and no next page
    assert {u["id"] for u in first_page["items"]} == expected
    assert first_page["next_cursor"] is None

    for limit in (1, 3, 4, 8):
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            query = f"/api/users?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            page = await server.ok("GET", query)
            assert len(page["items"]) <= limit
            seen += [u["id"] for u in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages <= len(expected) + 1, "pagination does not end"
        assert sorted(seen) == sorted(expected), limit  # each once
        assert len(seen) == len(set(seen))


async def test_grants_can_be_set_and_read(server: Server) -> None:
    staff_id, token = await server.create_user("staff@example.com")
    devices = [await server.create_device(f"Phone {i}") for i in range(3)]
    ids = sorted(d["id"] for d in devices)

    assert await server.ok("GET", f"/api/users/{staff_id}/devices") == {"device_ids": []}
    put = await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [ids[0], ids[2], ids[0]]})
    assert put == {"device_ids": sorted([ids[0], ids[2]])}
    assert await server.ok("GET", f"/api/users/{staff_id}/devices") == put
    assert (await server.ok("GET", "/api/me", token))["device_ids"] == put["device_ids"]

    # an unknown device id rejects the whole change
    unknown = "00000000-0000-4000-8000-000000000000"
    reply = await server.call(
        "PUT", f"/api/users/{staff_id}/devices", server.admin_token, json={"device_ids": [ids[1], unknown]}
    )
    error = assert_error(reply, 400, "invalid_input")
    assert unknown in str(error.get("details"))
    assert await server.ok("GET", f"/api/users/{staff_id}/devices") == put

    assert await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": []}) == {"device_ids": []}
    assert (await server.ok("GET", "/api/devices", token))["items"] == []
