"""The device pool: runs the WhatsApp sessions of the devices this worker serves and keeps their stored state
true to what the transport reports.

Invariants:
- one command at a time per device (pair, logout, refresh, connect, remove share a per-device lock);
- a device is connected only while it is *wanted*; a user's logout un-wants it, and a `Connected` that arrives
  for an unwanted device (a reconnect racing the logout) is disconnected at once;
- transport events of one device are handled in the order they arrived, never under the command lock (the
  transport may report events while a command waits for its reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

from wamd_server.domain import events as te
from wamd_server.domain.errors import Conflict, DeviceBusy, NotFound, SessionMissing, TransportError
from wamd_server.domain.models import RECONNECTABLE, Device, DeviceStatus
from wamd_server.domain.ports import (
    Clock,
    DeviceRepository,
    DeviceScope,
    EventBus,
    MessageRepository,
    Transport,
)
from wamd_server.services import device_events
from wamd_server.services.hooks import HookCaller
from wamd_server.services.receipts import ReceiptBatcher

log = logging.getLogger(__name__)

EVERYTHING = DeviceScope.everything()

LOGOUT_REASONS = {
    te.LogoutReason.GENERIC: "logged out by WhatsApp",
    te.LogoutReason.LOGGED_OUT: "unlinked from the phone",
    te.LogoutReason.TEMP_BANNED: "logged out: account temporarily banned",
    te.LogoutReason.MAIN_DEVICE_GONE: "logged out: the phone's WhatsApp account is gone",
    te.LogoutReason.UNKNOWN_LOGOUT: "logged out by WhatsApp (unknown reason)",
    te.LogoutReason.CLIENT_OUTDATED: "logged out: client version outdated",
    te.LogoutReason.BAD_USER_AGENT: "logged out: client rejected by WhatsApp",
    te.LogoutReason.USER: "logged out by user",
}

# What `refresh` answers: a device status, or that the device must be paired again.
QR_REQUIRED = "qr_required"
# Reconnect delays after failures (connect refused, link not answering), growing per attempt.
RETRY_DELAYS_S = (2.0, 5.0, 15.0, 60.0, 300.0)
SUSPECT_DISCONNECT_TIMEOUT_S = 5.0


class ConnectPacer:
    """Spaces connection attempts `1/rate` seconds apart (WhatsApp and neonize dislike connect storms)."""

    def __init__(
        self,
        per_second: float,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._gap = 1.0 / per_second
        self._next = 0.0
        self._now = now
        self._sleep = sleep

    async def wait(self) -> float:
        """Wait for the next free slot; returns the slot's time."""
        now = self._now()
        slot = max(now, self._next)
        self._next = slot + self._gap
        if slot > now:
            await self._sleep(slot - now)
        return slot


