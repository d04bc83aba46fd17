"""The WebSocket API (`GET /api/ws`, DESIGN §4): authentication, commands, subscriptions, who sees which events,
and the bounded send queue that disconnects a client which cannot keep up."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import EVENT_TIMEOUT, Server, WsClient
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol.events import EVENT_TYPES
from wamd_server.web import hub as hub_module
from wamd_server.web import ws as ws_module
from wamd_server.web.hub import OVERFLOW_CLOSE_CODE, SEND_QUEUE

CONTACT = "60199000001"


# --- helpers ---------------------------------------------------------------------------------------------


async def raw_socket(server: Server) -> aiohttp.ClientWebSocketResponse:
    return await server.http.ws_connect(server.url + "/api/ws")


async def authed_socket(server: Server, token: str | None = None) -> aiohttp.ClientWebSocketResponse:
    ws = await raw_socket(server)
    await ws.send_json({"type": "auth", "token": token or server.admin_token})
    assert (await ws.receive_json(timeout=EVENT_TIMEOUT))["type"] == "auth_ok"
    return ws


async def expect_closed(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server closes; returns the close code the client saw."""
    while True:
        msg = await ws.receive(timeout=EVENT_TIMEOUT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code


async def collect_until(
    client: WsClient,
    stop: Callable[[dict[str, Any]], bool],
    timeout: float = EVENT_TIMEOUT,
    envelope: Callable[[dict[str, Any]], bool] = lambda m: True,
) -> list[dict[str, Any]]:
    """Every event message (envelope included) up to and including the first whose event matches `stop`
    (and whose envelope matches `envelope`)."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = await client.events.get()
            seen.append(message)
            if stop(message["event"]) and envelope(message):
                return seen


def is_event(event_type: str, device_id: str | None = None, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        if event["type"] != event_type or (device_id is not None and event.get("device_id") != device_id):
            return False
        return all(event.get(k) == v for k, v in fields.items())

    return match


async def publish(server: Server, event_type: str, data: dict[str, Any], **scope: Any) -> None:
    assert server.runtime.bus is not None
    await server.runtime.bus.publish(BusEvent(event_type, data, **scope))


async def marker(
    server: Server, device_id: str, *clients: WsClient, subscription: int | None = None
) -> list[list[dict[str, Any]]]:
    """Publish one marker event for a device the clients see; returns what each client got up to it.

    Every socket receives events in bus order, so once the marker arrives nothing published before it is
    still on its way: what is missing from a returned list was never sent to that client. With several
    subscriptions matching the marker, `subscription` names the last one (the one that receives it last).
    """
    tag = uuid.uuid4().hex
    await publish(
        server,
        "device.status",
        {"device_id": device_id, "status": "offline", "tag": tag},
        device_id=uuid.UUID(device_id),
    )
    return [
        await collect_until(
            client,
            lambda e: e.get("tag") == tag,
            envelope=lambda m: subscription is None or m["id"] == subscription,
        )
        for client in clients
    ]


async def send_contact_message(server: Server, to_phone: str, text: str) -> str:
    answer = await server.sim("POST", "/send", {"from_phone": CONTACT, "to_phone": to_phone, "text": text})
    return str(answer["wa_id"])


# --- authentication ----------------------------------------------------------------------------------------


async def test_auth_with_a_valid_token_is_answered_auth_ok(server: Server) -> None:
    ws = await raw_socket(server)
    await ws.send_json({"type": "auth", "token": server.admin_token})
    first = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert first["type"] == "auth_ok"
    await ws.send_json({"id": 1, "type": "ping"})
    assert await ws.receive_json(timeout=EVENT_TIMEOUT) == {"id": 1, "type": "pong"}
    await ws.close()


@pytest.mark.parametrize(
    "first_message",
    [
        {"type": "auth", "token": "not-a-token"},
        {"type": "auth", "token": ""},
        {"type": "auth"},
        {"id": 1, "type": "ping"},
        {"id": 1, "type": "subscribe_events"},
        "this is not json",
    ],
    ids=["bad-token", "empty-token", "no-token", "ping-first", "subscribe-first", "not-json"],
)
async def test_bad_first_message_is_answered_auth_invalid_and_closed(server: Server, first_message: Any) -> None:
    ws = await raw_socket(server)
    if isinstance(first_message, str):
        await ws.send_str(first_message)
    else:
        await ws.send_json(first_message)
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer["type"] == "auth_invalid"
    assert answer["message"]
    assert await expect_closed(ws) == 4001


async def test_a_logged_out_token_is_refused(server: Server) -> None:
    _, token = await server.create_user("leaver@example.com")
    await server.ok("POST", "/api/auth/logout", token)
    ws = await raw_socket(server)
    await ws.send_json({"type": "auth", "token": token})
    assert (await ws.receive_json(timeout=EVENT_TIMEOUT))["type"] == "auth_invalid"
    assert await expect_closed(ws) == 4001


async def test_silence_after_connecting_times_out(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_module, "AUTH_TIMEOUT_S", 0.3)
    ws = await raw_socket(server)
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer == {"type": "auth_invalid", "message": "authentication timed out"}
    assert await expect_closed(ws) == 4001


# --- commands ----------------------------------------------------------------------------------------------


async def test_ping_unknown_command_and_invalid_json(server: Server) -> None:
    ws = await authed_socket(server)

    await ws.send_json({"id": 7, "type": "ping"})
    assert await ws.receive_json(timeout=EVENT_TIMEOUT) == {"id": 7, "type": "pong"}

    await ws.send_json({"id": 8, "type": "make_coffee"})
    answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
    assert answer["id"] == 8 and answer["type"] == "result" and answer["success"] is False
    assert answer["error"]["code"] == "unknown_command"
    assert "make_coffee" in answer["error"]["message"]

    for garbage in ("{not json", "[1, 2]", '{"type": "ping"}', '{"id": "x", "type": "ping"}', '{"id": 3}'):
        await ws.send_str(garbage)
        answer = await ws.receive_json(timeout=EVENT_TIMEOUT)
        assert answer["type"] == "result" and answer["success"] is False, garbage
        assert answer["error"]["code"] == "invalid_message", garbage
        assert answer["error"]["message"], garbage

    # still usable
    await ws.send_json({"id": 9, "type": "ping"})
    assert await ws.receive_json(timeout=EVENT_TIMEOUT) == {"id": 9, "type": "pong"}
    await ws.close()


async def test_subscribe_and_unsubscribe_results(server: Server) -> None:
    client = await server.ws(subscribe=False)

    ok = await client.command("subscribe_events")
    assert ok == {"id": ok["id"], "type": "result", "success": True, "result": None}

    same_id = ok["id"]
    await client.ws.send_json({"id": same_id, "type": "subscribe_events"})  # the id of a live subscription
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    client.results[same_id] = future
    dup = await asyncio.wait_for(future, EVENT_TIMEOUT)
    assert dup["success"] is False and dup["error"]["code"] == "invalid_input"

    unknown = await client.command("subscribe_events", event_types=["device.status", "device.exploded"])
    assert unknown["success"] is False
    assert unknown["error"]["code"] == "invalid_input"
    assert "device.exploded" in unknown["error"]["message"]

    bad_shape = await client.command("subscribe_events", event_types="device.status")
    assert bad_shape["success"] is False and bad_shape["error"]["code"] == "invalid_input"

    missing = await client.command("subscribe_events", device_id=str(uuid.uuid4()))
    assert missing["success"] is False and missing["error"]["code"] == "not_found"
    not_uuid = await client.command("subscribe_events", device_id="phone-1")
    assert not_uuid["success"] is False and not_uuid["error"]["code"] == "not_found"

    gone = await client.command("unsubscribe_events", subscription=9999)
    assert gone["success"] is False and gone["error"]["code"] == "not_found"
    no_arg = await client.command("unsubscribe_events")
    assert no_arg["success"] is False and no_arg["error"]["code"] == "invalid_input"

    done = await client.command("unsubscribe_events", subscription=ok["id"])
    assert done["success"] is True
    again = await client.command("unsubscribe_events", subscription=ok["id"])
    assert again["success"] is False and again["error"]["code"] == "not_found"


DOCUMENTED_EVENT_TYPES = [
    "device.status",
    "device.qr",
    "device.paired",
    "device.logged_out",
    "message.new",
    "message.status",
    "chat.updated",
    "campaign.progress",
    "sequence.progress",
    "leads.import.progress",
]


async def test_every_documented_event_type_can_be_subscribed(server: Server) -> None:
    assert set(EVENT_TYPES) == set(DOCUMENTED_EVENT_TYPES)
    client = await server.ws(subscribe=False)
    answer = await client.command("subscribe_events", event_types=DOCUMENTED_EVENT_TYPES)
    assert answer["success"] is True
    internal = await client.command("subscribe_events", event_types=["_access.changed"])
    assert internal["success"] is False and internal["error"]["code"] == "invalid_input"


# --- subscriptions and filters ------------------------------------------------------------------------------


async def test_events_carry_the_subscription_id_and_respect_filters(server: Server) -> None:
    device = await server.create_device("Filtered")
    other = await server.create_device("Other")
    watcher = await server.ws()  # everything, for pairing
    client = await server.ws(subscribe=False)
    everything = await client.subscribe()
    statuses = await client.subscribe(event_types=["device.status"])
    one_device = await client.subscribe(device_id=device["id"])
    messages_of_device = await client.subscribe(event_types=["message.new"], device_id=device["id"])
    assert len({everything, statuses, one_device, messages_of_device}) == 4

    await server.pair_by_qr(device["id"], "60123000101", watcher)
    wa_id = await send_contact_message(server, "60123000101", "hello there")
    await watcher.wait_event("message.new", device["id"])
    # something for the other device, then a marker: all earlier events have reached `client`
    await publish(
        server, "device.status", {"device_id": other["id"], "status": "offline"}, device_id=uuid.UUID(other["id"])
    )
    [got] = await marker(server, device["id"], client, subscription=one_device)

    by_sub: dict[int, list[dict[str, Any]]] = {}
    for message in got:
        assert message["type"] == "event"
        by_sub.setdefault(message["id"], []).append(message["event"])
    assert set(by_sub) <= {everything, statuses, one_device, messages_of_device}

    all_types = {e["type"] for e in by_sub[everything]}
    assert {"device.status", "device.qr", "device.paired", "message.new", "chat.updated"} <= all_types
    assert any(e["device_id"] == other["id"] for e in by_sub[everything])

    assert {e["type"] for e in by_sub[statuses]} == {"device.status"}
    assert any(e["device_id"] == other["id"] for e in by_sub[statuses])
    assert [e["status"] for e in by_sub[statuses] if e["device_id"] == device["id"]][:3] == [
        "pairing",
        "connecting",
        "online",
    ]

    assert {e["device_id"] for e in by_sub[one_device]} == {device["id"]}
    assert "device.qr" in {e["type"] for e in by_sub[one_device]}

    assert [(e["type"], e["message"]["wa_id"], e["message"]["text"]) for e in by_sub[messages_of_device]] == [
        ("message.new", wa_id, "hello there")
    ]


async def test_unsubscribed_events_stop(server: Server) -> None:
    device = await server.create_device("Quiet")
    device_uuid = uuid.UUID(device["id"])
    client = await server.ws(subscribe=False)
    keep = await client.subscribe(device_id=device["id"], event_types=["device.status"])
    drop = await client.subscribe(device_id=device["id"])

    await publish(server, "chat.updated", {"device_id": device["id"], "chat_jid": "a"}, device_id=device_uuid)
    [first] = await marker(server, device["id"], client, subscription=drop)
    assert {m["id"] for m in first if m["event"]["type"] == "chat.updated"} == {drop}

    assert (await client.command("unsubscribe_events", subscription=drop))["success"] is True
    await publish(server, "chat.updated", {"device_id": device["id"], "chat_jid": "b"}, device_id=device_uuid)
    [second] = await marker(server, device["id"], client)
    assert all(m["id"] == keep for m in second)
    assert [m["event"]["type"] for m in second] == ["device.status"]


# --- who sees what ------------------------------------------------------------------------------------------


async def test_staff_never_see_events_of_devices_not_granted_and_grants_apply_live(server: Server) -> None:
    staff_id, staff_token = await server.create_user("staff@example.com")
    granted = await server.create_device("Granted")
    hidden = await server.create_device("Hidden")
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"]]})

    admin = await server.ws()
    staff = await server.ws(staff_token)  # subscribed to everything it may see

    refused = await staff.command("subscribe_events", device_id=hidden["id"])
    assert refused["success"] is False and refused["error"]["code"] == "not_found"

    # The hidden device's whole life so far: QR codes, pairing, online, a message, a chat update.
    hidden_phone = "60123000201"
    await server.pair_by_qr(hidden["id"], hidden_phone, admin)
    await send_contact_message(server, hidden_phone, "secret")
    await admin.wait_event("message.new", hidden["id"])
    await admin.wait_event("chat.updated", hidden["id"])

    # The granted device pairs too (its events are the staff's positive control).
    await server.pair_by_qr(granted["id"], "60123000202", admin)
    seen = await collect_until(staff, is_event("device.status", granted["id"], status="online"))
    seen += (await marker(server, granted["id"], staff))[0]
    assert {m["event"]["device_id"] for m in seen} == {granted["id"]}
    assert {"device.qr", "device.paired", "device.status"} <= {m["event"]["type"] for m in seen}

    # Grant the hidden device: the open staff socket sees its events from now on, without reconnecting.
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"], hidden["id"]]})
    wa_id = await send_contact_message(server, hidden_phone, "now you see me")
    message = await staff.wait_event("message.new", hidden["id"])
    assert (message["message"]["wa_id"], message["message"]["text"]) == (wa_id, "now you see me")
    allowed = await staff.command("subscribe_events", device_id=hidden["id"])
    assert allowed["success"] is True
    await server.ok("POST", f"/api/devices/{hidden['id']}/logout")
    await staff.wait_event("device.logged_out", hidden["id"])
    await marker(server, granted["id"], staff)

    # Revoke it again: nothing more of it reaches the staff socket.
    await server.ok("PUT", f"/api/users/{staff_id}/devices", json={"device_ids": [granted["id"]]})
    await publish(
        server, "device.status", {"device_id": hidden["id"], "status": "offline"}, device_id=uuid.UUID(hidden["id"])
    )
    [after] = await marker(server, granted["id"], staff)
    assert {m["event"]["device_id"] for m in after} == {granted["id"]}


async def test_user_and_system_events_reach_only_whom_they_concern(server: Server) -> None:
    device = await server.create_device("Anchor")
    alice_id, alice_token = await server.create_user("alice@example.com")
    bob_id, bob_token = await server.create_user("bob@example.com")
    for user_id in (alice_id, bob_id):
        await server.ok("PUT", f"/api/users/{user_id}/devices", json={"device_ids": [device["id"]]})
    admin, alice, bob = await server.ws(), await server.ws(alice_token), await server.ws(bob_token)

    await publish(server, "leads.import.progress", {"done": 3, "total": 9}, user_id=uuid.UUID(alice_id))
    await publish(server, "campaign.progress", {"campaign_id": "c1", "done": 1})

    got = await marker(server, device["id"], alice, bob, admin)
    got_alice, got_bob, got_admin = ([m["event"]["type"] for m in messages] for messages in got)
    assert got_alice == ["leads.import.progress", "device.status"]
    assert got_bob == ["device.status"]
    assert "campaign.progress" in got_admin
    assert "leads.import.progress" not in got_admin  # a user's own progress is for that user


async def test_deactivating_a_user_closes_their_socket(server: Server) -> None:
    staff_id, staff_token = await server.create_user("gone@example.com")
    other_id, other_token = await server.create_user("stays@example.com")
    doomed = await server.ws(staff_token)
    stays = await server.ws(other_token)

    await server.ok("PATCH", f"/api/users/{staff_id}", json={"is_active": False})
    await asyncio.wait_for(doomed.closed.wait(), EVENT_TIMEOUT)
    assert doomed.ws.close_code == 4001
    assert (await stays.command("ping"))["type"] == "pong"

    # A deleted user is disconnected the same way; a new connection with the old token is refused.
    await server.ok("DELETE", f"/api/users/{other_id}")
    await asyncio.wait_for(stays.closed.wait(), EVENT_TIMEOUT)
    assert stays.ws.close_code == 4001
    ws = await raw_socket(server)
    await ws.send_json({"type": "auth", "token": other_token})
    assert (await ws.receive_json(timeout=EVENT_TIMEOUT))["type"] == "auth_invalid"


# --- a client that does not read -----------------------------------------------------------------------------


async def connections_metric(server: Server) -> int:
    text = (await server.call("GET", "/metrics")).body
    match = re.search(r"^wamd_ws_connections (\S+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match.group(1)))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = EVENT_TIMEOUT) -> None:
    """Poll `check` until it holds (for server-side state that announces itself to nobody)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


OVERFLOW_LOG = "cannot keep up"


async def flood_until_overflow(server: Server, fast: WsClient, device_id: str, caplog: pytest.LogCaptureFixture) -> int:
    """Publish big chat.updated events, each once the fast client got the previous one, until the server
    reports that the (other) client which stopped reading overflowed its send queue. Returns the count."""
    filler = "x" * 64 * 1024
    published = 0
    async with asyncio.timeout(60):
        while not any(OVERFLOW_LOG in r.getMessage() for r in caplog.records):
            assert published < 5000, "no overflow after 5000 events of 64 KiB"
            await publish(
                server,
                "chat.updated",
                {"device_id": device_id, "chat_jid": f"{published}@s.whatsapp.net", "filler": filler},
                device_id=uuid.UUID(device_id),
            )
            event = (await fast.events.get())["event"]
            assert event["chat_jid"] == f"{published}@s.whatsapp.net"
            published += 1
    assert published > SEND_QUEUE
    return published


async def slow_reader(server: Server) -> aiohttp.ClientWebSocketResponse:
    slow = await authed_socket(server)
    await slow.send_json({"id": 1, "type": "subscribe_events", "event_types": ["chat.updated"]})
    assert (await slow.receive_json(timeout=EVENT_TIMEOUT))["success"] is True
    return slow  # from here on it reads nothing: its TCP buffers fill, then its send queue


async def fast_keeps_receiving(server: Server, fast: WsClient, device_id: str) -> None:
    for n in range(10):
        await publish(
            server, "chat.updated", {"device_id": device_id, "chat_jid": f"after-{n}"}, device_id=uuid.UUID(device_id)
        )
    after = [(await fast.events.get())["event"]["chat_jid"] for _ in range(10)]
    assert after == [f"after-{n}" for n in range(10)]


async def test_a_client_that_does_not_keep_up_is_closed_with_4008_and_others_keep_receiving(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    device = await server.create_device("Busy")
    fast = await server.ws(event_types=["chat.updated"])
    slow = await slow_reader(server)
    caplog.set_level(logging.WARNING, logger="wamd_server.web.hub")

    published = await flood_until_overflow(server, fast, device["id"], caplog)
    await fast_keeps_receiving(server, fast, device["id"])

    # When the slow client reads again it finds part of the events, then the overflow close.
    received = 0
    async with asyncio.timeout(EVENT_TIMEOUT):
        async for msg in slow:
            if msg.type == aiohttp.WSMsgType.TEXT:
                received += 1
    assert 0 < received < published
    assert slow.close_code == OVERFLOW_CLOSE_CODE
    await eventually(lambda: _connections_are(server, 1))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _connections_are(server: Server, count: int) -> bool:
    return await connections_metric(server) == count


async def test_a_client_that_never_reads_again_is_dropped(
    server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "CLOSE_TIMEOUT_S", 0.5)
    device = await server.create_device("Stuck")
    fast = await server.ws(event_types=["chat.updated"])
    slow = await slow_reader(server)
    assert await connections_metric(server) == 2
    caplog.set_level(logging.WARNING, logger="wamd_server.web.hub")

    await flood_until_overflow(server, fast, device["id"], caplog)
    # The stuck client cannot even take the close frame; the server cuts it off and lets go of it.
    await eventually(lambda: _connections_are(server, 1))
    await fast_keeps_receiving(server, fast, device["id"])
    async with asyncio.timeout(EVENT_TIMEOUT):
        while (await slow.receive()).type not in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no "unhandled error on GET /api/ws"
