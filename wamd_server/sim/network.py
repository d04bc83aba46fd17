"""The simulated WhatsApp network: accounts, linked devices, sessions, messages, receipts and faults.

Everything runs on the asyncio loop of its caller (timers via `call_later`, no threads, no task per device).
Control methods (`scan`, `contact_send`, `unlink`, ...) are what the control API calls; clients talk to the
network through links (`open_link`), with the frames of the link protocol (docs/simulator.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from wamd_server.domain.ids import GROUP_SERVER, USER_SERVER, new_message_id, user_jid
from wamd_server.sim.accounts import (
    Account,
    Frame,
    GlobalFaults,
    InboxItem,
    LinkedDevice,
    PhoneFaults,
    SimStats,
)
from wamd_server.sim.config import SimConfig
from wamd_server.sim.errors import SimConflict, SimError, SimInvalid, SimNotFound
from wamd_server.sim.link import FrameHandler, Link, Session
from wamd_server.sim.pairing import Pairing, PairingRegistry
from wamd_server.sim.schemas import (
    LINK_REQUEST,
    ConnectRequest,
    DisconnectRequest,
    LogoutRequest,
    PairCodeRequest,
    PairQrRequest,
    PingRequest,
    ReadRequest,
    SendRequest,
    TypingRequest,
    describe,
    normalize_phone,
)

log = logging.getLogger(__name__)

_DISCONNECT_REASON = "connection_lost"


def _is_phone(digits: str) -> bool:
    return digits.isdigit() and 6 <= len(digits) <= 15 and digits[0] != "0"


def _check_phone(phone: str) -> str:
    digits = normalize_phone(phone)
    if not isinstance(digits, str) or not _is_phone(digits):
        raise SimInvalid(f"phone must be 6-15 digits with country code, no +: {phone!r}")
    return str(digits)


def _now() -> datetime:
    return datetime.now(UTC)


class SimNetwork:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._accounts: dict[str, Account] = {}  # phones that linked a device or were given a fault
        # What each phone received, apart from the accounts: a lead's phone only receives, and keeping no account
        # for it leaves nothing of it for the garbage collector to walk (see `InboxItem`).
        self._inboxes: dict[str, dict[str, InboxItem]] = {}
        self._devices: dict[str, LinkedDevice] = {}  # by JID
        self._links: set[Link] = set()
        self._pairings = PairingRegistry(self.config)
        self._faults = GlobalFaults()
        self._phone_faults: dict[str, PhoneFaults] = {}
        self._faulty = False  # any fault set at all: without, a send skips every fault lookup
        self._stats = SimStats()
        self._timers: set[asyncio.TimerHandle] = set()
        # `delivered` receipts waiting for their time, oldest first (see `_receipt_later`).
        self._receipts_due: deque[tuple[float, str, str, list[str], str]] = deque()
        self._receipt_timer: asyncio.TimerHandle | None = None
        self._answering = asyncio.Event()  # set (and replaced) whenever an `unresponsive` fault is lifted

    # --- links ----------------------------------------------------------------------------------------

    def open_link(self, on_frame: FrameHandler) -> Link:
        """A new client link; its events go to `on_frame` in order."""
        link = Link(self, on_frame)
        self._links.add(link)
        return link

    def detach_link(self, link: Link) -> None:
        """Called by `Link.close`: its sessions end as if the connection dropped; nothing is logged out."""
        self._links.discard(link)
        for session in list(link.sessions.values()):
            self._end_session(session)
        for pairing in list(link.pairings.values()):
            self._pairings.stop(pairing)

    async def handle_request(self, link: Link, frame: Frame) -> Frame:
        req = frame.get("req") if isinstance(frame, dict) else None
        if not isinstance(req, int) or isinstance(req, bool):
            req = None
        if link.closed:
            return _fail(req, "closed", "the link is closed")
        try:
            request = LINK_REQUEST.validate_python(frame)
        except ValidationError as exc:
            return _fail(req, "bad_request", describe(exc))
        if self._faulty and not isinstance(request, DisconnectRequest):  # closing needs no answer from the server
            await self._hang_if_unresponsive(link, request.sid)
        try:
            result = await self._dispatch(link, request)
        except SimError as exc:
            return _fail(req, exc.code, exc.message)
        return {"re": req, "ok": True, **result}

    async def _hang_if_unresponsive(self, link: Link, sid: str) -> None:
        """Requests of a session whose phone is marked `unresponsive` get no answer until the fault is lifted."""
        session = link.sessions.get(sid)
        while session is not None and self._fault(session.device.phone, "unresponsive") and not link.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answering.wait(), 1.0)

    async def _dispatch(self, link: Link, request: Any) -> dict[str, Any]:
        match request:
            case SendRequest():
                return await self._send(link, request)
            case ConnectRequest():
                return self._connect(link, request)
            case PairQrRequest():
                self._check_not_in_session(link, request.sid)
                self._pairings.start_qr(link, request.sid)
                return {}
            case PairCodeRequest():
                return self._pair_code(link, request)
            case DisconnectRequest():
                self._drop_sid(link, request.sid)
                return {}
            case LogoutRequest():
                return self._logout(link, request)
            case ReadRequest():
                self._live_session(link, request.sid)
                self._stats.reads_by_devices += len(request.ids)
                return {}
            case TypingRequest():
                self._live_session(link, request.sid)
                if request.state == "composing":
                    self._stats.typing_shown += 1
                return {}
            case PingRequest():
                self._live_session(link, request.sid)
                return {}
        raise SimInvalid("unsupported request", code="bad_request")  # pragma: no cover - union is exhaustive

    # --- pairing --------------------------------------------------------------------------------------

    def _check_not_in_session(self, link: Link, sid: str) -> None:
        if sid in link.sessions:
            raise SimConflict("this device session is connected; disconnect it before pairing", code="busy")

    def _pair_code(self, link: Link, request: PairCodeRequest) -> dict[str, Any]:
        self._check_not_in_session(link, request.sid)
        if self._not_on_whatsapp(request.phone):
            raise SimConflict(f"{request.phone} is not on WhatsApp", code="not_on_whatsapp")
        return {"code": self._pairings.start_code(link, request.sid, request.phone)}

    async def scan(self, qr: str, phone: str) -> str:
        """The phone `phone` scans `qr`; returns the JID of the newly linked device."""
        phone = _check_phone(phone)
        return self._complete_pairing(self._pairings.find_qr(qr), phone)

    async def pair_with_code(self, code: str, phone: str) -> str:
        """The user types `code` on the phone `phone`; returns the JID of the newly linked device."""
        phone = _check_phone(phone)
        return self._complete_pairing(self._pairings.find_code(code, phone), phone)

    def current_qr(self, sid: str) -> tuple[str, datetime]:
        """The QR code a pairing session shows now and when it expires."""
        return self._pairings.current_qr(sid)

    def _complete_pairing(self, pairing: Pairing, phone: str) -> str:
        if self._not_on_whatsapp(phone):
            raise SimConflict(f"{phone} is not on WhatsApp", code="not_on_whatsapp")
        account = self._account(phone)
        if len(account.devices) >= self.config.max_linked:
            raise SimConflict(
                f"{phone} already has {self.config.max_linked} linked devices; unlink one first",
                code="too_many_devices",
            )
        self._pairings.stop(pairing)
        device = LinkedDevice(phone, account.next_n, secrets.token_urlsafe(32))
        account.next_n += 1
        account.devices[device.n] = device
        self._devices[device.jid] = device
        link, sid = pairing.link, pairing.sid
        link.push({"ev": "paired", "sid": sid, "jid": device.jid, "phone": phone, "secret": device.secret})
        # As whatsmeow does after a successful pairing, the new device connects at once.
        self._open_session(link, sid, device)
        log.info("linked %s", device.jid)
        return device.jid

    # --- sessions -------------------------------------------------------------------------------------

    def _connect(self, link: Link, request: ConnectRequest) -> dict[str, Any]:
        sid, jid = request.sid, request.jid
        current = link.sessions.get(sid)
        if current is not None:
            if current.device.jid == jid and secrets.compare_digest(current.device.secret, request.secret):
                return {}  # already connected: nothing to do
            self._end_session(current)
        self._pairings.stop_sid(link, sid)
        device = self._devices.get(jid)
        if device is None or not secrets.compare_digest(device.secret, request.secret):
            # Unlinked (or never linked): the stored credentials are dead, as whatsmeow reports on connect.
            frame = {"ev": "logged_out", "sid": sid, "jid": jid, "reason": "logged_out", "on_connect": True}
            link.push(frame)
            return {}
        account = self._accounts[device.phone]
        remaining = account.ban_remaining_s()
        if remaining > 0:
            link.push(
                {
                    "ev": "temporary_ban",
                    "sid": sid,
                    "code": account.ban_code,
                    "expires_in": math.ceil(remaining),
                }
            )
            return {}
        self._open_session(link, sid, device)
        return {}

    def _open_session(self, link: Link, sid: str, device: LinkedDevice) -> None:
        stale = link.sessions.get(sid)
        if stale is not None:
            self._end_session(stale)
        old = device.session
        if old is not None:
            # Same keys connected twice: WhatsApp keeps the newer connection and drops the older one.
            self._stats.double_connections[device.jid] = self._stats.double_connections.get(device.jid, 0) + 1
            self._stats.double_connection_total += 1
            old.emit("stream_replaced")
            self._end_session(old)
            log.info("double connection of %s: stream replaced", device.jid)
        session = Session(link, sid, device)
        link.sessions[sid] = session
        device.session = session
        self._stats.connections[device.jid] = self._stats.connections.get(device.jid, 0) + 1
        session.emit("connected")
        if device.pending:
            for frame in device.pending:
                session.push(frame)
            device.pending = None

    def _end_session(self, session: Session) -> None:
        if session.link.sessions.get(session.sid) is session:
            del session.link.sessions[session.sid]
        if session.device.session is session:
            session.device.session = None

    def _drop_sid(self, link: Link, sid: str) -> None:
        session = link.sessions.get(sid)
        if session is not None:
            self._end_session(session)
        self._pairings.stop_sid(link, sid)

    def _live_session(self, link: Link, sid: str) -> Session:
        session = link.sessions.get(sid)
        if session is None:
            raise SimError("the device session is not connected", code="not_connected")
        return session

    def _logout(self, link: Link, request: LogoutRequest) -> dict[str, Any]:
        self._drop_sid(link, request.sid)
        device = self._devices.get(request.jid)
        if device is None:
            return {}  # already unlinked: logging out again is harmless
        if not secrets.compare_digest(device.secret, request.secret):
            raise SimError("wrong credentials for this device", code="unauthorized")
        self._remove_device(device, reason=None)
        log.info("logged out %s", device.jid)
        return {}

    def _remove_device(self, device: LinkedDevice, reason: str | None) -> None:
        account = self._accounts.get(device.phone)
        if account is not None:
            account.devices.pop(device.n, None)
        self._devices.pop(device.jid, None)
        device.pending = None
        session = device.session
        if session is not None:
            if reason is not None:
                session.emit("logged_out", jid=device.jid, reason=reason, on_connect=False)
            self._end_session(session)

    # --- messages -------------------------------------------------------------------------------------

    async def _send(self, link: Link, request: SendRequest) -> dict[str, Any]:
        session = self._live_session(link, request.sid)
        to_phone = _recipient_phone(request.to)
        sender_phone = session.device.phone
        latency_ms = self._fault(sender_phone, "latency_ms")
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
            if link.sessions.get(request.sid) is not session:
                raise SimError("the device session ended during the send", code="not_connected")
        if self._not_on_whatsapp(to_phone):
            raise SimError(f"{to_phone} is not on WhatsApp", code="not_on_whatsapp")
        fail_rate = self._fault(sender_phone, "fail_rate")
        if fail_rate and random.random() < fail_rate:
            self._stats.send_failures += 1
            raise SimError("simulated transient send failure", code="send_failed")
        at = _now()
        self._stats.messages_sent += 1
        text = request.text if request.media is None else (request.media.caption or request.text)
        self._route_message(
            sender_phone, to_phone, request.id, text, request.media is not None, at, session.device, None
        )
        self._receipt_later(self.config.receipt_delay_s, sender_phone, user_jid(to_phone), [request.id], "delivered")
        return {"id": request.id, "ts": at.timestamp()}

    def _route_message(
        self,
        from_phone: str,
        to_phone: str,
        wa_id: str,
        text: str,
        has_media: bool,
        at: datetime,
        from_device: LinkedDevice | None,
        push_name: str | None,
    ) -> bool:
        """Put a message in the recipient's inbox and on every linked device that should see it.

        Returns False (and counts a redelivery) when the recipient already has a message with this id.
        """
        inbox = self._inboxes.get(to_phone)
        if inbox is None:
            inbox = self._inboxes[to_phone] = {}
        if wa_id in inbox:
            self._stats.redeliveries += 1
            return False
        inbox[wa_id] = InboxItem(wa_id, from_phone, text, has_media, at)
        limit = self.config.inbox_max
        if limit is not None and len(inbox) > limit:
            del inbox[next(iter(inbox))]
        self._stats.messages_delivered += 1
        recipient = self._accounts.get(to_phone)
        sender_account = self._accounts.get(from_phone)
        # WhatsApp shows a sent message on the sender's other linked devices too.
        others = (
            [d for d in sender_account.devices.values() if d is not from_device]
            if sender_account is not None and from_phone != to_phone
            else []
        )
        if (recipient is None or not recipient.devices) and not others:
            return True  # a phone without linked devices (a lead): nothing to push
        base = {
            "ev": "message",
            "id": wa_id,
            "is_group": False,
            "text": text,
            "has_media": has_media,
            "ts": at.timestamp(),
            "push_name": push_name,
        }
        sender = user_jid(from_phone)
        incoming = {**base, "chat": sender, "sender": sender, "from_me": False}
        for device in recipient.devices.values() if recipient is not None else ():
            self._deliver(device, incoming)
        own = {**base, "chat": user_jid(to_phone), "sender": sender, "from_me": True}
        for device in others:
            self._deliver(device, own)
        return True

    def _deliver(self, device: LinkedDevice, frame: Frame) -> None:
        """To the live session, or kept (bounded) until the device next connects."""
        if device.session is not None:
            device.session.push(frame)
            return
        if device.pending is None:
            device.pending = deque(maxlen=self.config.offline_queue_max)
        if len(device.pending) == device.pending.maxlen:
            self._stats.offline_dropped += 1
        device.pending.append(frame)
        self._stats.offline_queued += 1

    def _receipt(self, owner_phone: str, chat: str, ids: list[str], kind: str) -> None:
        """A receipt for messages `owner_phone` sent, to every device linked to that account."""
        account = self._accounts.get(owner_phone)
        if account is None:
            return
        frame = {"ev": "receipt", "chat": chat, "ids": ids, "type": kind, "ts": _now().timestamp()}
        for device in account.devices.values():
            self._deliver(device, frame)

    def _receipt_later(self, delay: float, owner_phone: str, chat: str, ids: list[str], kind: str) -> None:
        """`_receipt(...)` in `delay` seconds. Every send's receipt uses the same delay, so they fall due in the
        order they were scheduled: one queue and one timer for its head replace a timer per message (a broadcast
        keeps thousands pending, and each timer costs a heap entry and a handle)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._receipts_due and due < self._receipts_due[-1][0]:
            # The delay was shortened meanwhile (config changed): keep its exact timing the generic way.
            self._later(delay, self._receipt, owner_phone, chat, ids, kind)
            return
        self._receipts_due.append((due, owner_phone, chat, ids, kind))
        if self._receipt_timer is None:
            self._receipt_timer = loop.call_at(due, self._fire_receipts)

    def _fire_receipts(self) -> None:
        self._receipt_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # asyncio may run a timer this little early
        while self._receipts_due and self._receipts_due[0][0] <= now:
            _, owner_phone, chat, ids, kind = self._receipts_due.popleft()
            self._receipt(owner_phone, chat, ids, kind)
        if self._receipts_due:
            self._receipt_timer = loop.call_at(self._receipts_due[0][0], self._fire_receipts)

    def _cancel_receipts(self) -> None:
        if self._receipt_timer is not None:
            self._receipt_timer.cancel()
            self._receipt_timer = None
        self._receipts_due.clear()

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    async def contact_send(
        self,
        from_phone: str,
        to_phone: str,
        text: str,
        push_name: str | None = None,
        wa_id: str | None = None,
    ) -> str:
        """A contact (`from_phone`) writes to an account (`to_phone`); returns the message id."""
        from_phone, to_phone = _check_phone(from_phone), _check_phone(to_phone)
        for phone in (from_phone, to_phone):
            if self._not_on_whatsapp(phone):
                raise SimConflict(f"{phone} is not on WhatsApp", code="not_on_whatsapp")
        wa_id = wa_id or new_message_id()
        self._route_message(from_phone, to_phone, wa_id, text, False, _now(), None, push_name)
        return wa_id

    async def read(self, phone: str, from_phone: str) -> int:
        """`phone` reads what `from_phone` sent it; the sender's devices get a `read` receipt."""
        phone, from_phone = _check_phone(phone), _check_phone(from_phone)
        inbox = self._inboxes.get(phone)
        if not inbox:
            return 0
        ids = []
        for key, item in inbox.items():
            if item.from_phone == from_phone and not item.read:
                inbox[key] = item._replace(read=True)  # an existing key: the dict does not change size
                ids.append(item.wa_id)
        if ids:
            self._receipt(from_phone, user_jid(phone), ids, "read")
        return len(ids)

    def inbox(self, phone: str) -> list[dict[str, Any]]:
        """What `phone` received, oldest first, each message once."""
        inbox = self._inboxes.get(_check_phone(phone))
        return [item.public() for item in inbox.values()] if inbox else []

    def inbox_counts(self) -> dict[str, int]:
        """Per phone, how many distinct messages it received (a message re-sent with its id counts once)."""
        return {phone: len(inbox) for phone, inbox in self._inboxes.items() if inbox}

    # --- phone-side actions and faults ----------------------------------------------------------------

    async def unlink(self, phone: str, jid: str | None = None) -> list[str]:
        """Unlink devices from the phone (all, or `jid`): sessions get `logged_out`, credentials die."""
        phone = _check_phone(phone)
        account = self._accounts.get(phone)
        devices = list(account.devices.values()) if account is not None else []
        if jid is not None:
            devices = [d for d in devices if d.jid == jid]
        if not devices:
            what = f"device {jid}" if jid else "any linked device"
            raise SimNotFound(f"{phone} has no {what}", code="not_linked")
        for device in devices:
            self._remove_device(device, reason="logged_out")
            log.info("unlinked %s from the phone", device.jid)
        return [d.jid for d in devices]

    async def set_faults(
        self,
        phone: str | None = None,
        *,
        disconnect: bool = False,
        ban_seconds: int | None = None,
        fail_rate: float | None = None,
        latency_ms: int | None = None,
        not_on_whatsapp: bool | None = None,
        unresponsive: bool | None = None,
    ) -> None:
        """Inject faults for one phone, or for all when `phone` is None. Values left None are unchanged."""
        if fail_rate is not None and not 0.0 <= fail_rate <= 1.0:
            raise SimInvalid("fail_rate must be between 0 and 1")
        if latency_ms is not None and latency_ms < 0:
            raise SimInvalid("latency_ms must be >= 0")
        if ban_seconds is not None and ban_seconds < 0:
            raise SimInvalid("ban_seconds must be >= 0")
        if phone is not None:
            phone = _check_phone(phone)
            faults = self._phone_faults.setdefault(phone, PhoneFaults())
            if fail_rate is not None:
                faults.fail_rate = fail_rate
            if latency_ms is not None:
                faults.latency_ms = latency_ms
            if not_on_whatsapp is not None:
                faults.not_on_whatsapp = not_on_whatsapp
            if unresponsive is not None:
                faults.unresponsive = unresponsive
            accounts = [self._account(phone)]
        else:
            if fail_rate is not None:
                self._faults.fail_rate = fail_rate
            if latency_ms is not None:
                self._faults.latency_ms = latency_ms
            if not_on_whatsapp is not None:
                self._faults.not_on_whatsapp = not_on_whatsapp
            if unresponsive is not None:
                self._faults.unresponsive = unresponsive
            accounts = list(self._accounts.values())
        if unresponsive is False:
            self._answering.set()
            self._answering = asyncio.Event()
        self._faulty = bool(self._phone_faults) or self._faults != GlobalFaults()
        if ban_seconds is not None:
            for account in accounts:
                self._ban(account, ban_seconds)
        if disconnect:
            for account in accounts:
                for device in account.devices.values():
                    if device.session is not None:
                        device.session.emit("disconnected", reason=_DISCONNECT_REASON)
                        self._end_session(device.session)

    def _ban(self, account: Account, seconds: int) -> None:
        if seconds == 0:
            account.banned_until = 0.0  # lift the ban
            return
        account.banned_until = time.monotonic() + seconds
        for device in account.devices.values():
            if device.session is not None:
                device.session.emit("temporary_ban", code=account.ban_code, expires_in=seconds)
                self._end_session(device.session)

    def _fault(self, phone: str, name: str) -> Any:
        if not self._faulty:
            return None
        override = self._phone_faults.get(phone)
        value = getattr(override, name) if override is not None else None
        return getattr(self._faults, name) if value is None else value

    def _not_on_whatsapp(self, phone: str) -> bool:
        return bool(self._fault(phone, "not_on_whatsapp"))

    def _account(self, phone: str) -> Account:
        account = self._accounts.get(phone)
        if account is None:
            account = self._accounts[phone] = Account(phone)
        return account

    # --- inspection and lifecycle ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "connections": dict(s.connections),
            "double_connections": dict(s.double_connections),
            "double_connection_total": s.double_connection_total,
            "messages_sent": s.messages_sent,
            "messages_delivered": s.messages_delivered,
            "redeliveries": s.redeliveries,
            "send_failures": s.send_failures,
            "offline_queued": s.offline_queued,
            "offline_dropped": s.offline_dropped,
            "reads_by_devices": s.reads_by_devices,
            "typing_shown": s.typing_shown,
            "online": sorted(jid for jid, d in self._devices.items() if d.session is not None),
            "linked": len(self._devices),
            "pairing": len(self._pairings),
        }

    def linked_devices(self, phone: str) -> list[str]:
        account = self._accounts.get(_check_phone(phone))
        return [d.jid for d in account.devices.values()] if account is not None else []

    async def reset(self) -> None:
        """Forget every account, device, message, fault and counter. Live sessions are logged out (their
        accounts no longer exist) and running pairings end with `pair_timeout`."""
        for device in list(self._devices.values()):
            self._remove_device(device, reason="logged_out")
        for pairing in self._pairings.all():
            self._pairings.stop(pairing)
            pairing.link.push({"ev": "pair_timeout", "sid": pairing.sid})
        self._clear()
        log.info("simulated network reset")

    async def close(self) -> None:
        """Close every link and stop every timer (server shutdown)."""
        for link in list(self._links):
            await link.close()
        self._pairings.clear()
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._cancel_receipts()

    def _clear(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._cancel_receipts()
        self._pairings.clear()
        self._accounts.clear()
        self._inboxes.clear()
        self._devices.clear()
        self._faults = GlobalFaults()
        self._phone_faults.clear()
        self._faulty = False
        self._stats = SimStats()


def _recipient_phone(to: str) -> str:
    user, _, server = to.partition("@")
    if server == GROUP_SERVER:
        raise SimInvalid("groups are not simulated", code="bad_request")
    if server != USER_SERVER:
        raise SimInvalid(f"recipient must be a user JID (<phone>@{USER_SERVER}): {to!r}", code="bad_request")
    phone = user.split(":", 1)[0]
    if _is_phone(phone):
        return phone  # the common case: digits already, nothing to normalise
    try:
        return _check_phone(phone)
    except SimInvalid as exc:
        raise SimInvalid(exc.message, code="bad_request") from None


def _fail(req: int | None, code: str, message: str) -> Frame:
    return {"re": req, "ok": False, "error": {"code": code, "message": message}}