class DevicePool:
    def __init__(
        self,
        *,
        transport: Transport,
        devices: DeviceRepository,
        messages: MessageRepository,
        bus: EventBus,
        hooks: HookCaller,
        clock: Clock,
        connects_per_second: float = 50.0,
        connect_timeout_s: float = 20.0,
        owns: Callable[[UUID], bool] = lambda device_id: True,
    ) -> None:
        self.transport = transport
        self._devices = devices
        self._messages = messages
        self._bus = bus
        self._hooks = hooks
        self._clock = clock
        self._pacer = ConnectPacer(connects_per_second)
        self._connect_timeout_s = connect_timeout_s
        self._owns = owns
        # Told (synchronously) when a device of this worker goes online or stops being served here.
        self.status_listeners: list[Callable[[UUID, DeviceStatus], None]] = []
        self._adopt: asyncio.Queue[UUID] = asyncio.Queue()
        self._online: set[UUID] = set()  # connected, as the last transport event said
        self._retries: dict[UUID, int] = {}  # reconnects since the device was last online, for the backoff
        self.receipts = ReceiptBatcher(messages, self._announce_receipts)
        self._locks: dict[UUID, asyncio.Lock] = {}
        self._wanted: set[UUID] = set()
        self._outcomes: dict[UUID, list[asyncio.Future[DeviceStatus]]] = {}
        self._queues: dict[UUID, deque[te.TransportEvent]] = {}
        self._timers: dict[UUID, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[type[te.TransportEvent], Callable[[Any], Awaitable[None]]] = {
            te.QrCode: self._on_qr,
            te.PairTimeout: self._on_pair_timeout,
            te.Paired: self._on_paired,
            te.Connected: self._on_connected,
            te.Disconnected: self._on_disconnected,
            te.ConnectFailure: self._on_connect_failure,
            te.LoggedOut: self._on_logged_out,
            te.TemporaryBan: self._on_temporary_ban,
            te.StreamReplaced: self._on_stream_replaced,
            te.KeepAliveTimeout: self._on_keepalive_timeout,
            te.MessageReceived: self._on_message,
            te.Receipt: self._on_receipt,
            te.HistoryChunk: self._on_history,
        }

    # --- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start(self.on_event)
        self._spawn(self._adopter(), "adopter")

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        wanted, self._wanted = set(self._wanted), set()
        self._online.clear()
        # One statement, while this worker still holds the leases: a device another worker takes over later is
        # never set back to offline by us.
        try:
            stopped = await self._devices.set_status_where(
                wanted, (DeviceStatus.ONLINE, DeviceStatus.CONNECTING), DeviceStatus.OFFLINE, "server stopped"
            )
        except Exception:
            # The database may be why we stop: the sessions are closed all the same (their leases run out, and
            # whoever runs the devices next sets their state).
            log.exception("could not mark this worker's devices offline")
            stopped = []
        for device in stopped:
            self._notify(device.id, DeviceStatus.OFFLINE)
            await self._publish(device_events.status_event(device, self._clock.now()))
        await self.transport.close()
        try:
            await self.receipts.flush()
        except Exception:
            log.exception("receipts not stored at stop")
        await self.receipts.close()

    def adopt(self, device_id: UUID) -> None:
        """Connect a device this worker now runs, from its stored session, paced with the others."""
        self._adopt.put_nowait(device_id)

    async def _adopter(self) -> None:
        while True:
            device_id = await self._adopt.get()
            await self._pacer.wait()
            self._spawn(self._connect_stored(device_id, "connecting"), f"connect-{device_id}")

    async def release(self, device_id: UUID, *, moving: bool = False) -> None:
        """Stop running a device here (its lease went, or goes, to another worker); its stored state is the new
        owner's to change, except when we hand it over on purpose (`moving`)."""
        async with self._lock(device_id):
            self._forget_runtime(device_id)
            self._resolve(device_id, DeviceStatus.OFFLINE)
            self._notify(device_id, DeviceStatus.OFFLINE)
            with contextlib.suppress(TransportError):
                await self.transport.disconnect(device_id)
            if moving:
                device = await self._devices.get(device_id, EVERYTHING)
                if device is not None and device.status is DeviceStatus.ONLINE:
                    await self._set_status(device, DeviceStatus.CONNECTING, "moving to another worker")

    async def release_all(self) -> None:
        for device_id in tuple(self._wanted):
            await self.release(device_id)

    async def reset_interrupted_pairing(self, device_id: UUID) -> None:
        async with self._lock(device_id):
            device = await self._devices.get(device_id, EVERYTHING)
            if device is not None and device.status is DeviceStatus.PAIRING and device_id not in self._wanted:
                await self._set_status(
                    device,
                    self._unlinked_status(device),
                    "pairing was interrupted; pair again",
                    qr_code=None,
                    qr_expires_at=None,
                )

    def is_live(self, device_id: UUID) -> bool:
        return device_id in self._wanted

    def online_devices(self) -> list[UUID]:
        return [d for d in self._online if d in self._wanted]

    async def suspect(self, device_id: UUID, reason: str) -> None:
        """The device's link looks dead: drop the session and reconnect with backoff (never a device a user
        logged out or WhatsApp banned)."""
        async with self._lock(device_id):
            device = await self._devices.get(device_id, EVERYTHING)
            if device is None or device_id not in self._wanted:
                return
            if device.status in (DeviceStatus.LOGGED_OUT, DeviceStatus.BANNED, DeviceStatus.PAIRING):
                return
            self._online.discard(device_id)
            delay = self._retry_later(device_id)
            await self._set_status(device, DeviceStatus.CONNECTING, f"{reason}; reconnecting in {delay:.0f} s")
            # A dead link may not even close cleanly: bounded, and the reconnect replaces the session anyway.
            with contextlib.suppress(TransportError, TimeoutError):
                await asyncio.wait_for(self.transport.disconnect(device_id), SUSPECT_DISCONNECT_TIMEOUT_S)

    async def settled(self) -> None:
        """Wait until every transport event received so far has been handled (for orderly shutdown and tests)."""
        while self._queues:
            await asyncio.gather(*[t for t in self._tasks if t.get_name().startswith("events-")])

    # --- commands ---------------------------------------------------------------------------------------

    async def pair_qr(self, device_id: UUID) -> None:
        async with self._lock(device_id):
            device = await self._device(device_id)
            if device.status is DeviceStatus.PAIRING and device_id in self._wanted:
                return  # a QR session is already running; its codes keep arriving
            await self._refuse_if_linked(device)
            await self._end_pairing(device)
            self._wanted.add(device_id)
            await self._set_status(
                device, DeviceStatus.PAIRING, "waiting for a QR scan", qr_code=None, qr_expires_at=None
            )
            try:
                await self.transport.pair_qr(device_id)
            except TransportError as exc:
                await self._pairing_failed(device_id, exc)
                raise

    async def pair_code(self, device_id: UUID, phone: str) -> str:
        async with self._lock(device_id):
            device = await self._device(device_id)
            await self._refuse_if_linked(device)
            await self._end_pairing(device)
            self._wanted.add(device_id)
            await self._set_status(
                device,
                DeviceStatus.PAIRING,
                f"waiting for the code to be entered on +{phone}",
                qr_code=None,
                qr_expires_at=None,
            )
            try:
                return await self.transport.pair_code(device_id, phone)
            except TransportError as exc:
                await self._pairing_failed(device_id, exc)
                raise

    async def logout(self, device_id: UUID) -> None:
        async with self._lock(device_id):
            device = await self._device(device_id)
            self._forget_runtime(device_id)
            if device.status is DeviceStatus.PAIRING:
                await self._end_pairing(device, force=True)
                await self._set_status(
                    device, self._unlinked_status(device), "pairing cancelled", qr_code=None, qr_expires_at=None
                )
                return
            if not device.jid or device.status in (DeviceStatus.UNPAIRED, DeviceStatus.LOGGED_OUT):
                raise Conflict("the device is not linked")
            reason = LOGOUT_REASONS[te.LogoutReason.USER]
            try:
                await self.transport.logout(device_id, device.jid)
            except TransportError as exc:
                reason += f"; WhatsApp could not be told ({exc.message}): remove it under Linked devices on the phone"
            after = await self._set_status(device, DeviceStatus.LOGGED_OUT, reason, qr_code=None, qr_expires_at=None)
            if after is not None:
                await self._publish(
                    device_events.logged_out_event(after, te.LogoutReason.USER.value, self._clock.now())
                )
            self._resolve(device_id, DeviceStatus.LOGGED_OUT)

    async def refresh(self, device_id: UUID) -> str:
        """Reconnect from the stored session. Answers the resulting status, or `qr_required`."""
        async with self._lock(device_id):
            device = await self._device(device_id)
            if device.status is DeviceStatus.ONLINE and device_id in self._wanted:
                return DeviceStatus.ONLINE.value
            if device.status is DeviceStatus.PAIRING or not device.jid:
                return QR_REQUIRED
            if not await self.transport.has_session(device.jid):
                if device.status is not DeviceStatus.LOGGED_OUT:
                    await self._set_status(device, DeviceStatus.LOGGED_OUT, "no stored session; pair again")
                return QR_REQUIRED
            if device.banned_until and device.banned_until > self._clock.now():
                return DeviceStatus.BANNED.value
            outcome = self._expect(device_id)
            if not await self._connect(device, "reconnecting"):
                return QR_REQUIRED
        try:
            status = await asyncio.wait_for(outcome, self._connect_timeout_s)
        except TimeoutError:
            return DeviceStatus.CONNECTING.value
        return QR_REQUIRED if status is DeviceStatus.LOGGED_OUT else status.value

    async def mark_read(self, device_id: UUID, chat_jid: str, items: list[tuple[str, str | None]]) -> None:
        """Read receipts, one call per sender (in a one-to-one chat: the chat itself)."""
        by_sender: dict[str, list[str]] = {}
        for wa_id, sender in items:
            by_sender.setdefault(sender or chat_jid, []).append(wa_id)
        for sender, ids in by_sender.items():
            await self.transport.mark_read(device_id, chat_jid, sender, ids)

    async def remove(self, device_id: UUID) -> None:
        async with self._lock(device_id):
            device = await self._devices.get(device_id, EVERYTHING)
            self._forget_runtime(device_id)
            if device is None:
                return
            try:
                if device.jid and device.status is not DeviceStatus.LOGGED_OUT:
                    await self.transport.logout(device_id, device.jid)
                else:
                    await self.transport.disconnect(device_id)
            except TransportError as exc:
                log.warning("device %s: could not unlink on delete (%s); forgetting its session", device_id, exc)
                if device.jid:
                    await self.transport.forget(device.jid)
        self._locks.pop(device_id, None)

    # --- transport events -------------------------------------------------------------------------------

    async def on_event(self, event: te.TransportEvent) -> None:
        """Transport sink: queue the event behind earlier events of the same device, return at once."""
        queue = self._queues.get(event.device_id)
        if queue is not None:
            queue.append(event)
            return
        if type(event) is te.Receipt:
            # Nothing of the device waits before it and taking it is instant: no task per receipt (a broadcast
            # brings one a message).
            if self._owns(event.device_id):
                self.receipts.add(event)
            return
        self._queues[event.device_id] = deque([event])
        self._spawn(self._drain(event.device_id), f"events-{event.device_id}")

    async def _drain(self, device_id: UUID) -> None:
        queue = self._queues[device_id]
        try:
            while queue:
                event = queue.popleft()
                if not self._owns(device_id):
                    # A late event of a session this worker gave up: the device's new owner reports its state.
                    continue
                try:
                    await self._handlers[type(event)](event)
                except Exception:
                    log.exception("device %s: handling %s failed", device_id, type(event).__name__)
        finally:
            self._queues.pop(device_id, None)

    async def _on_qr(self, event: te.QrCode) -> None:
        if event.device_id not in self._wanted:
            return
        device = await self._devices.set_fields(event.device_id, qr_code=event.code, qr_expires_at=event.expires_at)
        if device is not None:
            await self._publish(
                device_events.qr_event(event.device_id, event.code, event.expires_at, self._clock.now())
            )

    async def _on_pair_timeout(self, event: te.PairTimeout) -> None:
        self._wanted.discard(event.device_id)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is not None and device.status is DeviceStatus.PAIRING:
            await self._set_status(
                device,
                self._unlinked_status(device),
                "the QR codes expired without a scan; pair again",
                qr_code=None,
                qr_expires_at=None,
            )

    async def _on_paired(self, event: te.Paired) -> None:
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is None:
            return
        # The warm-up ramp counts from the account's first link here, not from re-pairing the same phone.
        linked_at = device.linked_at if device.linked_at and device.phone == event.phone else self._clock.now()
        await self._set_status(
            device,
            DeviceStatus.CONNECTING,
            "paired; connecting",
            phone=event.phone,
            jid=event.jid,
            qr_code=None,
            qr_expires_at=None,
            linked_at=linked_at,
        )
        await self._publish(device_events.paired_event(event.device_id, event.phone, event.jid, self._clock.now()))

    async def _on_connected(self, event: te.Connected) -> None:
        if event.device_id not in self._wanted:
            # A connect that raced a logout or delete: the user's decision wins.
            with contextlib.suppress(TransportError):
                await self.transport.disconnect(event.device_id)
            return
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is None:
            return
        self._online.add(event.device_id)
        self._retries.pop(event.device_id, None)
        await self._set_status(
            device,
            DeviceStatus.ONLINE,
            None,
            last_seen_at=self._clock.now(),
            banned_until=None,
            qr_code=None,
            qr_expires_at=None,
        )
        self._resolve(event.device_id, DeviceStatus.ONLINE)
        self._notify(event.device_id, DeviceStatus.ONLINE)  # also when it was online already (its lane restarts)

    async def _on_disconnected(self, event: te.Disconnected) -> None:
        self._online.discard(event.device_id)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is None or device.status not in (DeviceStatus.ONLINE, DeviceStatus.CONNECTING):
            return
        wanted = event.device_id in self._wanted
        reason = f"connection lost ({event.reason})"
        if event.will_retry and wanted:
            status, reason = DeviceStatus.CONNECTING, reason + "; reconnecting"
        elif wanted:  # the transport gave up; we try again, later and later
            status, reason = DeviceStatus.OFFLINE, f"{reason}; retrying in {self._retry_later(event.device_id):.0f} s"
        else:
            status = DeviceStatus.OFFLINE
        await self._set_status(device, status, reason, last_seen_at=self._clock.now())
        if status is DeviceStatus.OFFLINE:
            self._resolve(event.device_id, DeviceStatus.OFFLINE)

    async def _on_connect_failure(self, event: te.ConnectFailure) -> None:
        self._online.discard(event.device_id)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is not None and device.status is not DeviceStatus.LOGGED_OUT:
            reason = f"could not connect: {event.reason}"
            if event.device_id in self._wanted:
                reason += f"; retrying in {self._retry_later(event.device_id):.0f} s"
            await self._set_status(device, DeviceStatus.OFFLINE, reason)
        self._resolve(event.device_id, DeviceStatus.OFFLINE)

    async def _on_logged_out(self, event: te.LoggedOut) -> None:
        self._forget_runtime(event.device_id)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is None:
            return
        if device.jid:
            with contextlib.suppress(TransportError):
                await self.transport.forget(device.jid)
        if device.status is not DeviceStatus.LOGGED_OUT:
            reason = LOGOUT_REASONS.get(event.reason, "logged out by WhatsApp")
            after = await self._set_status(device, DeviceStatus.LOGGED_OUT, reason, qr_code=None, qr_expires_at=None)
            if after is not None:
                await self._publish(device_events.logged_out_event(after, event.reason.value, self._clock.now()))
        self._resolve(event.device_id, DeviceStatus.LOGGED_OUT)

    async def _on_temporary_ban(self, event: te.TemporaryBan) -> None:
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is None:
            return
        self._online.discard(event.device_id)
        until = self._clock.now() + timedelta(seconds=event.expires_in_s)
        reason = f"temporarily banned by WhatsApp ({event.code}) until {until.isoformat(timespec='seconds')}"
        await self._set_status(device, DeviceStatus.BANNED, reason, banned_until=until)
        self._resolve(event.device_id, DeviceStatus.BANNED)
        if event.device_id in self._wanted:
            self._reconnect_later(event.device_id, event.expires_in_s)

    async def _on_stream_replaced(self, event: te.StreamReplaced) -> None:
        self._forget_runtime(event.device_id)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is not None:
            await self._set_status(
                device, DeviceStatus.OFFLINE, "another client connected with this device's session; press Refresh"
            )
        self._resolve(event.device_id, DeviceStatus.OFFLINE)

    async def _on_keepalive_timeout(self, event: te.KeepAliveTimeout) -> None:
        log.warning("device %s: keepalive timeout (%d in a row)", event.device_id, event.error_count)

    async def _on_message(self, event: te.MessageReceived) -> None:
        if not await self._messages.store_inbound(event.device_id, event.message):
            return  # redelivery of a message we already have
        for bus_event in device_events.message_events(event.device_id, event.message, self._clock.now()):
            await self._publish(bus_event)
        device = await self._devices.get(event.device_id, EVERYTHING)
        if device is not None:
            await self._hooks.message_received(device, event.message)

    async def _on_receipt(self, event: te.Receipt) -> None:
        self.receipts.add(event)

    async def _announce_receipts(self, receipts: list[te.Receipt]) -> None:
        # (A broadcast's receipts are stored, not announced chat by chat: the batcher limits what comes here.)
        for receipt in receipts:
            await self._publish(device_events.message_status_event(receipt, self._clock.now()))

    async def _on_history(self, event: te.HistoryChunk) -> None:
        chats = set()
        for message in event.messages:
            if await self._messages.store_inbound(event.device_id, message):
                chats.add(message.chat_jid)
        for chat_jid in sorted(chats):
            await self._publish(device_events.chat_updated_event(event.device_id, chat_jid, self._clock.now()))

    # --- helpers ----------------------------------------------------------------------------------------

    async def _connect(self, device: Device, reason: str) -> bool:
        """Start restoring `device`'s session (caller holds its lock). False when there is no session."""
        assert device.jid is not None
        self._wanted.add(device.id)
        await self._set_status(device, DeviceStatus.CONNECTING, reason)
        try:
            await self.transport.connect(device.id, device.jid)
        except SessionMissing:
            self._wanted.discard(device.id)
            await self._set_status(device, DeviceStatus.LOGGED_OUT, "no stored session; pair again")
            self._resolve(device.id, DeviceStatus.LOGGED_OUT)
            return False
        except TransportError as exc:
            delay = self._retry_later(device.id)
            await self._set_status(
                device, DeviceStatus.OFFLINE, f"could not connect: {exc.message}; retrying in {delay:.0f} s"
            )
            self._resolve(device.id, DeviceStatus.OFFLINE)
        return True

    async def _connect_stored(self, device_id: UUID, reason: str) -> None:
        async with self._lock(device_id):
            device = await self._devices.get(device_id, EVERYTHING)
            if device is None:
                return
            if device.status is DeviceStatus.PAIRING and device_id not in self._wanted:
                await self._set_status(
                    device,
                    self._unlinked_status(device),
                    "pairing was interrupted; pair again",
                    qr_code=None,
                    qr_expires_at=None,
                )
                return
            if device.jid is None or device.status not in RECONNECTABLE:
                return  # logged out meanwhile
            if device_id in self._wanted and device.status is DeviceStatus.ONLINE:
                return
            if device.banned_until and device.banned_until > self._clock.now():
                self._wanted.add(device_id)
                self._reconnect_later(device_id, (device.banned_until - self._clock.now()).total_seconds())
                return
            await self._connect(device, reason)

    def _retry_later(self, device_id: UUID) -> float:
        """Schedule the next reconnect of a wanted device after a failure; returns the delay."""
        attempt = self._retries.get(device_id, 0)
        self._retries[device_id] = attempt + 1
        delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
        self._reconnect_later(device_id, delay)
        return delay

    def _reconnect_later(self, device_id: UUID, delay_s: float) -> None:
        old = self._timers.pop(device_id, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            self._timers.pop(device_id, None)
            self._spawn(self._connect_stored(device_id, "reconnecting after the ban ended"), f"unban-{device_id}")

        self._timers[device_id] = asyncio.get_running_loop().call_later(max(delay_s, 0.0), fire)

    async def _refuse_if_linked(self, device: Device) -> None:
        if device.status in (DeviceStatus.ONLINE, DeviceStatus.CONNECTING) and device.jid:
            raise DeviceBusy(f"the device is linked to +{device.phone}; log it out before pairing again")
        if device.jid and device.status is not DeviceStatus.LOGGED_OUT and await self.transport.has_session(device.jid):
            raise DeviceBusy("the device still has a stored session; press Refresh, or log it out before pairing")

    async def _end_pairing(self, device: Device, *, force: bool = False) -> None:
        if device.status is DeviceStatus.PAIRING or force:
            self._wanted.discard(device.id)
            with contextlib.suppress(TransportError):
                await self.transport.disconnect(device.id)

    async def _pairing_failed(self, device_id: UUID, exc: TransportError) -> None:
        self._wanted.discard(device_id)
        device = await self._devices.get(device_id, EVERYTHING)
        if device is not None:
            await self._set_status(device, self._unlinked_status(device), f"pairing failed: {exc.message}")

    @staticmethod
    def _unlinked_status(device: Device) -> DeviceStatus:
        return DeviceStatus.LOGGED_OUT if device.jid else DeviceStatus.UNPAIRED

    def _forget_runtime(self, device_id: UUID) -> None:
        self._wanted.discard(device_id)
        self._online.discard(device_id)
        self._retries.pop(device_id, None)
        timer = self._timers.pop(device_id, None)
        if timer is not None:
            timer.cancel()

    async def _device(self, device_id: UUID) -> Device:
        device = await self._devices.get(device_id, EVERYTHING)
        if device is None:
            raise NotFound("device not found")
        return device

    async def _set_status(
        self, before: Device, status: DeviceStatus, reason: str | None, **fields: Any
    ) -> Device | None:
        after = await self._devices.set_fields(before.id, status=status, status_reason=reason, **fields)
        if after is None:
            return None
        if (after.status, after.status_reason, after.phone, after.jid) != (
            before.status,
            before.status_reason,
            before.phone,
            before.jid,
        ):
            await self._publish(device_events.status_event(after, self._clock.now()))
        if after.status is not before.status:
            self._notify(after.id, after.status)
            await self._hooks.device_status_changed(after, before.status, after.status)
        return after

    def _notify(self, device_id: UUID, status: DeviceStatus) -> None:
        for listener in self.status_listeners:
            try:
                listener(device_id, status)
            except Exception:
                log.exception("device %s: status listener failed", device_id)

    async def _publish(self, event: Any) -> None:
        try:
            await self._bus.publish(event)
        except Exception:
            # The database already holds the truth; a lost notification must not undo a state change.
            log.exception("could not publish %s", event.type)

    def _lock(self, device_id: UUID) -> asyncio.Lock:
        lock = self._locks.get(device_id)
        if lock is None:
            lock = self._locks[device_id] = asyncio.Lock()
        return lock

    def _expect(self, device_id: UUID) -> asyncio.Future[DeviceStatus]:
        future: asyncio.Future[DeviceStatus] = asyncio.get_running_loop().create_future()
        self._outcomes.setdefault(device_id, []).append(future)
        return future

    def _resolve(self, device_id: UUID, status: DeviceStatus) -> None:
        for future in self._outcomes.pop(device_id, []):
            if not future.done():
                future.set_result(status)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
