"""`SimTransport` against the simulated network, in-process and over a real WebSocket to `wamd-sim`'s app."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from aiohttp.test_utils import TestServer

from tests.sim.sim_helpers import TRANSPORT_OPTIONS, DictSessionStore, EventRecorder, TransportHarness
from wamd_server.domain.errors import (
    DeviceBusy,
    NotConnected,
    RecipientNotOnWhatsApp,
    SessionMissing,
    TransportError,
)
from wamd_server.domain.events import (
    Connected,
    Disconnected,
    LoggedOut,
    LogoutReason,
    MessageReceived,
    Paired,
    PairTimeout,
    QrCode,
    Receipt,
    ReceiptType,
    StreamReplaced,
    TemporaryBan,
    TransportEvent,
)
from wamd_server.domain.ids import new_message_id
from wamd_server.domain.models import OutboundMessage
from wamd_server.infra.whatsapp.sim import SimTransport
from wamd_server.sim.network import SimNetwork
from wamd_server.sim.server import create_sim_app

PHONE = "60123456789"
CONTACT = "60198765432"
# Long enough for an automatic reconnect planned with the harness' 0.05 s delay to have happened.
QUIET_S = 0.4


async def pair(h: TransportHarness, network: SimNetwork, device_id: UUID | None = None, phone: str = PHONE) -> str:
    """Pair a device by QR through the transport; returns its JID once it is connected."""
    did = device_id or h.device_id
    mark = h.events.mark()
    await h.transport.pair_qr(did)
    qr = await h.events.event(QrCode, did, after=mark)
    jid = await network.scan(qr.code, phone)
    await h.events.event(Paired, did, after=mark)
    await h.events.event(Connected, did, after=mark)
    return jid


def message(to: str = CONTACT, text: str = "hello") -> OutboundMessage:
    return OutboundMessage(wa_id=new_message_id(), to=to, text=text)


# --- pairing ---------------------------------------------------------------------------------------------


async def test_qr_codes_then_pair_timeout(harness: TransportHarness) -> None:
    await harness.transport.pair_qr(harness.device_id)
    await harness.events.event(PairTimeout, harness.device_id)
    codes = harness.events.of(QrCode, harness.device_id)
    assert len(codes) == 3 and len({c.code for c in codes}) == 3
    assert all(c.expires_at.tzinfo is not None and c.expires_at.utcoffset() == UTC.utcoffset(None) for c in codes)
    assert codes[0].expires_at < codes[1].expires_at < codes[2].expires_at


async def test_pair_by_qr(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    paired = harness.events.of(Paired, harness.device_id)[0]
    assert paired.jid == jid == f"{PHONE}:1@s.whatsapp.net" and paired.phone == PHONE
    transport, secret = harness.store.data[jid]
    assert transport == "sim" and secret
    assert await harness.transport.has_session(jid)
    with pytest.raises(DeviceBusy):
        await harness.transport.pair_qr(harness.device_id)


async def test_pair_by_phone_code(harness: TransportHarness, network: SimNetwork) -> None:
    code = await harness.transport.pair_code(harness.device_id, PHONE)
    assert len(code) == 9 and code[4] == "-"
    jid = await network.pair_with_code(code, PHONE)
    paired = await harness.events.event(Paired, harness.device_id)
    assert paired.jid == jid
    await harness.events.event(Connected, harness.device_id)
    assert harness.events.of(QrCode) == []


async def test_second_device_gets_the_next_number(harness: TransportHarness, network: SimNetwork) -> None:
    assert await pair(harness, network) == f"{PHONE}:1@s.whatsapp.net"
    assert await pair(harness, network, uuid4()) == f"{PHONE}:2@s.whatsapp.net"


# --- sessions --------------------------------------------------------------------------------------------


async def test_unlink_from_the_phone_logs_out(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    await network.unlink(PHONE)
    out = await harness.events.event(LoggedOut, harness.device_id, timeout=2.0)
    assert out.reason is LogoutReason.LOGGED_OUT and out.on_connect is False
    assert not await harness.transport.has_session(jid)
    with pytest.raises(SessionMissing):
        await harness.transport.connect(harness.device_id, jid)


async def test_reconnect_with_the_stored_secret(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    await harness.transport.disconnect(harness.device_id)
    assert network.stats()["online"] == []
    mark = harness.events.mark()
    await harness.transport.connect(harness.device_id, jid)
    await harness.events.event(Connected, harness.device_id, after=mark)
    await harness.transport.connect(harness.device_id, jid)  # already connected: nothing happens
    stats = network.stats()
    assert stats["connections"][jid] == 2 and stats["online"] == [jid]
    assert stats["double_connection_total"] == 0


async def test_connect_without_a_session(harness: TransportHarness) -> None:
    with pytest.raises(SessionMissing):
        await harness.transport.connect(harness.device_id, f"{PHONE}:1@s.whatsapp.net")


async def test_connect_after_unlink_is_logged_out_on_connect(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    kept = harness.store.data[jid]
    await harness.transport.disconnect(harness.device_id)
    await network.unlink(PHONE)  # while the device is offline: it learns on its next connect
    await harness.store.put(jid, *kept)
    mark = harness.events.mark()
    await harness.transport.connect(harness.device_id, jid)
    out = await harness.events.event(LoggedOut, harness.device_id, after=mark)
    assert out.on_connect is True and out.reason is LogoutReason.LOGGED_OUT
    assert jid not in harness.store.data  # dropped before the event reached the sink


async def test_temporary_ban(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    await network.set_faults(PHONE, ban_seconds=60)
    ban = await harness.events.event(TemporaryBan, harness.device_id)
    assert ban.expires_in_s == 60 and ban.code
    mark = harness.events.mark()
    await harness.transport.connect(harness.device_id, jid)
    again = await harness.events.event(TemporaryBan, harness.device_id, after=mark)
    assert 0 < again.expires_in_s <= 60
    assert network.stats()["online"] == []
    assert await harness.transport.has_session(jid)  # a ban is not a logout


async def test_disconnect_fault_reconnects_by_itself(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    mark = harness.events.mark()
    await network.set_faults(PHONE, disconnect=True)
    dropped = await harness.events.event(Disconnected, harness.device_id, after=mark)
    assert dropped.will_retry is True
    await harness.events.event(Connected, harness.device_id, after=mark)
    assert network.stats()["connections"][jid] == 2
    # and again: the backoff counter restarted after the successful reconnect
    mark = harness.events.mark()
    await network.set_faults(PHONE, disconnect=True)
    await harness.events.event(Connected, harness.device_id, after=mark)


async def test_double_connection_replaces_the_stream(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    other_store = DictSessionStore()
    other_store.data = dict(harness.store.data)
    other_events = EventRecorder()
    other = SimTransport.in_process(network, other_store, **TRANSPORT_OPTIONS)
    await other.start(other_events)
    try:
        await other.connect(harness.device_id, jid)
        await other_events.event(Connected, harness.device_id)
        await harness.events.event(StreamReplaced, harness.device_id)
        stats = network.stats()
        assert stats["double_connections"] == {jid: 1} and stats["double_connection_total"] == 1
        await asyncio.sleep(QUIET_S)  # the replaced client must not fight back
        assert network.stats()["double_connection_total"] == 1
        with pytest.raises(NotConnected):
            await harness.transport.send(harness.device_id, message())
    finally:
        await other.close()


async def test_one_live_session_per_device(harness: TransportHarness, network: SimNetwork) -> None:
    first = await pair(harness, network)
    other_id = uuid4()
    second = await pair(harness, network, other_id, phone=CONTACT)
    await harness.transport.disconnect(other_id)
    mark = harness.events.mark()
    # The same device id restores another account's session without a disconnect first.
    await harness.transport.connect(harness.device_id, second)
    await harness.events.event(Connected, harness.device_id, after=mark)
    assert network.stats()["online"] == [second]
    assert first in network.stats()["connections"]


async def test_explicit_disconnect_cancels_the_automatic_reconnect(
    network: SimNetwork, store: DictSessionStore
) -> None:
    events = EventRecorder()
    transport = SimTransport.in_process(network, store, reconnect_delay_s=0.2, max_reconnect_delay_s=0.2)
    await transport.start(events)
    device_id = uuid4()
    try:
        await transport.pair_qr(device_id)
        jid = await network.scan((await events.event(QrCode, device_id)).code, PHONE)
        await events.event(Connected, device_id)
        mark = events.mark()
        await network.set_faults(PHONE, disconnect=True)
        assert (await events.event(Disconnected, device_id, after=mark)).will_retry
        await transport.disconnect(device_id)
        await asyncio.sleep(0.6)
        assert len(events.of(Connected, device_id)) == 1
        assert network.stats()["online"] == [] and network.stats()["connections"][jid] == 1
    finally:
        await transport.close()


async def test_logout_is_never_undone_by_the_automatic_reconnect(network: SimNetwork, store: DictSessionStore) -> None:
    events = EventRecorder()
    transport = SimTransport.in_process(network, store, reconnect_delay_s=0.2, max_reconnect_delay_s=0.2)
    await transport.start(events)
    device_id = uuid4()
    try:
        await transport.pair_qr(device_id)
        jid = await network.scan((await events.event(QrCode, device_id)).code, PHONE)
        await events.event(Connected, device_id)
        mark = events.mark()
        await network.set_faults(PHONE, disconnect=True)
        await events.event(Disconnected, device_id, after=mark)
        await transport.logout(device_id, jid)
        assert store.data == {} and network.linked_devices(PHONE) == []
        await asyncio.sleep(0.6)
        assert len(events.of(Connected, device_id)) == 1
        assert events.of(LoggedOut, device_id) == []  # our own logout is not reported back
    finally:
        await transport.close()


async def test_logout(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    await harness.transport.logout(harness.device_id, jid)
    assert harness.store.data == {}
    assert network.linked_devices(PHONE) == [] and network.stats()["online"] == []
    await harness.transport.logout(harness.device_id, jid)  # again, without credentials: harmless
    await harness.transport.forget(jid)


# --- messages --------------------------------------------------------------------------------------------


async def test_send_ack_and_delivered_receipt(harness: TransportHarness, network: SimNetwork) -> None:
    await pair(harness, network)
    out = message(to=f"+{CONTACT}")
    before = datetime.now(UTC)
    result = await harness.transport.send(harness.device_id, out)
    assert result.wa_id == out.wa_id
    assert result.server_timestamp.tzinfo is not None and result.server_timestamp >= before.replace(microsecond=0)
    receipt = await harness.events.event(Receipt, harness.device_id)
    assert receipt.type is ReceiptType.DELIVERED and receipt.message_ids == (out.wa_id,)
    assert receipt.chat_jid == f"{CONTACT}@s.whatsapp.net"
    # A retry with the same id (e.g. after a crash mid-send) is shown once and counted.
    again = await harness.transport.send(harness.device_id, out)
    assert again.wa_id == out.wa_id
    assert [i["wa_id"] for i in network.inbox(CONTACT)] == [out.wa_id]
    assert network.stats()["redeliveries"] == 1 and network.stats()["messages_delivered"] == 1


async def test_send_image(harness: TransportHarness, network: SimNetwork) -> None:
    await pair(harness, network)
    out = OutboundMessage(wa_id=new_message_id(), to=f"{CONTACT}@s.whatsapp.net", text="pic", image=b"\x89PNG")
    await harness.transport.send(harness.device_id, out)
    assert network.inbox(CONTACT)[0]["has_media"] is True


async def test_send_errors(harness: TransportHarness, network: SimNetwork) -> None:
    with pytest.raises(NotConnected):
        await harness.transport.send(harness.device_id, message())
    await pair(harness, network)
    await network.set_faults(CONTACT, not_on_whatsapp=True)
    with pytest.raises(RecipientNotOnWhatsApp) as permanent:
        await harness.transport.send(harness.device_id, message())
    assert permanent.value.retryable is False
    await network.set_faults(fail_rate=1.0)
    with pytest.raises(TransportError) as transient:
        await harness.transport.send(harness.device_id, message(to="60111111111"))
    assert transient.value.retryable is True and not isinstance(transient.value, NotConnected)
    with pytest.raises(TransportError) as bad:
        await harness.transport.send(harness.device_id, message(to="no digits"))
    assert bad.value.retryable is False
    assert network.inbox(CONTACT) == []


async def test_inbound_messages_online_and_offline(harness: TransportHarness, network: SimNetwork) -> None:
    jid = await pair(harness, network)
    wa_id = await network.contact_send(CONTACT, PHONE, "hi", push_name="Ali")
    received = await harness.events.event(MessageReceived, harness.device_id)
    msg = received.message
    assert msg.wa_id == wa_id and msg.text == "hi" and msg.push_name == "Ali"
    assert msg.chat_jid == msg.sender_jid == f"{CONTACT}@s.whatsapp.net" and msg.sender_phone == CONTACT
    assert msg.from_me is False and msg.is_group is False and msg.timestamp.tzinfo is not None

    await harness.transport.disconnect(harness.device_id)
    late_id = await network.contact_send(CONTACT, PHONE, "while you were away")
    mark = harness.events.mark()
    await harness.transport.connect(harness.device_id, jid)
    late = await harness.events.event(MessageReceived, harness.device_id, after=mark)
    assert late.message.wa_id == late_id
    assert isinstance(harness.events.items[mark], Connected)  # connected first, then the backlog


async def test_read_receipts_and_presence(harness: TransportHarness, network: SimNetwork) -> None:
    await pair(harness, network)
    out = message()
    await harness.transport.send(harness.device_id, out)
    assert await network.read(CONTACT, PHONE) == 1
    read = await harness.events.event(Receipt, harness.device_id, type=ReceiptType.READ)
    assert read.message_ids == (out.wa_id,)
    chat = f"{CONTACT}@s.whatsapp.net"
    await harness.transport.mark_read(harness.device_id, chat, chat, ["3EB0123"])
    await harness.transport.set_typing(harness.device_id, chat, True)
    await harness.transport.set_typing(harness.device_id, chat, False)
    assert network.stats()["reads_by_devices"] == 1


async def test_sink_errors_do_not_break_the_link(network: SimNetwork, store: DictSessionStore) -> None:
    seen: list[TransportEvent] = []
    events = EventRecorder()

    async def flaky_sink(event: TransportEvent) -> None:
        seen.append(event)
        if len(seen) <= 2:
            raise RuntimeError("sink bug")
        await events(event)

    transport = SimTransport.in_process(network, store, **TRANSPORT_OPTIONS)
    await transport.start(flaky_sink)
    device_id = uuid4()
    try:
        await transport.pair_qr(device_id)
        await network.pair_with_code(await transport.pair_code(device_id, PHONE), PHONE)
        await events.event(Connected, device_id)  # QR and Paired failed in the sink; the rest still came
        assert store.data  # credentials were saved even though the sink failed on Paired
    finally:
        await transport.close()


# --- the standalone simulator going away ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StandaloneSim:
    """A `wamd-sim` app on a fixed port that can be stopped and started again, keeping its network."""

    def __init__(self, network: SimNetwork) -> None:
        self.network = network
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: TestServer | None = None

    async def start(self) -> None:
        self.server = TestServer(create_sim_app(self.network), port=self.port)
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


@pytest.fixture
async def sim(network: SimNetwork) -> AsyncIterator[StandaloneSim]:
    standalone = StandaloneSim(network)
    yield standalone
    await standalone.stop()


@pytest.fixture
async def remote(sim: StandaloneSim, store: DictSessionStore) -> AsyncIterator[TransportHarness]:
    await sim.start()
    transport = SimTransport.remote(sim.url, store, **TRANSPORT_OPTIONS)
    events = EventRecorder()
    await transport.start(events)
    yield TransportHarness(transport, events, store)
    await transport.close()


async def test_simulator_restart_relinks_and_restores_sessions(
    remote: TransportHarness, sim: StandaloneSim, network: SimNetwork
) -> None:
    h = remote
    jid = await pair(h, network)
    idle_id = uuid4()
    await h.transport.pair_qr(idle_id)
    await h.events.event(QrCode, idle_id)
    mark = h.events.mark()
    await sim.stop()
    lost = await h.events.event(Disconnected, h.device_id, after=mark)
    assert lost.reason == "link_lost" and lost.will_retry is True
    await h.events.event(PairTimeout, idle_id, after=mark)  # a pairing does not survive the restart
    with pytest.raises(NotConnected):
        await h.transport.send(h.device_id, message())
    with pytest.raises(NotConnected):
        await h.transport.pair_qr(idle_id)
    await sim.start()
    await h.events.event(Connected, h.device_id, after=mark)
    assert network.stats()["online"] == [jid]
    await h.transport.send(h.device_id, message())


async def test_logout_while_the_simulator_is_down_still_drops_credentials(
    remote: TransportHarness, sim: StandaloneSim, network: SimNetwork
) -> None:
    jid = await pair(remote, network)
    mark = remote.events.mark()
    await sim.stop()
    await remote.events.event(Disconnected, remote.device_id, after=mark)
    with pytest.raises(TransportError):
        await remote.transport.logout(remote.device_id, jid)
    assert remote.store.data == {}
    await sim.start()
    await asyncio.sleep(QUIET_S)  # the relinked transport must not bring the logged-out device back
    assert network.stats()["online"] == []
    assert len(remote.events.of(Connected, remote.device_id)) == 1


async def test_start_while_the_simulator_is_down(sim: StandaloneSim, store: DictSessionStore) -> None:
    events = EventRecorder()
    transport = SimTransport.remote(sim.url, store, **TRANSPORT_OPTIONS)
    await transport.start(events)  # does not raise: keeps trying in the background
    device_id = uuid4()
    try:
        with pytest.raises(NotConnected):
            await transport.pair_qr(device_id)
        await sim.start()
        async with asyncio.timeout(5):
            while True:  # the link comes up on its own after a short backoff
                try:
                    await transport.pair_qr(device_id)
                    break
                except NotConnected:
                    await asyncio.sleep(0.02)
        await events.event(QrCode, device_id)
    finally:
        await transport.close()
