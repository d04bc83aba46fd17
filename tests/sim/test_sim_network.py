"""The simulated network core, driven through in-process links with raw protocol frames."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.sim.sim_helpers import FrameRecorder, fast_config
from wamd_server.sim.errors import SimConflict, SimInvalid, SimNotFound
from wamd_server.sim.link import Link
from wamd_server.sim.network import SimNetwork

PHONE = "60123456789"
CONTACT = "60198765432"
QR_FORMAT = re.compile(r"^2@[A-Za-z0-9+/=]+,[A-Za-z0-9+/=]+,[A-Za-z0-9+/=]+,[A-Za-z0-9+/=]+$")


def open_link(net: SimNetwork) -> tuple[Link, FrameRecorder]:
    frames = FrameRecorder()
    return net.open_link(frames), frames


async def ask(link: Link, op: str, **fields: Any) -> dict[str, Any]:
    return await link.request({"req": 1, "op": op, **fields})


async def pair(net: SimNetwork, link: Link, frames: FrameRecorder, sid: str, phone: str = PHONE) -> tuple[str, str]:
    """Pair a device by QR; returns (jid, secret) once it is connected."""
    mark = frames.mark()
    assert (await ask(link, "pair_qr", sid=sid))["ok"]
    qr = await frames.event("qr", sid, after=mark)
    jid = await net.scan(qr["code"], phone)
    paired = await frames.event("paired", sid, after=mark)
    await frames.event("connected", sid, after=mark)
    assert paired["jid"] == jid
    return jid, paired["secret"]


async def test_qr_codes_rotate_then_pairing_times_out() -> None:
    net = SimNetwork(fast_config(qr_first_s=0.3, qr_next_s=0.15, qr_codes=3))
    link, frames = open_link(net)
    assert (await ask(link, "pair_qr", sid="d1")) == {"re": 1, "ok": True}
    await frames.event("pair_timeout", "d1")
    codes = frames.events("qr", "d1")
    assert len(codes) == 3
    assert len({c["code"] for c in codes}) == 3
    assert all(QR_FORMAT.match(c["code"]) for c in codes)
    first_ttl = datetime.fromisoformat(codes[0]["expires_at"]) - datetime.now(UTC)
    assert first_ttl.total_seconds() < 0.3
    # The key parts stay, only the server reference rotates (as whatsmeow's codes do).
    assert codes[0]["code"].split(",")[1:] == codes[1]["code"].split(",")[1:]
    with pytest.raises(SimConflict) as expired:
        await net.scan(codes[0]["code"], PHONE)
    assert expired.value.code == "qr_expired"
    assert net.stats()["pairing"] == 0
    await net.close()


async def test_scan_refuses_old_and_unknown_codes(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await ask(link, "pair_qr", sid="d1")
    first = await frames.event("qr", "d1")
    second = await frames.event("qr", "d1", after=frames.mark())
    assert second["code"] != first["code"]
    with pytest.raises(SimConflict):
        await network.scan(first["code"], PHONE)
    with pytest.raises(SimNotFound):
        await network.scan("2@nope,a,b,c", PHONE)
    with pytest.raises(SimInvalid):
        await network.scan(second["code"], "12ab")
    code, expires_at = network.current_qr("d1")
    assert code == second["code"] and expires_at > datetime.now(UTC)
    assert await network.scan(code, PHONE) == f"{PHONE}:1@s.whatsapp.net"


async def test_pairing_gives_numbered_jids_up_to_the_limit(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jids = [(await pair(network, link, frames, f"d{i}"))[0] for i in range(1, 5)]
    assert jids == [f"{PHONE}:{n}@s.whatsapp.net" for n in range(1, 5)]
    await ask(link, "pair_qr", sid="d5")
    qr = await frames.event("qr", "d5")
    with pytest.raises(SimConflict) as refused:
        await network.scan(qr["code"], PHONE)
    assert refused.value.code == "too_many_devices"
    # Numbers are not reused: after unlinking :2 the next device is :5.
    await network.unlink(PHONE, jids[1])
    assert await network.scan(qr["code"], PHONE) == f"{PHONE}:5@s.whatsapp.net"
    stats = network.stats()
    assert stats["linked"] == 4 and len(stats["online"]) == 4


async def test_pair_by_phone_code(network: SimNetwork) -> None:
    link, frames = open_link(network)
    reply = await ask(link, "pair_code", sid="d1", phone="+60 12-345 6789")
    assert reply["ok"] and re.fullmatch(r"[1-9A-HJ-NP-TV-Z]{4}-[1-9A-HJ-NP-TV-Z]{4}", reply["code"])
    with pytest.raises(SimConflict) as wrong:
        await network.pair_with_code(reply["code"], CONTACT)
    assert wrong.value.code == "wrong_phone"
    with pytest.raises(SimNotFound):
        await network.pair_with_code("AAAA-AAAA", PHONE)
    jid = await network.pair_with_code(reply["code"].lower().replace("-", ""), PHONE)
    paired = await frames.event("paired", "d1")
    assert paired["jid"] == jid == f"{PHONE}:1@s.whatsapp.net" and paired["phone"] == PHONE
    await frames.event("connected", "d1")
    assert frames.events("qr") == []  # a code-only pairing shows no QR codes


async def test_phone_code_pairing_times_out(network: SimNetwork) -> None:
    link, frames = open_link(network)
    code = (await ask(link, "pair_code", sid="d1", phone=PHONE))["code"]
    await frames.event("pair_timeout", "d1")
    with pytest.raises(SimNotFound):
        await network.pair_with_code(code, PHONE)


async def test_connect_with_secret_and_with_dead_credentials(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    await ask(link, "disconnect", sid="d1")
    assert network.stats()["online"] == []
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    await frames.event("connected", "d1", after=mark)
    assert network.stats()["connections"][jid] == 2
    # Connecting again on the same session is a no-op, not a double connection.
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    assert network.stats()["double_connection_total"] == 0

    mark = frames.mark()
    await ask(link, "connect", sid="d2", jid=jid, secret="wrong")
    out = await frames.event("logged_out", "d2", after=mark)
    assert out["on_connect"] is True and out["reason"] == "logged_out"


async def test_unlink_logs_out_and_kills_the_credentials(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    assert await network.unlink(PHONE) == [jid]
    out = await frames.event("logged_out", "d1")
    assert out == {"ev": "logged_out", "sid": "d1", "jid": jid, "reason": "logged_out", "on_connect": False}
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    assert (await frames.event("logged_out", "d1", after=mark))["on_connect"] is True
    with pytest.raises(SimNotFound):
        await network.unlink(PHONE)


async def test_second_connection_replaces_the_first(network: SimNetwork) -> None:
    link_a, frames_a = open_link(network)
    link_b, frames_b = open_link(network)
    jid, secret = await pair(network, link_a, frames_a, "d1")
    await ask(link_b, "connect", sid="d1", jid=jid, secret=secret)
    await frames_b.event("connected", "d1")
    await frames_a.event("stream_replaced", "d1")
    stats = network.stats()
    assert stats["double_connections"] == {jid: 1} and stats["double_connection_total"] == 1
    assert stats["connections"][jid] == 2 and stats["online"] == [jid]
    # The replaced session is gone: it cannot send.
    reply = await ask(link_a, "send", sid="d1", to=f"{CONTACT}@s.whatsapp.net", id="X1", text="hi")
    assert reply["error"]["code"] == "not_connected"


async def test_send_ack_receipt_inbox_and_redelivery(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    to = f"{CONTACT}@s.whatsapp.net"
    reply = await ask(link, "send", sid="d1", to=to, id="3EB0AAA", text="hello")
    assert reply["ok"] and reply["id"] == "3EB0AAA" and reply["ts"] > 0
    receipt = await frames.event("receipt", "d1")
    assert receipt["ids"] == ["3EB0AAA"] and receipt["type"] == "delivered" and receipt["chat"] == to
    again = await ask(link, "send", sid="d1", to=to, id="3EB0AAA", text="hello")
    assert again["ok"]
    inbox = network.inbox(CONTACT)
    assert [(i["wa_id"], i["from_phone"], i["text"], i["has_media"]) for i in inbox] == [
        ("3EB0AAA", PHONE, "hello", False)
    ]
    stats = network.stats()
    assert stats["messages_delivered"] == 1 and stats["redeliveries"] == 1 and stats["messages_sent"] == 2

    media = {"mime": "image/png", "size": 10, "caption": "look"}
    assert (await ask(link, "send", sid="d1", to=to, id="3EB0BBB", text="", media=media))["ok"]
    assert network.inbox(CONTACT)[-1]["has_media"] is True
    assert network.inbox(CONTACT)[-1]["text"] == "look"


async def test_send_faults(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    to = f"{CONTACT}@s.whatsapp.net"
    await network.set_faults(CONTACT, not_on_whatsapp=True)
    reply = await ask(link, "send", sid="d1", to=to, id="A", text="x")
    assert reply["error"]["code"] == "not_on_whatsapp"
    await network.set_faults(CONTACT, not_on_whatsapp=False)
    await network.set_faults(fail_rate=1.0)
    reply = await ask(link, "send", sid="d1", to=to, id="B", text="x")
    assert reply["error"]["code"] == "send_failed"
    assert network.inbox(CONTACT) == [] and network.stats()["send_failures"] == 1
    await network.set_faults(fail_rate=0.0)
    assert (await ask(link, "send", sid="d1", to=to, id="B", text="x"))["ok"]
    bad = await ask(link, "send", sid="d1", to="123@g.us", id="C", text="x")
    assert bad["error"]["code"] == "bad_request"
    not_live = await ask(link, "send", sid="nobody", to=to, id="D", text="x")
    assert not_live["error"]["code"] == "not_connected"


async def test_latency_fault_delays_sends(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    await network.set_faults(PHONE, latency_ms=200)
    started = datetime.now(UTC)
    assert (await ask(link, "send", sid="d1", to=f"{CONTACT}@s.whatsapp.net", id="L", text="x"))["ok"]
    assert (datetime.now(UTC) - started).total_seconds() >= 0.19


async def test_contact_messages_reach_online_devices_and_wait_for_offline_ones(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    jid2, secret2 = await pair(network, link, frames, "d2")
    await ask(link, "disconnect", sid="d2")
    wa_id = await network.contact_send(CONTACT, PHONE, "hi there", push_name="Ali")
    message = await frames.event("message", "d1", id=wa_id)
    assert message["chat"] == message["sender"] == f"{CONTACT}@s.whatsapp.net"
    assert message["from_me"] is False and message["text"] == "hi there" and message["push_name"] == "Ali"
    assert frames.events("message", "d2") == []
    assert network.stats()["offline_queued"] == 1
    mark = frames.mark()
    await ask(link, "connect", sid="d2", jid=jid2, secret=secret2)
    await frames.event("connected", "d2", after=mark)
    late = await frames.event("message", "d2", after=mark, id=wa_id)
    assert late["text"] == "hi there"
    assert network.inbox(PHONE)[0]["wa_id"] == wa_id


async def test_offline_queue_is_bounded() -> None:
    net = SimNetwork(fast_config(offline_queue_max=3))
    link, frames = open_link(net)
    jid, secret = await pair(net, link, frames, "d1")
    await ask(link, "disconnect", sid="d1")
    ids = [await net.contact_send(CONTACT, PHONE, f"m{i}") for i in range(5)]
    assert net.stats()["offline_dropped"] == 2
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    await frames.event("message", "d1", after=mark, id=ids[-1])
    assert [f["id"] for f in frames.events("message", "d1")] == ids[2:]
    await net.close()


async def test_sends_show_on_the_senders_other_devices(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    await pair(network, link, frames, "d2")
    await ask(link, "send", sid="d1", to=f"{CONTACT}@s.whatsapp.net", id="OWN1", text="mine")
    own = await frames.event("message", "d2", id="OWN1")
    assert own["from_me"] is True and own["chat"] == f"{CONTACT}@s.whatsapp.net"
    assert frames.events("message", "d1") == []


async def test_device_to_device_message(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "a", PHONE)
    await pair(network, link, frames, "b", CONTACT)
    await ask(link, "send", sid="a", to=f"{CONTACT}@s.whatsapp.net", id="D2D", text="yo")
    incoming = await frames.event("message", "b", id="D2D")
    assert incoming["sender"] == f"{PHONE}@s.whatsapp.net" and incoming["from_me"] is False


async def test_read_receipts(network: SimNetwork) -> None:
    link, frames = open_link(network)
    await pair(network, link, frames, "d1")
    to = f"{CONTACT}@s.whatsapp.net"
    for wa_id in ("R1", "R2"):
        await ask(link, "send", sid="d1", to=to, id=wa_id, text="x")
    assert await network.read(CONTACT, PHONE) == 2
    receipt = await frames.event("receipt", "d1", type="read")
    assert receipt["ids"] == ["R1", "R2"] and receipt["chat"] == to
    assert await network.read(CONTACT, PHONE) == 0
    assert (await ask(link, "read", sid="d1", chat=to, ids=["X"]))["ok"]
    assert (await ask(link, "typing", sid="d1", chat=to, state="composing"))["ok"]
    assert network.stats()["reads_by_devices"] == 1


async def test_temporary_ban(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    await network.set_faults(PHONE, ban_seconds=120)
    ban = await frames.event("temporary_ban", "d1")
    assert ban["expires_in"] == 120 and ban["code"]
    assert network.stats()["online"] == []
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    again = await frames.event("temporary_ban", "d1", after=mark)
    assert 0 < again["expires_in"] <= 120
    await network.set_faults(PHONE, ban_seconds=0)  # lift the ban
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    await frames.event("connected", "d1", after=mark)


async def test_disconnect_fault(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, _ = await pair(network, link, frames, "d1")
    other_link, other_frames = open_link(network)
    await pair(network, other_link, other_frames, "x1", CONTACT)
    await network.set_faults(PHONE, disconnect=True)
    assert (await frames.event("disconnected", "d1"))["reason"]
    assert network.stats()["online"] == [f"{CONTACT}:1@s.whatsapp.net"]
    await network.set_faults(disconnect=True)  # without a phone: everyone
    await other_frames.event("disconnected", "x1")
    assert network.stats()["online"] == []
    assert jid in network.stats()["connections"]


async def test_closing_a_link_drops_its_sessions_without_logging_out(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    await link.close()
    assert network.stats()["online"] == [] and network.stats()["linked"] == 1
    assert (await ask(link, "disconnect", sid="d1"))["error"]["code"] == "closed"
    link2, frames2 = open_link(network)
    await ask(link2, "connect", sid="d1", jid=jid, secret=secret)
    await frames2.event("connected", "d1")


async def test_logout_from_the_client(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    assert (await ask(link, "logout", sid="d1", jid=jid, secret="bad"))["error"]["code"] == "unauthorized"
    assert (await ask(link, "logout", sid="d1", jid=jid, secret=secret))["ok"]
    assert network.linked_devices(PHONE) == []
    assert (await ask(link, "logout", sid="d1", jid=jid, secret=secret))["ok"]  # again: harmless


async def test_bad_link_requests(network: SimNetwork) -> None:
    link, _ = open_link(network)
    unknown = await link.request({"req": 7, "op": "fly", "sid": "d1"})
    assert unknown["re"] == 7 and unknown["ok"] is False and unknown["error"]["code"] == "bad_request"
    missing = await link.request({"req": 8, "op": "connect", "sid": "d1"})
    assert "jid" in missing["error"]["message"]
    no_req = await link.request({"op": "pair_qr"})
    assert no_req["re"] is None and no_req["error"]["code"] == "bad_request"


async def test_reset_forgets_everything(network: SimNetwork) -> None:
    link, frames = open_link(network)
    jid, secret = await pair(network, link, frames, "d1")
    await ask(link, "pair_qr", sid="d2")
    await frames.event("qr", "d2")
    await network.contact_send(CONTACT, PHONE, "x")
    await network.set_faults(fail_rate=1.0)
    await network.reset()
    await frames.event("logged_out", "d1")
    await frames.event("pair_timeout", "d2")
    stats = network.stats()
    assert stats["linked"] == 0 and stats["connections"] == {} and stats["messages_delivered"] == 0
    assert network.inbox(PHONE) == []
    mark = frames.mark()
    await ask(link, "connect", sid="d1", jid=jid, secret=secret)
    assert (await frames.event("logged_out", "d1", after=mark))["on_connect"] is True


async def test_inbox_limit_keeps_the_newest() -> None:
    net = SimNetwork(fast_config(inbox_max=2))
    ids = [await net.contact_send(CONTACT, PHONE, f"m{i}") for i in range(3)]
    assert [i["wa_id"] for i in net.inbox(PHONE)] == ids[1:]
    await net.close()


async def test_contact_send_validation(network: SimNetwork) -> None:
    with pytest.raises(SimInvalid):
        await network.contact_send("abc", PHONE, "x")
    await network.set_faults(CONTACT, not_on_whatsapp=True)
    with pytest.raises(SimConflict):
        await network.contact_send(PHONE, CONTACT, "x")
    with pytest.raises(SimInvalid):
        await network.set_faults(fail_rate=2.0)
