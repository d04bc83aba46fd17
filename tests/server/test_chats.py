"""Chats WhatsApp-Web style: chat list, history, manual sends through the outbox, reading."""

from __future__ import annotations

from typing import Any

from tests.conftest import Server, ServerFactory, WsClient, eventually
from tests.server.test_campaigns import linked_devices, make_leads
from wamd_server.sim.network import SimNetwork

PHONE = "60123000091"
CONTACT = "60198000091"


async def desk(server: Server) -> tuple[WsClient, dict[str, Any], SimNetwork]:
    """A device paired on PHONE (typing off, so a message goes out at once), its event socket and the network."""
    ws = await server.ws()
    device = await server.create_device("Desk")
    await server.pair_by_qr(device["id"], PHONE, ws)
    await server.ok("PATCH", f"/api/devices/{device['id']}", json={"typing": False})
    network = server.runtime.sim_network
    assert network is not None
    return ws, device, network


async def test_chat_list_history_send_and_read(server: Server) -> None:
    ws, device, network = await desk(server)
    incoming = await network.contact_send(CONTACT, PHONE, "Hello, is it available?", push_name="Aisyah")
    await ws.wait_event("message.new", device["id"])

    chats = await server.ok("GET", f"/api/devices/{device['id']}/chats")
    assert [(c["jid"], c["name"], c["unread_count"]) for c in chats["items"]] == [
        (f"{CONTACT}@s.whatsapp.net", "Aisyah", 1)
    ]
    assert chats["items"][0]["last_message_text"] == "Hello, is it available?"
    assert (await server.ok("GET", f"/api/devices/{device['id']}/chats?search=aisyah"))["items"]
    assert not (await server.ok("GET", f"/api/devices/{device['id']}/chats?search=nobody"))["items"]

    path = f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages"
    first = await server.ok("POST", path, json={"text": "Yes, it is!", "client_id": "msg-1"})
    again = await server.ok("POST", path, json={"text": "Yes, it is!", "client_id": "msg-1"})  # a retry
    assert (first["id"], first["wa_message_id"]) == (again["id"], again["wa_message_id"])

    async def delivered() -> bool:
        return any(m["wa_id"] == first["wa_message_id"] for m in network.inbox(CONTACT))

    await eventually(delivered)
    assert [m["text"] for m in network.inbox(CONTACT)] == ["Yes, it is!"]

    async def in_history() -> bool:
        items = (await server.ok("GET", path))["items"]
        return [m["wa_id"] for m in items] == [first["wa_message_id"], incoming]

    await eventually(in_history)
    history = (await server.ok("GET", path))["items"]
    assert [m["from_me"] for m in history] == [True, False]

    assert await server.ok("POST", f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/read") == {"read": 1}
    chats = await server.ok("GET", f"/api/devices/{device['id']}/chats")
    assert chats["items"][0]["unread_count"] == 0
    assert network.stats()["reads_by_devices"] >= 1


async def test_chats_of_a_device_you_may_not_see_are_not_found(server: Server) -> None:
    device = await server.create_device("Hidden")
    _, staff = await server.create_user("chatty@example.com")
    for method, path, body in [
        ("GET", f"/api/devices/{device['id']}/chats", None),
        ("GET", f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages", None),
        ("POST", f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages", {"text": "hi"}),
        ("POST", f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/read", None),
    ]:
        reply = await server.call(method, path, staff, json=body)
        assert reply.status == 404, (path, reply.body)


async def test_bad_chat_input_is_refused(server: Server) -> None:
    device = await server.create_device("Desk")
    base = f"/api/devices/{device['id']}/chats"
    for path, body in [
        (f"{base}/notajid/messages", {"text": "hi"}),
        (f"{base}/123@g.us/messages", {"text": "hi"}),
        (f"{base}/{CONTACT}@s.whatsapp.net/messages", {"text": ""}),
        (f"{base}/{CONTACT}@s.whatsapp.net/messages", {"text": 5}),
    ]:
        reply = await server.call("POST", path, server.admin_token, json=body)
        assert reply.status == 400, (path, body, reply.body)
    assert (await server.call("GET", f"{base}?limit=0", server.admin_token)).status == 400
    assert (await server.call("GET", f"{base}?before=yesterday", server.admin_token)).status == 400


async def test_a_send_the_phone_never_acknowledges_goes_out_once_when_it_answers_again(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url, WAMD_SEND_ACK_TIMEOUT_S="1")
    ws, device, network = await desk(server)
    await server.sim("POST", "/faults", {"phone": PHONE, "unresponsive": True})
    path = f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages"
    sent = await server.ok("POST", path, json={"text": "Are you there?"})

    # No ack within the limit: the device is checked (reconnected) and the message waits, same id, not failed.
    suspect = await ws.wait_event("device.status", device["id"], lambda e: e["status"] == "connecting")
    assert "no server ack within 1 s" in suspect["reason"]
    queue = await server.ok("GET", "/api/queue")
    assert [(d["queued"], d["sending"]) for d in queue["items"] if d["device_id"] == device["id"]] == [(1, 0)]
    assert network.inbox(CONTACT) == []

    await server.sim("POST", "/faults", {"phone": PHONE, "unresponsive": False})

    async def delivered() -> bool:
        return bool(network.inbox(CONTACT))

    await eventually(delivered, timeout=30)
    assert [(m["wa_id"], m["text"]) for m in network.inbox(CONTACT)] == [(sent["wa_message_id"], "Are you there?")]


async def test_a_message_typed_during_a_broadcast_goes_before_the_broadcast_s_waiting_messages(
    server: Server,
) -> None:
    [device] = await linked_devices(server, 1)
    leads = await make_leads(server, 4, [device])
    # The campaign's own gap of 3 s: its messages go one at a time, the rest waiting in the device's queue.
    body = {"title": "Slow", "message": "Offer for {name}", "min_delay_s": 3, "max_delay_s": 3}
    campaign = await server.ok("POST", "/api/campaigns", json=body)

    async def campaign_messages() -> list[dict[str, Any]]:
        found = []
        for lead in leads:
            found += (await server.sim("GET", f"/inbox/{lead['phone'].lstrip('+')}"))["items"]
        return found

    async def broadcast_started() -> bool:
        return len(await campaign_messages()) >= 1

    await eventually(broadcast_started)
    chat = f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages"
    await server.ok("POST", chat, json={"text": "typed by hand"})
    await server.ok("POST", chat, json={"text": "and a second one"})

    async def typed_arrived() -> bool:
        return len((await server.sim("GET", f"/inbox/{CONTACT}"))["items"]) == 2

    await eventually(typed_arrived)

    async def broadcast_done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return bool(report["done_send"] == 4)

    await eventually(broadcast_done, timeout=30)
    typed = (await server.sim("GET", f"/inbox/{CONTACT}"))["items"]
    assert [m["text"] for m in typed] == ["typed by hand", "and a second one"]  # in the order typed
    sent = sorted(m["at"] for m in await campaign_messages())
    assert len(sent) == 4  # one each, none doubled
    # They went next (after the message already waiting out its gap, at most), not behind the whole broadcast.
    assert sum(at < typed[-1]["at"] for at in sent) <= 2, (typed, sent)
