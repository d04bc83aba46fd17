"""Who sees what: staff see only granted devices, other devices do not exist for them, admins see all."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.conftest import EVENT_TIMEOUT, Reply, Server, WsClient

NOT_FOUND = {"error": {"code": "not_found", "message": "device not found"}}


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The JSON error envelope with this status and code; returns the `error` object."""
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


async def device_ids(server: Server, token: str | None = None) -> list[str]:
    page = await server.ok("GET", "/api/devices?limit=1000", token)
    assert page["next_cursor"] is None
    return [d["id"] for d in page["items"]]


async def all_devices_as_admin(server: Server) -> list[dict[str, Any]]:
    page = await server.ok("GET", "/api/devices?limit=1000")
    items: list[dict[str, Any]] = page["items"]
    return items


def device_routes(device_id: str) -> list[tuple[str, str, Any]]:
    """Every device route, with a body that would be valid."""
    base = f"/api/devices/{device_id}"
    return [
        ("GET", base, None),
        ("PATCH", base, {"name": "Taken over", "hourly_cap": 5}),
        ("DELETE", base, None),
        ("POST", f"{base}/pair", {"method": "qr"}),
        ("POST", f"{base}/pair", {"method": "code", "phone": "60123000099"}),
        ("GET", f"{base}/qr", None),
        ("POST", f"{base}/logout", None),
        ("POST", f"{base}/refresh", None),
    ]


async def test_staff_see_only_granted_devices_and_admins_see_all(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    _, other_staff = await server.create_user("other@example.com")
    devices = [await server.create_device(f"Phone {i}") for i in range(4)]
    granted = [devices[1]["id"], devices[3]["id"]]
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": granted})

    assert await device_ids(server, staff) == granted  # in creation order
    assert await device_ids(server, other_staff) == []
    assert await device_ids(server) == [d["id"] for d in devices]
    assert (await server.ok("GET", "/api/me", staff))["device_ids"] == sorted(granted)

    seen = await server.ok("GET", f"/api/devices/{granted[0]}", staff)
    assert seen == await server.ok("GET", f"/api/devices/{granted[0]}")

    # staff may rename and pace a granted device
    patched = await server.ok("PATCH", f"/api/devices/{granted[0]}", staff, json={"name": "Mine", "hourly_cap": 20})
    assert (patched["name"], patched["hourly_cap"]) == ("Mine", 20)

    # revoking the grant hides the device again
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted[1]]})
    assert await device_ids(server, staff) == [granted[1]]
    assert (await server.call("GET", f"/api/devices/{granted[0]}", staff)).body == NOT_FOUND


async def test_another_users_device_is_404_on_every_device_route(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    mine = await server.create_device("Mine")
    hidden = await server.create_device("Hidden")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [mine["id"]]})
    before = await all_devices_as_admin(server)

    for method, path, body in device_routes(hidden["id"]):
        reply = await server.call(method, path, staff, json=body)
        assert reply.status == 404, (method, path, reply.status, reply.body)
        # exactly what a device that does not exist answers: no hint that it exists
        unknown = await server.call(method, path.replace(hidden["id"], str(uuid.uuid4())), staff, json=body)
        assert reply.body == unknown.body == NOT_FOUND, (method, path, reply.body, unknown.body)

    assert await all_devices_as_admin(server) == before
    assert (await server.ok("GET", f"/api/devices/{hidden['id']}"))["status"] == "unpaired"
    assert await server.sim("GET", "/stats") is not None


async def test_a_bad_body_on_a_hidden_device_still_answers_404(server: Server) -> None:
    _, staff = await server.create_user("staff@example.com")
    hidden = await server.create_device("Hidden")
    for method, suffix in (("PATCH", ""), ("POST", "/pair")):
        reply = await server.call(method, f"/api/devices/{hidden['id']}{suffix}", staff, json={"bogus": 1})
        assert reply.body == NOT_FOUND, (method, suffix, reply.body)


