"""`SimTransport`: the `Transport` port over a link to the simulated WhatsApp network.

It behaves as the neonize transport does against real WhatsApp: after a remote drop it reconnects by itself
with a growing delay (whatsmeow: 2 s x attempts); after `stream_replaced`, a ban or a logout it does not.
An explicit `disconnect`/`logout`/`close` always wins over a pending automatic reconnect.

Events reach the sink in order per device. One that needs no preparation, of a device with nothing waiting, is
handed to the sink at once from the link's reader (the sink must queue and return, see `TransportEventSink`);
the others go through the device's own small queue, drained by a task that exists only while there is something
to deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

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
from wamd_server.domain.ids import phone_of, user_jid
from wamd_server.domain.models import InboundMessage, OutboundMessage, SendResult
from wamd_server.domain.ports import SessionStore, TransportEventSink
from wamd_server.infra.whatsapp.event_line import EventLine, PreAction
from wamd_server.infra.whatsapp.sim_link import (
    ClientLink,
    Frame,
    InProcessLinks,
    LinkDown,
    LinkFactory,
    RemoteLinks,
)
from wamd_server.services.deadlines import Deadlines
from wamd_server.sim.network import SimNetwork

log = logging.getLogger(__name__)

LINK_LOST = "link_lost"
_RECEIPT_TYPES = {t.value: t for t in ReceiptType}  # a dict lookup; calling the enum class costs far more


class _Device:
    """What the transport knows about one device session. Small: thousands of these live at once."""

    __slots__ = ("attempt", "epoch", "events", "id", "jid", "live", "lock", "pairing", "retry", "sid", "wanted")

    def __init__(self, device_id: UUID) -> None:
        self.id = device_id
        self.sid = str(device_id)
        self.jid: str | None = None
        self.wanted = False  # the owner wants it connected: reconnect after remote drops
        self.live = False  # connected right now, as far as the last event says
        self.pairing = False
        self.epoch = 0  # bumped by every explicit stop, so a reconnect planned before it gives up
        self.attempt = 0  # automatic reconnects since the last `connected`, for the growing delay
        self.retry: asyncio.TimerHandle | None = None
        self.lock = asyncio.Lock()  # one connect/disconnect/logout/pair at a time per device
        self.events = EventLine()

    def cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def stop(self) -> None:
        """An explicit stop: no automatic reconnect may undo it."""
        self.wanted = False
        self.epoch += 1
        self.cancel_retry()


class SimTransport:
    name = "sim"

    def __init__(
        self,
        links: LinkFactory,
        store: SessionStore,
        *,
        reconnect_delay_s: float = 2.0,
        max_reconnect_delay_s: float = 60.0,
        request_timeout_s: float = 30.0,
        relink_concurrency: int = 50,
    ) -> None:
        self._links = links
        self._store = store
        self._reconnect_delay_s = reconnect_delay_s
        self._max_reconnect_delay_s = max_reconnect_delay_s
        self._request_limits = Deadlines(request_timeout_s)
        self._relink_concurrency = relink_concurrency
        self._sink: TransportEventSink | None = None
        self._link: ClientLink | None = None
        self._devices: dict[UUID, _Device] = {}
        self._by_sid: dict[str, _Device] = {}  # the same devices by session id: how events name them
        self._relink_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def in_process(cls, network: SimNetwork, store: SessionStore, **options: Any) -> SimTransport:
        """A transport linked straight to `network` in this process."""
        return cls(InProcessLinks(network), store, **options)

    @classmethod
    def remote(cls, base_url: str, store: SessionStore, **options: Any) -> SimTransport:
        """A transport linked to a standalone `wamd-sim` at `base_url` (e.g. `http://127.0.0.1:3100`)."""
        return cls(RemoteLinks(base_url), store, **options)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, sink: TransportEventSink) -> None:
        """Open the link. If the simulator cannot be reached yet, keep trying in the background."""
        self._sink = sink
        self._closed = False
        try:
            await self._open_link()
        except LinkDown as exc:
            log.warning("%s; retrying in the background", exc)
            self._start_relink()

    async def close(self) -> None:
        self._closed = True
        relink, self._relink_task = self._relink_task, None
        if relink is not None:
            relink.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relink
        for device in self._devices.values():
            device.stop()
            device.live = device.pairing = False
            device.events.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._request_limits.close()
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        await self._links.aclose()

    async def _open_link(self) -> None:
        self._link = await self._links.open(self._on_frame, self._on_link_lost)
        log.info("linked to the %s", self._links.description)

    def _on_link_lost(self) -> None:
        self._link = None
        if self._closed:
            return
        log.warning("lost the link to the %s; reconnecting", self._links.description)
        for device in self._devices.values():
            device.cancel_retry()
            if device.pairing:
                device.pairing = False
                self._enqueue(device, None, PairTimeout(device.id))
            if device.wanted:
                device.live = False
                self._enqueue(device, None, Disconnected(device.id, reason=LINK_LOST, will_retry=True))
        self._start_relink()

    def _start_relink(self) -> None:
        if self._relink_task is None or self._relink_task.done():
            self._relink_task = asyncio.get_running_loop().create_task(self._relink())

    async def _relink(self) -> None:
        attempt = 0
        while not self._closed:
            delay = min(self._reconnect_delay_s * 2**attempt, self._max_reconnect_delay_s)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            attempt += 1
            try:
                await self._open_link()
            except LinkDown as exc:
                log.info("still no link (attempt %d): %s", attempt, exc)
                continue
            await self._restore_sessions()
            if self._link is not None:
                return
            attempt = 0  # lost again while restoring: start over

    async def _restore_sessions(self) -> None:
        """Reconnect every device that was live (or meant to be) when the link dropped."""
        gate = asyncio.Semaphore(self._relink_concurrency)

        async def restore(device: _Device) -> None:
            async with gate:
                await self._reconnect(device, device.epoch)

        wanted = [d for d in self._devices.values() if d.wanted and not d.live]
        await asyncio.gather(*(restore(d) for d in wanted), return_exceptions=True)

    # --- pairing --------------------------------------------------------------------------------------

    async def pair_qr(self, device_id: UUID) -> None:
        device = self._device(device_id)
        async with device.lock:
            self._check_not_live(device)
            device.stop()
            device.pairing = True
            try:
                self._check(await self._call({"op": "pair_qr", "sid": device.sid}))
            except BaseException:
                device.pairing = False
                raise

    async def pair_code(self, device_id: UUID, phone: str) -> str:
        device = self._device(device_id)
        async with device.lock:
            self._check_not_live(device)
            device.stop()
            device.pairing = True
            try:
                reply = self._check(await self._call({"op": "pair_code", "sid": device.sid, "phone": phone}))
            except BaseException:
                device.pairing = False
                raise
            return str(reply["code"])

    def _check_not_live(self, device: _Device) -> None:
        if device.live:
            raise DeviceBusy("the device is connected; log it out before pairing again")

    # --- sessions -------------------------------------------------------------------------------------

    async def has_session(self, jid: str) -> bool:
        return await self._store.get(jid) is not None

    async def connect(self, device_id: UUID, jid: str) -> None:
        secret = await self._store.get(jid)
        if secret is None:
            raise SessionMissing()
        device = self._device(device_id)
        async with device.lock:
            if device.live and device.jid == jid:
                return
            was_wanted = device.wanted and device.jid == jid  # e.g. waiting to be restored after a link loss
            device.stop()  # a reconnect planned earlier is superseded by this one
            device.wanted, device.jid, device.pairing = True, jid, False
            try:
                self._check(await self._call({"op": "connect", "sid": device.sid, "jid": jid, "secret": secret}))
            except BaseException:
                device.wanted = was_wanted
                raise

    async def disconnect(self, device_id: UUID) -> None:
        device = self._devices.get(device_id)
        if device is None:
            return
        device.stop()
        async with device.lock:
            device.live = device.pairing = False
            try:
                await self._call({"op": "disconnect", "sid": device.sid})
            except TransportError as exc:
                log.debug("disconnect of %s: %s (nothing is live on a dead link)", device_id, exc)

    async def logout(self, device_id: UUID, jid: str) -> None:
        device = self._device(device_id)
        device.stop()
        secret = await self._store.get(jid)
        # First: a user's logout is final even if the simulator cannot be told about it.
        await self._store.delete(jid)
        async with device.lock:
            device.live = device.pairing = False
            if secret is None:
                frame: Frame = {"op": "disconnect", "sid": device.sid}
            else:
                frame = {"op": "logout", "sid": device.sid, "jid": jid, "secret": secret}
            self._check(await self._call(frame))

    async def forget(self, jid: str) -> None:
        await self._store.delete(jid)

    def _schedule_reconnect(self, device: _Device) -> None:
        device.cancel_retry()
        device.attempt += 1
        delay = min(self._reconnect_delay_s * device.attempt, self._max_reconnect_delay_s)
        delay *= random.uniform(0.9, 1.1)
        device.retry = asyncio.get_running_loop().call_later(delay, self._spawn_reconnect, device, device.epoch)

    def _spawn_reconnect(self, device: _Device, epoch: int) -> None:
        device.retry = None
        self._spawn(self._reconnect(device, epoch))

    async def _reconnect(self, device: _Device, epoch: int) -> None:
        """An automatic reconnect; gives up quietly if the owner stopped the device meanwhile."""
        async with device.lock:
            if self._closed or not device.wanted or device.epoch != epoch or device.live or device.jid is None:
                return
            jid = device.jid
            secret = await self._store.get(jid)
            if secret is None:
                log.info("not reconnecting %s: its credentials were removed", jid)
                device.wanted = False
                return
            try:
                reply = await self._call({"op": "connect", "sid": device.sid, "jid": jid, "secret": secret})
            except NotConnected:
                return  # the link is down; relinking restores wanted devices
            except TransportError as exc:
                log.info("reconnect of %s failed: %s", jid, exc)
                if device.wanted and device.epoch == epoch:
                    self._schedule_reconnect(device)
                return
            if not reply.get("ok"):
                log.warning("reconnect of %s refused: %s", jid, reply.get("error"))

    async def _drop_unwanted(self, device: _Device, epoch: int) -> None:
        async with device.lock:
            if device.wanted or device.epoch != epoch:
                return  # the owner changed their mind meanwhile
            with contextlib.suppress(TransportError):  # nothing is live on a dead link
                await self._call({"op": "disconnect", "sid": device.sid})

    # --- messaging ------------------------------------------------------------------------------------

    async def send(self, device_id: UUID, message: OutboundMessage) -> SendResult:
        device = self._live_device(device_id)
        frame: Frame = {
            "op": "send",
            "sid": device.sid,
            "to": _recipient_jid(message.to),
            "id": message.wa_id,
            "text": message.text,
        }
        if message.image is not None:
            mime = message.image_mime or "image/jpeg"
            frame["media"] = {"mime": mime, "size": len(message.image), "caption": message.text}
        # No time limit of its own: the caller's (the dispatcher's ack limit) ends a hung send first, and a second
        # timer per message was a few per cent of a broadcast's CPU.
        reply = self._check(await self._call(frame, limited=False))
        return SendResult(wa_id=str(reply["id"]), server_timestamp=_timestamp(reply["ts"]))

    async def mark_read(self, device_id: UUID, chat_jid: str, sender_jid: str, wa_ids: Sequence[str]) -> None:
        if not wa_ids:
            return
        device = self._live_device(device_id)
        frame = {"op": "read", "sid": device.sid, "chat": chat_jid, "sender": sender_jid, "ids": list(wa_ids)}
        self._check(await self._call(frame))

    async def set_typing(self, device_id: UUID, chat_jid: str, typing: bool) -> None:
        device = self._live_device(device_id)
        state = "composing" if typing else "paused"
        self._check(await self._call({"op": "typing", "sid": device.sid, "chat": chat_jid, "state": state}))

    async def probe(self, device_id: UUID, timeout_s: float) -> bool:
        device = self._devices.get(device_id)
        if device is None or not device.live or self._link is None:
            return False
        try:
            answer = await asyncio.wait_for(self._link.request({"op": "ping", "sid": device.sid}), timeout_s)
        except (TimeoutError, LinkDown):
            return False
        return bool(answer.get("ok"))

    def _live_device(self, device_id: UUID) -> _Device:
        device = self._devices.get(device_id)
        if device is None or not device.live:
            raise NotConnected("the device is not connected")
        return device

    # --- requests -------------------------------------------------------------------------------------

    async def _call(self, frame: Frame, *, limited: bool = True) -> Frame:
        link = self._link
        if link is None or self._closed:
            raise NotConnected("the simulator link is down")
        try:
            if not limited:
                return await link.request(frame)
            with self._request_limits.limit():  # one timer for all requests (see `services/deadlines.py`)
                return await link.request(frame)
        except LinkDown as exc:
            raise NotConnected(str(exc)) from None
        except TimeoutError:
            raise TransportError("the simulator did not answer in time", retryable=True) from None

    @staticmethod
    def _check(reply: Frame) -> Frame:
        if reply.get("ok"):
            return reply
        error = reply.get("error") or {}
        code, message = str(error.get("code", "error")), str(error.get("message", "simulator error"))
        if code == "not_connected":
            raise NotConnected(message)
        if code == "not_on_whatsapp":
            raise RecipientNotOnWhatsApp(message)
        if code == "busy":
            raise DeviceBusy(message)
        permanent = code in {"bad_request", "unauthorized"}
        raise TransportError(message, retryable=not permanent, details={"sim_code": code})

    # --- events ---------------------------------------------------------------------------------------

    async def _on_frame(self, frame: Frame) -> None:
        """Called in link order. Updates state at once, then hands the domain event to the sink: directly when
        nothing of the device is waiting (the pool's sink only queues it), else behind what waits."""
        sid = frame.get("sid")
        device = self._by_sid.get(sid) if isinstance(sid, str) else None
        if device is None:
            try:
                device = self._device(_session_id(str(sid)))
            except ValueError:
                log.warning("simulator event for an unknown session id: %r", sid)
                return
        try:
            pre, event = self._translate(device, frame)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed simulator event %r: %s", frame.get("ev"), exc)
            return
        if pre is None and event is not None and device.events.idle and not self._closed:
            # Most events (a broadcast's receipts) need no preparation: no task per event to deliver them.
            sink = self._sink
            if sink is not None:
                try:
                    await sink(event)
                except Exception:
                    log.exception("event sink failed on %s", type(event).__name__)
            return
        if pre is not None or event is not None:
            self._enqueue(device, pre, event)

    def _translate(self, device: _Device, frame: Frame) -> tuple[PreAction | None, TransportEvent | None]:
        ev, did = frame.get("ev"), device.id
        if ev == "receipt":  # the commonest: one per message sent
            ids = tuple(map(str, frame["ids"]))
            kind, at = _RECEIPT_TYPES[frame["type"]], _timestamp(frame["ts"])
            return None, Receipt(did, chat_jid=str(frame["chat"]), message_ids=ids, type=kind, timestamp=at)
        if ev == "message":
            return None, MessageReceived(did, _inbound(frame))
        if ev == "connected":
            if not device.wanted:
                # The owner stopped the device while this connection was being made: end it again.
                self._spawn(self._drop_unwanted(device, device.epoch))
                return None, None
            device.live, device.attempt = True, 0
            device.cancel_retry()
            return None, Connected(did)
        if ev == "disconnected":
            device.live = False
            will_retry = device.wanted and not self._closed
            if will_retry:
                self._schedule_reconnect(device)
            return None, Disconnected(did, reason=str(frame.get("reason", "")), will_retry=will_retry)
        if ev == "qr":
            expires_at = datetime.fromisoformat(str(frame["expires_at"]))
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=UTC)
            return None, QrCode(did, code=str(frame["code"]), expires_at=expires_at)
        if ev == "pair_timeout":
            device.pairing = False
            return None, PairTimeout(did)
        if ev == "paired":
            return self._paired(device, frame)
        if ev == "logged_out":
            return self._logged_out(device, frame)
        if ev == "temporary_ban":
            device.stop()
            device.live = False
            return None, TemporaryBan(did, code=str(frame["code"]), expires_in_s=int(frame["expires_in"]))
        if ev == "stream_replaced":
            # As whatsmeow: no automatic reconnect, or two clients would keep replacing each other.
            device.stop()
            device.live = False
            return None, StreamReplaced(did)
        log.debug("ignoring simulator event %r", ev)
        return None, None

    def _paired(self, device: _Device, frame: Frame) -> tuple[PreAction, TransportEvent]:
        jid, phone, secret = str(frame["jid"]), str(frame["phone"]), str(frame["secret"])
        if device.pairing:  # else the owner cancelled meanwhile: keep the link, but do not go online
            device.pairing = False
            device.wanted, device.jid = True, jid

        async def save() -> None:
            await self._store.put(jid, self.name, secret)

        return save, Paired(device.id, jid=jid, phone=phone, push_name=frame.get("push_name"))

    def _logged_out(self, device: _Device, frame: Frame) -> tuple[PreAction | None, TransportEvent]:
        device.stop()
        device.live = False
        jid = frame.get("jid") or device.jid
        try:
            reason = LogoutReason(str(frame.get("reason")))
        except ValueError:
            reason = LogoutReason.UNKNOWN_LOGOUT
        event = LoggedOut(device.id, reason=reason, on_connect=bool(frame.get("on_connect")))
        if not jid:
            return None, event

        async def drop_credentials() -> None:
            await self._store.delete(str(jid))

        return drop_credentials, event

    def _enqueue(self, device: _Device, pre: PreAction | None, event: TransportEvent | None) -> None:
        if not self._closed:
            device.events.push(device.id, pre, event, lambda: self._sink, self._spawn)

    # --- helpers --------------------------------------------------------------------------------------

    def _device(self, device_id: UUID) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = self._by_sid[str(device_id)] = _Device(device_id)
        return device

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


@functools.lru_cache(maxsize=65_536)
def _session_id(sid: str) -> UUID:
    """A session id of an event as the device's id (parsed once per device, not once per event)."""
    return UUID(sid)


def _recipient_jid(to: str) -> str:
    if to.isdigit():  # the outbox's recipients are digits already
        return user_jid(to)
    if "@" in to:
        return to
    digits = "".join(ch for ch in to if ch.isdigit())
    if not digits:
        raise TransportError(f"not a phone number or JID: {to!r}", retryable=False)
    return user_jid(digits)


def _timestamp(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), UTC)


def _inbound(frame: Frame) -> InboundMessage:
    sender = str(frame["sender"])
    return InboundMessage(
        wa_id=str(frame["id"]),
        chat_jid=str(frame["chat"]),
        sender_jid=sender,
        sender_phone=phone_of(sender),
        from_me=bool(frame.get("from_me")),
        is_group=bool(frame.get("is_group")),
        text=str(frame.get("text") or ""),
        timestamp=_timestamp(frame["ts"]),
        push_name=frame.get("push_name"),
        media_type="image" if frame.get("has_media") else None,
    )
