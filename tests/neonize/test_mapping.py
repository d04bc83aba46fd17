"""Mapping neonize's protobuf events to domain events, with real event objects (see events.py).

These only build and parse protobuf messages: loading the Go library on import is harmless, nothing calls it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest
from neonize.proto import Neonize_pb2 as nz

from tests.neonize import events as ev
from wamd_server.domain.events import (
    Connected,
    ConnectFailure,
    Disconnected,
    HistoryChunk,
    KeepAliveTimeout,
    LoggedOut,
    LogoutReason,
    MessageReceived,
    Paired,
    Receipt,
    ReceiptType,
    StreamReplaced,
    TemporaryBan,
)
from wamd_server.domain.models import InboundMessage
from wamd_server.infra.whatsapp.neonize import (
    build_jid,
    from_epoch,
    jid_to_str,
    map_event,
    non_ad,
    pairing_error,
    restore_jid,
)

DEVICE = uuid4()
ME = "60111111111:7@s.whatsapp.net"
ALICE = "60123456789@s.whatsapp.net"
ALICE_LID = "215000000000001@lid"
GROUP = "120363000000000001@g.us"
AT_MS = datetime(2025, 10, 9, 8, 53, 20, 123000, tzinfo=UTC)
AT_S = datetime(2025, 10, 9, 8, 53, 20, tzinfo=UTC)


def only(events: list[object]) -> object:
    assert len(events) == 1, events
    return events[0]


# --- connection lifecycle ------------------------------------------------------------------------------


def test_connected_and_disconnected() -> None:
    assert map_event(DEVICE, ev.connected()) == [Connected(DEVICE)]
    assert map_event(DEVICE, ev.disconnected()) == [Disconnected(DEVICE, reason="connection lost", will_retry=True)]
    assert map_event(DEVICE, ev.disconnected(), will_retry=False) == [
        Disconnected(DEVICE, reason="connection lost", will_retry=False)
    ]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (nz.GENERIC, LogoutReason.GENERIC),
        (nz.LOGGED_OUT, LogoutReason.LOGGED_OUT),
        (nz.TEMP_BANNED, LogoutReason.TEMP_BANNED),
        (nz.MAIN_DEVICE_GONE, LogoutReason.MAIN_DEVICE_GONE),
        (nz.UNKNOWN_LOGOUT, LogoutReason.UNKNOWN_LOGOUT),
        (nz.CLIENT_OUTDATED, LogoutReason.CLIENT_OUTDATED),
        (nz.BAD_USER_AGENT, LogoutReason.BAD_USER_AGENT),
        (nz.INTERNAL_SERVER_ERROR, LogoutReason.UNKNOWN_LOGOUT),
        (nz.EXPERIMENTAL, LogoutReason.UNKNOWN_LOGOUT),
        (nz.SERVICE_UNAVAILABLE, LogoutReason.UNKNOWN_LOGOUT),
    ],
)
def test_logged_out_with_each_reason(reason: int, expected: LogoutReason) -> None:
    assert map_event(DEVICE, ev.logged_out(reason, on_connect=True)) == [
        LoggedOut(DEVICE, reason=expected, on_connect=True)
    ]
    assert map_event(DEVICE, ev.logged_out(reason, on_connect=False)) == [
        LoggedOut(DEVICE, reason=expected, on_connect=False)
    ]


def test_every_connect_failure_reason_is_mapped() -> None:
    assert {value for _, value in nz.ConnectFailureReason.items()} == set(range(1, 11))


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (nz.TemporaryBan.SEND_TO_TOO_MANY_PEOPLE, "send_to_too_many_people"),
        (nz.TemporaryBan.BLOCKED_BY_USERS, "blocked_by_users"),
        (nz.TemporaryBan.CREATED_TOO_MANY_GROUPS, "created_too_many_groups"),
        (nz.TemporaryBan.SENT_TOO_MANY_SAME_MESSAGE, "sent_too_many_same_message"),
        (nz.TemporaryBan.BROADCAST_LIST, "broadcast_list"),
    ],
)
def test_temporary_ban_code_and_expiry(code: int, name: str) -> None:
    assert map_event(DEVICE, ev.temporary_ban(code, 3600)) == [TemporaryBan(DEVICE, code=name, expires_in_s=3600)]


def test_stream_replaced_and_keepalive_timeout() -> None:
    assert map_event(DEVICE, ev.stream_replaced()) == [StreamReplaced(DEVICE)]
    assert map_event(DEVICE, ev.keepalive_timeout(3)) == [KeepAliveTimeout(DEVICE, error_count=3)]


def test_connect_failure_and_client_outdated() -> None:
    failure = only(map_event(DEVICE, ev.connect_failure(nz.SERVICE_UNAVAILABLE, "try later")))
    assert failure == ConnectFailure(DEVICE, reason="service_unavailable: try later")
    outdated = only(map_event(DEVICE, ev.client_outdated()))
    assert isinstance(outdated, ConnectFailure)
    assert outdated.reason.startswith("client_outdated")


def test_pair_success_gives_device_jid_and_phone() -> None:
    assert map_event(DEVICE, ev.pair_status(ME)) == [Paired(DEVICE, jid=ME, phone="60111111111")]
    assert pairing_error(ev.pair_status(ME)) is None


def test_pair_error_is_no_paired_event() -> None:
    failed = ev.pair_status(ME, ok=False, error="key mismatch")
    assert map_event(DEVICE, failed) == []
    assert pairing_error(failed) == "key mismatch"


# --- messages ---------------------------------------------------------------------------------------------


def inbound(event: object) -> InboundMessage:
    received = only(map_event(DEVICE, event))
    assert isinstance(received, MessageReceived)
    return received.message


def test_text_message_with_millisecond_timestamp() -> None:
    message = inbound(ev.message_event(ev.text("hello"), ev.source(ALICE, ALICE)))
    assert message == ev_inbound(
        wa_id="3EB0AAAAAAAAAAAAAAAAAA", chat_jid=ALICE, sender_jid=ALICE, sender_phone="60123456789", text="hello"
    )


def test_extended_text_message() -> None:
    message = inbound(ev.message_event(ev.extended_text("see https://example.com"), ev.source(ALICE, ALICE)))
    assert message.text == "see https://example.com"
    assert message.media_type is None


def test_image_with_caption() -> None:
    message = inbound(ev.message_event(ev.image("look at this"), ev.source(ALICE, ALICE), media_type="image"))
    assert message.text == "look at this"
    assert message.media_type == "image"


def test_image_without_caption_and_wrapped_ephemeral_text() -> None:
    assert inbound(ev.message_event(ev.image(""), ev.source(ALICE, ALICE))).media_type == "image"
    assert inbound(ev.message_event(ev.ephemeral(ev.text("psst")), ev.source(ALICE, ALICE))).text == "psst"


def test_from_me_message() -> None:
    event = ev.message_event(ev.text("sent from the phone"), ev.source(ALICE, ME, from_me=True), push_name="")
    message = inbound(event)
    assert message.from_me is True
    assert message.chat_jid == ALICE
    assert message.sender_jid == "60111111111@s.whatsapp.net"
    assert message.push_name is None


def test_group_message_has_group_flag_and_sender_phone() -> None:
    message = inbound(ev.message_event(ev.text("hi all"), ev.source(GROUP, "60199999999:3@s.whatsapp.net", group=True)))
    assert message.is_group is True
    assert message.chat_jid == GROUP
    assert message.sender_jid == "60199999999@s.whatsapp.net"
    assert message.sender_phone == "60199999999"


def test_lid_addressed_message_maps_to_phone_number_and_keeps_lid() -> None:
    src = ev.source(ALICE_LID, ALICE_LID, sender_alt=ALICE)
    message = inbound(ev.message_event(ev.text("by lid"), src))
    assert message.chat_jid == ALICE
    assert message.sender_jid == ALICE
    assert message.sender_phone == "60123456789"
    assert message.sender_lid == ALICE_LID


def test_lid_group_sender_without_phone_number() -> None:
    message = inbound(ev.message_event(ev.text("hidden"), ev.source(GROUP, ALICE_LID, group=True)))
    assert message.sender_jid == ALICE_LID
    assert message.sender_phone is None
    assert message.sender_lid == ALICE_LID


def test_non_chat_messages_are_skipped() -> None:
    assert map_event(DEVICE, ev.message_event(ev.reaction(), ev.source(ALICE, ALICE))) == []
    status = ev.source("status@broadcast", ALICE)
    assert map_event(DEVICE, ev.message_event(ev.text("my status"), status)) == []


def ev_inbound(**fields: object) -> InboundMessage:
    values: dict[str, object] = {
        "from_me": False,
        "is_group": False,
        "timestamp": AT_MS,
        "push_name": "Alice",
        "media_type": None,
        "sender_lid": None,
    }
    values.update(fields)
    return InboundMessage(**values)


# --- receipts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (nz.Receipt.DELIVERED, ReceiptType.DELIVERED),
        (nz.Receipt.READ, ReceiptType.READ),
        (nz.Receipt.PLAYED, ReceiptType.PLAYED),
    ],
)
def test_receipt_types(kind: int, expected: ReceiptType) -> None:
    event = ev.receipt(kind, ["3EB0A", "3EB0B"], ev.source(ALICE, ALICE))
    assert map_event(DEVICE, event) == [
        Receipt(DEVICE, chat_jid=ALICE, message_ids=("3EB0A", "3EB0B"), type=expected, timestamp=AT_S)
    ]


@pytest.mark.parametrize("kind", [nz.Receipt.SENDER, nz.Receipt.RETRY, nz.Receipt.READ_SELF, nz.Receipt.SERVER_ERROR])
def test_receipts_about_nothing_we_track_are_skipped(kind: int) -> None:
    assert map_event(DEVICE, ev.receipt(kind, ["3EB0A"], ev.source(ALICE, ALICE))) == []


def test_receipt_from_lid_chat_is_keyed_by_phone_number() -> None:
    event = ev.receipt(nz.Receipt.READ, ["3EB0A"], ev.source(ALICE_LID, ALICE_LID, sender_alt=ALICE))
    receipt = only(map_event(DEVICE, event))
    assert isinstance(receipt, Receipt)
    assert receipt.chat_jid == ALICE


# --- history ----------------------------------------------------------------------------------------------


def test_history_sync_is_chunked_and_bounded() -> None:
    messages = [ev.web_message(ALICE, f"H{i:04d}", ev.text(f"old {i}"), from_me=i % 2 == 0) for i in range(1201)]
    messages.append(ev.web_message(ALICE, "REACT", ev.reaction()))  # not a chat message: dropped
    chunks = map_event(DEVICE, ev.history_sync({ALICE: messages}, progress=70), own_jid=ME, history_chunk_size=500)
    assert [len(c.messages) for c in chunks if isinstance(c, HistoryChunk)] == [500, 500, 201]
    assert all(isinstance(c, HistoryChunk) and c.progress == 70 for c in chunks)
    first = chunks[0].messages[0]
    assert (first.wa_id, first.text, first.from_me, first.sender_jid) == (
        "H0000",
        "old 0",
        True,
        "60111111111@s.whatsapp.net",
    )
    second = chunks[0].messages[1]
    assert (second.from_me, second.sender_jid, second.sender_phone, second.push_name) == (
        False,
        ALICE,
        "60123456789",
        "Bob",
    )
    assert first.timestamp == AT_S


def test_history_sync_maps_lid_chats_and_group_participants() -> None:
    conversations = {
        ALICE_LID: [ev.web_message(ALICE_LID, "L1", ev.image("holiday"))],
        GROUP: [ev.web_message(GROUP, "G1", ev.text("group hi"), participant="60177777777:2@s.whatsapp.net")],
        "status@broadcast": [ev.web_message("status@broadcast", "S1", ev.text("status"))],
    }
    chunks = map_event(DEVICE, ev.history_sync(conversations, lid_to_pn={ALICE_LID: ALICE}), own_jid=ME)
    messages = {m.wa_id: m for c in chunks if isinstance(c, HistoryChunk) for m in c.messages}
    assert set(messages) == {"L1", "G1"}
    assert (messages["L1"].chat_jid, messages["L1"].sender_phone, messages["L1"].media_type) == (
        ALICE,
        "60123456789",
        "image",
    )
    assert messages["L1"].sender_lid == ALICE_LID
    assert (messages["G1"].is_group, messages["G1"].sender_jid) == (True, "60177777777@s.whatsapp.net")


def test_empty_history_sync_gives_no_chunk() -> None:
    assert map_event(DEVICE, ev.history_sync({})) == []


# --- identifiers and time ---------------------------------------------------------------------------------


def test_timestamps_in_seconds_and_milliseconds() -> None:
    assert from_epoch(ev.TS_MS) == AT_MS
    assert from_epoch(ev.TS_S) == AT_S


def test_jid_helpers() -> None:
    assert jid_to_str(ev.jid(ME)) == "60111111111@s.whatsapp.net"
    assert jid_to_str(ev.jid(ME), keep_device=True) == ME
    assert jid_to_str(ev.jid()) == ""
    assert non_ad("60123.1:4@s.whatsapp.net") == "60123@s.whatsapp.net"
    assert non_ad(GROUP) == GROUP
    assert jid_to_str(build_jid("+60 12-345 6789")) == ALICE
    assert jid_to_str(build_jid(ME), keep_device=True) == ME
    assert jid_to_str(build_jid(GROUP)) == GROUP
    restored = restore_jid(ME)
    assert (restored.User, restored.Device, restored.Server) == ("60111111111:7", 0, "s.whatsapp.net")
    # every field of a neonize JID is required: these must serialise
    for value in (build_jid(ALICE), restore_jid(ME)):
        assert type(value).FromString(value.SerializeToString()) == value