async def test_staff_who_create_a_device_are_granted_it(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    _, other_staff = await server.create_user("other@example.com")
    admin_device = await server.create_device("Admin's")

    created = await server.create_device("Staff's", token=staff)
    assert created["status"] == "unpaired"
    assert await device_ids(server, staff) == [created["id"]]
    assert (await server.ok("GET", "/api/me", staff))["device_ids"] == [created["id"]]
    assert await server.ok("GET", f"/api/users/{staff_id}/devices") == {"device_ids": [created["id"]]}
    assert await device_ids(server, other_staff) == []
    assert await device_ids(server) == [admin_device["id"], created["id"]]  # admins see all devices

    assert (await server.ok("GET", f"/api/devices/{created['id']}", staff))["name"] == "Staff's"
    assert (await server.call("GET", f"/api/devices/{created['id']}", other_staff)).body == NOT_FOUND


async def test_only_admins_delete_devices(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    granted = await server.create_device("Granted")
    hidden = await server.create_device("Hidden")
    own = await server.create_device("Own", token=staff)
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"], own["id"]]})
    before = await all_devices_as_admin(server)

    for device in (granted, own):  # granted, even self-created: forbidden, and the device stays
        assert_error(await server.call("DELETE", f"/api/devices/{device['id']}", staff), 403, "forbidden")
    assert (await server.call("DELETE", f"/api/devices/{hidden['id']}", staff)).body == NOT_FOUND
    assert await all_devices_as_admin(server) == before

    assert await server.ok("DELETE", f"/api/devices/{granted['id']}") == {"ok": True}
    assert await device_ids(server, staff) == [own["id"]]
    assert (await server.ok("GET", "/api/me", staff))["device_ids"] == [own["id"]]
    assert (await server.call("GET", f"/api/devices/{granted['id']}", server.admin_token)).body == NOT_FOUND
    assert (await server.call("DELETE", f"/api/devices/{granted['id']}", server.admin_token)).body == NOT_FOUND


async def test_user_administration_is_for_admins_only(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    device = await server.create_device("Phone")
    users_before = (await server.ok("GET", "/api/users"))["items"]
    grants_before = await server.ok("GET", f"/api/users/{staff_id}/devices")

    admin_id = (await server.ok("GET", "/api/me"))["id"]
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/api/users", None),
        ("POST", "/api/users", {"email": "new@example.com", "password": "new-password-1"}),
        ("POST", "/api/users", {"email": "boss@example.com", "password": "new-password-1", "role": "admin"}),
    ]
    for target in (staff_id, admin_id, str(uuid.uuid4())):
        calls += [
            ("GET", f"/api/users/{target}", None),
            ("PATCH", f"/api/users/{target}", {"role": "admin"}),
            ("PATCH", f"/api/users/{target}", {"password": "taken-over-1"}),
            ("DELETE", f"/api/users/{target}", None),
            ("GET", f"/api/users/{target}/devices", None),
            ("PUT", f"/api/users/{target}/devices", {"device_ids": [device["id"]]}),
        ]
    calls += [("POST", "/api/sim/reset", None), ("GET", "/api/sim/stats", None)]  # the simulator control too
    for method, path, body in calls:
        assert_error(await server.call(method, path, staff, json=body), 403, "forbidden")

    assert (await server.ok("GET", "/api/users"))["items"] == users_before
    assert await server.ok("GET", f"/api/users/{staff_id}/devices") == grants_before
    assert (await server.ok("GET", "/api/me", staff))["role"] == "staff"


async def test_device_pages_walk_every_visible_device_exactly_once(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    devices = [(await server.create_device(f"Phone {i:02}"))["id"] for i in range(11)]
    granted = devices[::2]
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": granted})

    page = await server.ok("GET", "/api/devices")  # default limit (100) holds everything
    assert ([d["id"] for d in page["items"]], page["next_cursor"]) == (devices, None)

    for token, expected in ((server.admin_token, devices), (staff, granted)):
        for limit in (1, 2, 3, 6, len(expected)):
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(len(expected) + 2):
                query = f"/api/devices?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
                page = await server.ok("GET", query, token)
                assert len(page["items"]) <= limit
                seen += [d["id"] for d in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert cursor is None, "pagination does not end"
            assert seen == expected, (limit, token == staff)


async def drain_until(ws: WsClient, event_type: str, device_id: str) -> list[dict[str, Any]]:
    """Every event received up to and including the first `event_type` of `device_id`."""
    received = []
    while True:
        message = await asyncio.wait_for(ws.events.get(), EVENT_TIMEOUT)
        received.append(message["event"])
        if message["event"]["type"] == event_type and message["event"].get("device_id") == device_id:
            return received


async def test_websocket_events_reach_only_users_who_may_see_the_device(server: Server) -> None:
    staff_id, staff = await server.create_user("staff@example.com")
    hidden = await server.create_device("Hidden")
    granted = await server.create_device("Granted")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"]]})
    admin_ws = await server.ws()
    staff_ws = await server.ws(staff)

    # a subscription to a device one may not see is refused like an unknown device
    answer = await staff_ws.command("subscribe_events", device_id=hidden["id"])
    assert (answer["success"], answer["error"]["code"]) == (False, "not_found")

    await server.ok("POST", f"/api/devices/{hidden['id']}/pair", json={"method": "qr"})
    hidden_qr = await admin_ws.wait_event("device.qr", hidden["id"])
    # events are fanned out in order, so anything of the hidden device would arrive before this one
    await server.ok("POST", f"/api/devices/{granted['id']}/pair", json={"method": "qr"})
    received = await drain_until(staff_ws, "device.qr", granted["id"])
    assert {e.get("device_id") for e in received} == {granted["id"]}, received

    # a device created by the staff user is theirs at once, also on an open socket
    own = await server.create_device("Own", token=staff)
    await server.ok("POST", f"/api/devices/{own['id']}/pair", staff, json={"method": "qr"})
    received = await drain_until(staff_ws, "device.qr", own["id"])
    assert {e.get("device_id") for e in received} <= {granted["id"], own["id"]}, received

    # and a new grant applies to the open socket too
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [hidden["id"]]})
    await server.sim("POST", "/scan", {"qr": hidden_qr["code"], "phone": "60123000031"})
    received = await drain_until(staff_ws, "device.paired", hidden["id"])
    assert received[-1]["phone"] == "60123000031"


async def test_deleting_the_device_a_cursor_points_at_does_not_end_the_walk(server: Server) -> None:
    devices = [(await server.create_device(f"Phone {i}"))["id"] for i in range(6)]
    first = await server.ok("GET", "/api/devices?limit=2")
    assert [d["id"] for d in first["items"]] == devices[:2]
    await server.ok("DELETE", f"/api/devices/{devices[1]}")  # the last device of the page, the cursor's anchor

    seen: list[str] = []
    cursor = first["next_cursor"]
    for _ in range(len(devices)):
        page = await server.ok("GET", f"/api/devices?limit=2&cursor={cursor}")
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == devices[2:]


async def test_device_pages_default_to_100_and_allow_up_to_1000(server: Server) -> None:
    created = await asyncio.gather(*(server.create_device(f"Phone {i:03}") for i in range(101)))
    ids = {d["id"] for d in created}

    first = await server.ok("GET", "/api/devices")
    assert len(first["items"]) == 100 and first["next_cursor"] is not None
    rest = await server.ok("GET", f"/api/devices?cursor={first['next_cursor']}")
    assert (len(rest["items"]), rest["next_cursor"]) == (1, None)
    assert {d["id"] for d in first["items"] + rest["items"]} == ids

    everything = await server.ok("GET", "/api/devices?limit=1000")
    assert ({d["id"] for d in everything["items"]}, everything["next_cursor"]) == (ids, None)
