"""`NeonizeTransport`: the `Transport` port over neonize 0.5.2 (whatsmeow in a Go shared library).

The only module that imports neonize. It follows the adapter rules of reference/neonize.md §8:

- Calls that write neonize's unsynchronised process-global Go maps (`Neonize()` inside `connect()`, `Stop()`)
  run one at a time behind `_GoGate`, each start held open until it settles or a stagger passes; other calls
  wait until no such write may be in progress. Concurrent writes abort the whole process.
- Every Go call runs in a thread of the loop's default executor, which `start` replaces with a daemon-thread
  pool sized to the number of running clients (each running client holds one thread for its whole life).
- One `NewAClient` per uuid, kept strongly referenced: its `weakref.finalize` would call Go `Stop(uuid)` when
  collected, killing a newer session with the same uuid (and writing the Go maps outside the gate).
- A session is restored by JID only after our own SQL found its `whatsmeow_device` row: whatsmeow panics
  (process abort) on an unknown JID. New pairings use `new_device=True` and their own uuid.
- Every neonize callback is wrapped: exceptions are logged, never lost. Events of one device reach the sink
  in order, through a small per-device queue.
- `get_me()` is never called (it aborts the process for a client Go does not know).

Pre-assigned message ids: neonize 0.5.2 cannot send with a caller-chosen id. Its Go export `SendMessage`
builds `whatsmeow.SendRequestExtra{}` with only `AdditionalNodes`, so whatsmeow generates the id;
`SendRequestExtra.ID` is only reachable through `send_fb_message` (the Messenger/FB application protocol, not
WhatsApp chat messages). `send` therefore returns the id WhatsApp assigned, which differs from
`OutboundMessage.wa_id`; a re-send after a crash gets a new id again.

Known limits of neonize 0.5.2 that this adapter can only narrow, not close:
- Go still reads its maps where we cannot gate it: each client's event loop looks itself up once when it
  starts (after the websocket connected). Only a patched Go library (a mutex around the maps) removes this.
- `Stop()` cannot cancel a dial in progress, so stopping waits (bounded) for the start to settle.
- A pairing whose QR codes all expired leaves its `Neonize()` call blocked in Go for good (it polls for a
  device id that never comes): one daemon thread per expired pairing, for the life of the process.
- whatsmeow does not retry a failed first connect, and neither does this adapter: every attempt opens a new
  database connection that is never released (Postgres: size `max_connections` for the retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit
from uuid import UUID

import neonize.aioze.events as neonize_events
import psycopg
from neonize._binder import ProxySettings
from neonize.aioze.client import NewAClient
from neonize.aioze.events import (
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    DisconnectedEv,
    HistorySyncEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    MessageEv,
    PairStatusEv,
    ReceiptEv,
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.exc import NeonizeError
from neonize.proto import Neonize_pb2 as nz
from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import ImageMessage, Message
from neonize.utils.enum import ChatPresence, ChatPresenceMedia, ClientName, ClientType, MediaType
from neonize.utils.enum import ReceiptType as NzReceiptType
from PIL import Image

from wamd_server.config import Config
from wamd_server.domain.errors import (
    DeviceBusy,
    NotConnected,
    RecipientNotOnWhatsApp,
    SessionMissing,
    TransportError,
)
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
    PairTimeout,
    QrCode,
    Receipt,
    ReceiptType,
    StreamReplaced,
    TemporaryBan,
    TransportEvent,
)
from wamd_server.domain.models import InboundMessage, OutboundMessage, SendResult
from wamd_server.domain.ports import Transport, TransportEventSink
from wamd_server.infra.whatsapp.event_line import EventLine, PreAction

log = logging.getLogger(__name__)

USER_SERVER: Final = "s.whatsapp.net"
LID_SERVER: Final = "lid"
GROUP_SERVER: Final = "g.us"
STATUS_BROADCAST: Final = "status@broadcast"

# whatsmeow's QR rotation: the first code lives ~60 s, the following ones ~20 s, ~160 s in all.
QR_FIRST_TTL_S: Final = 60.0
QR_NEXT_TTL_S: Final = 20.0
HISTORY_CHUNK_SIZE: Final = 500
# Seconds vs milliseconds: any epoch in seconds before the year 5138 is below this, any in ms after 1973 above.
_MS_THRESHOLD: Final = 100_000_000_000

Mode = Literal["idle", "qr", "code", "restore", "paired"]
T = TypeVar("T")
P = ParamSpec("P")


# --- the whatsmeow store ---------------------------------------------------------------------------------


def is_postgres_store(store: str) -> bool:
    return store.split("://", 1)[0].lower().split("+", 1)[0] in ("postgres", "postgresql")


def whatsmeow_dsn(store: str) -> str:
    """The database string neonize gives whatsmeow for `store` (a Postgres URL or a SQLite file path).

    Postgres goes to lib/pq, which only takes the `postgres://` URL form and defaults to `sslmode=require`;
    we add `sslmode=prefer` (libpq's default) unless the URL chose its own. SQLite gets WAL and a busy
    timeout; the trailing `_x=` absorbs the `?_foreign_keys=on` neonize appends to the path.
    """
    if is_postgres_store(store):
        parts = urlsplit("postgres://" + store.split("://", 1)[1])
        if not any(key == "sslmode" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
            parts = parts._replace(query=f"{parts.query}&sslmode=prefer" if parts.query else "sslmode=prefer")
        return urlunsplit(parts)
    if "?" in store:
        return store  # the operator chose their own SQLite parameters
    return f"{store}?_journal_mode=WAL&_busy_timeout=5000&_foreign_keys=on&_x="


class _StoreSql(Protocol):
    """Our own access to whatsmeow's device table (never neonize's `get_all_devices`)."""

    async def has_device(self, jid: str) -> bool: ...

    async def delete_device(self, jid: str) -> bool: ...

    async def close(self) -> None: ...


_HAS_DEVICE = "SELECT 1 FROM whatsmeow_device WHERE jid = {}"
_DELETE_DEVICE = "DELETE FROM whatsmeow_device WHERE jid = {}"  # per-device tables cascade


class _PostgresStore:
    """One lazily opened connection, reopened after a failure. Calls are rare (connect, logout)."""

    def __init__(self, url: str) -> None:
        # libpq takes the URL as given (its default sslmode is `prefer`); only the scheme is normalised.
        self._url = "postgresql://" + url.split("://", 1)[1]
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def has_device(self, jid: str) -> bool:
        return await self._run(_HAS_DEVICE.format("%s"), jid, fetch=True) > 0

    async def delete_device(self, jid: str) -> bool:
        return await self._run(_DELETE_DEVICE.format("%s"), jid, fetch=False) > 0

    async def _run(self, sql: str, jid: str, *, fetch: bool) -> int:
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = await psycopg.AsyncConnection.connect(
                            self._url, autocommit=True, connect_timeout=10
                        )
                    cursor = await self._conn.execute(sql, (jid,))
                    return len(await cursor.fetchall()) if fetch else cursor.rowcount
                except psycopg.errors.UndefinedTable:
                    return 0  # no device was ever stored: whatsmeow creates its tables on first use
                except psycopg.OperationalError as exc:
                    await self._drop()
                    if attempt == 2:
                        raise TransportError(f"the WhatsApp session store is unreachable: {exc}") from exc
            raise AssertionError("unreachable")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


class _SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path

    async def has_device(self, jid: str) -> bool:
        return await asyncio.to_thread(self._run, _HAS_DEVICE.format("?"), jid, True) > 0

    async def delete_device(self, jid: str) -> bool:
        return await asyncio.to_thread(self._run, _DELETE_DEVICE.format("?"), jid, False) > 0

    def _run(self, sql: str, jid: str, fetch: bool) -> int:
        if not self._path.exists():
            return 0  # sqlite3 would create an empty file
        conn = sqlite3.connect(self._path, timeout=5.0)
        try:
            conn.execute("PRAGMA foreign_keys = ON")  # else the per-device rows would not cascade
            with conn:
                cursor = conn.execute(sql, (jid,))
                return len(cursor.fetchall()) if fetch else cursor.rowcount
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise TransportError(f"the WhatsApp session store failed: {exc}") from exc
        finally:
            conn.close()

    async def close(self) -> None:
        return None


def _sqlite_path(store: str) -> Path:
    path = store.split("?", 1)[0]
    return Path(path.removeprefix("file:"))


# --- threads and the Go maps -----------------------------------------------------------------------------


class _ElasticExecutor(ThreadPoolExecutor):
    """A default executor whose capacity grows with the number of running clients.

    Each running client's `Neonize()` call blocks one thread for the client's whole life; with a fixed pool
    the next client would starve every other Go call. Threads are daemons: a pairing session that timed out
    can leave its `Neonize()` call blocked in Go for good (it waits for a device id that never comes), and
    `ThreadPoolExecutor`'s exit hook would join it forever. A subclass only because
    `loop.set_default_executor` insists on a `ThreadPoolExecutor`; none of the base machinery is used.
    """

    def __init__(self, capacity: int, *, idle_timeout_s: float = 60.0, shutdown_wait_s: float = 2.0) -> None:
        super().__init__(max_workers=1, thread_name_prefix="neonize-unused")
        self._cv = threading.Condition()
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._capacity = capacity
        self._live_threads = 0
        self._idle = 0
        self._busy = 0
        self._unstarted = 0
        self._closed = False
        self._idle_timeout_s = idle_timeout_s
        self._shutdown_wait_s = shutdown_wait_s
        self._serial = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def threads(self) -> int:
        return self._live_threads

    @property
    def unstarted(self) -> int:
        """Calls submitted whose thread has not begun running them yet."""
        return self._unstarted

    @property
    def busy(self) -> int:
        """Threads running a call now, including `Neonize()` calls that block for a client's life."""
        return self._busy

    def ensure_capacity(self, capacity: int) -> None:
        with self._cv:
            self._capacity = max(self._capacity, capacity)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.append((future, fn, args, kwargs))
            self._unstarted += 1
            if self._idle >= len(self._jobs):
                self._cv.notify()
            elif self._live_threads < self._capacity:
                self._live_threads += 1
                self._serial += 1
                threading.Thread(target=self._work, name=f"neonize-{self._serial}", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    if self._closed:
                        self._live_threads -= 1
                        self._cv.notify_all()
                        return
                    self._idle += 1
                    woken = self._cv.wait(self._idle_timeout_s)
                    self._idle -= 1
                    if not woken and not self._jobs:
                        self._live_threads -= 1
                        return
                future, fn, args, kwargs = self._jobs.popleft()
                self._busy += 1
            try:
                with self._cv:
                    self._unstarted -= 1
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._closed = True
            if cancel_futures:
                while self._jobs:
                    self._jobs.popleft()[0].cancel()
                    self._unstarted -= 1
            self._cv.notify_all()
            if wait:
                # Bounded: a Go call may never return (see the class docstring); daemon threads die with us.
                deadline = time.monotonic() + self._shutdown_wait_s
                while (self._busy or self._jobs) and time.monotonic() < deadline:
                    self._cv.wait(max(deadline - time.monotonic(), 0.0))
        super().shutdown(wait=False)


class _GoGate:
    """Keeps neonize's unsynchronised Go maps (`clients`, `StopSignal`, `eventChannel`) from concurrent use.

    Writers (`Neonize()` at connect, `Stop()`) hold the gate one at a time. Readers (every other call on a
    client, which first looks the client up in `clients`) do not hold it; they only start while no write
    may be in progress, and a writer first lets calls already submitted to the executor begin (their
    lookup is the first thing they do in Go).
    """

    def __init__(
        self, unstarted: Callable[[], int] = lambda: 0, *, drain_s: float = 0.001, max_wait_s: float = 0.05
    ) -> None:
        self._lock = asyncio.Lock()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._unstarted = unstarted
        self._drain_s = drain_s
        self._max_wait_s = max_wait_s

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._lock:
            self._quiet.clear()
            try:
                deadline = time.monotonic() + self._max_wait_s
                # Polled: the count changes in executor threads, and this wait is rare and a few ms long.
                while self._unstarted() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(self._drain_s)
                await asyncio.sleep(self._drain_s)
                yield
            finally:
                self._quiet.set()
                await asyncio.sleep(0)  # readers woken by set() submit their calls before the next writer

    async def quiet(self) -> None:
        await self._quiet.wait()


# --- mapping neonize's protobuf events to domain events (pure) ----------------------------------------------


_LOGOUT_REASONS: Final[dict[int, LogoutReason]] = {
    nz.GENERIC: LogoutReason.GENERIC,
    nz.LOGGED_OUT: LogoutReason.LOGGED_OUT,
    nz.TEMP_BANNED: LogoutReason.TEMP_BANNED,
    nz.MAIN_DEVICE_GONE: LogoutReason.MAIN_DEVICE_GONE,
    nz.UNKNOWN_LOGOUT: LogoutReason.UNKNOWN_LOGOUT,
    nz.CLIENT_OUTDATED: LogoutReason.CLIENT_OUTDATED,
    nz.BAD_USER_AGENT: LogoutReason.BAD_USER_AGENT,
}

_RECEIPT_TYPES: Final[dict[int, ReceiptType]] = {
    nz.Receipt.DELIVERED: ReceiptType.DELIVERED,
    nz.Receipt.READ: ReceiptType.READ,
    nz.Receipt.PLAYED: ReceiptType.PLAYED,
}

# Wrappers whatsmeow normally unwraps already; unwrapped again in case a message arrives wrapped.
_WRAPPERS: Final = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "editedMessage",
)


def logout_reason(value: int) -> LogoutReason:
    """whatsmeow's connect-failure reason of a `LoggedOut` event; server errors count as unknown logouts."""
    return _LOGOUT_REASONS.get(value, LogoutReason.UNKNOWN_LOGOUT)


def from_epoch(value: int) -> datetime:
    """A neonize timestamp as an aware UTC datetime.

    `MessageInfo.Timestamp` is Unix milliseconds (Go `UnixMilli`), receipts and send responses are seconds;
    the magnitude tells them apart, so a unit change in a later neonize cannot shift dates by 1000x.
    """
    if value <= 0:
        return datetime.now(UTC)
    seconds = value / 1000 if value >= _MS_THRESHOLD else float(value)
    return datetime.fromtimestamp(seconds, UTC)


def jid_to_str(jid: Any, *, keep_device: bool = False) -> str:
    """`user@server`, or `user:device@server` with `keep_device` (whatsmeow's `JID.String()` form)."""
    server, user = str(jid.Server), str(jid.User)
    if not server:
        return ""
    if not user:
        return server
    if keep_device:
        if int(jid.RawAgent):
            return f"{user}.{int(jid.RawAgent)}:{int(jid.Device)}@{server}"
        if int(jid.Device):
            return f"{user}:{int(jid.Device)}@{server}"
    return f"{user}@{server}"


def non_ad(jid: str) -> str:
    """Drop the agent and device parts: `60123.1:4@s.whatsapp.net` → `60123@s.whatsapp.net`."""
    if "@" not in jid:
        return jid
    user, server = jid.rsplit("@", 1)
    user = user.split(":", 1)[0]
    if server in (USER_SERVER, LID_SERVER):
        user = user.split(".", 1)[0]
    return f"{user}@{server}"


def build_jid(value: str) -> Any:
    """A neonize JID from digits or a JID string (all proto2 fields set: a partial JID cannot serialise)."""
    value = value.strip()
    if "@" not in value:
        digits = "".join(ch for ch in value if ch.isdigit())
        if not digits:
            raise TransportError(f"not a phone number or JID: {value!r}", retryable=False)
        return nz.JID(User=digits, RawAgent=0, Device=0, Integrator=0, Server=USER_SERVER, IsEmpty=False)
    user, server = value.rsplit("@", 1)
    device = agent = 0
    if ":" in user:
        user, device_part = user.split(":", 1)
        device = int(device_part) if device_part.isdigit() else 0
    if "." in user and server in (USER_SERVER, LID_SERVER):
        user, agent_part = user.split(".", 1)
        agent = int(agent_part) if agent_part.isdigit() else 0
    return nz.JID(User=user, RawAgent=agent, Device=device, Integrator=0, Server=server, IsEmpty=False)


def restore_jid(jid: str) -> Any:
    """The JID to restore a stored device with: device number inside `User` (`"60123:4"`, Device 0).

    Go stringifies it back to the stored key `60123:4@s.whatsapp.net`, and neonize's uuid becomes `60123:4`,
    unique per linked device even when one phone is linked twice.
    """
    user, server = jid.rsplit("@", 1)
    return nz.JID(User=user, RawAgent=0, Device=0, Integrator=0, Server=server, IsEmpty=False)


def _unwrap(message: Any) -> Any:
    for _ in range(4):
        for wrapper in _WRAPPERS:
            if message.HasField(wrapper) and getattr(message, wrapper).HasField("message"):
                message = getattr(message, wrapper).message
                break
        else:
            return message
    return message


def message_content(message: Any) -> tuple[str, str | None]:
    """Text (or caption) and media kind of a WhatsApp message; ("", None) when it is neither."""
    message = _unwrap(message)
    if message.conversation:
        return str(message.conversation), None
    if message.HasField("extendedTextMessage"):
        return str(message.extendedTextMessage.text), None
    if message.HasField("imageMessage"):
        return str(message.imageMessage.caption), "image"
    if message.HasField("videoMessage"):
        return str(message.videoMessage.caption), "video"
    if message.HasField("documentMessage"):
        return str(message.documentMessage.caption), "document"
    if message.HasField("audioMessage"):
        return "", "audio"
    if message.HasField("stickerMessage"):
        return "", "sticker"
    return "", None


def _pn_and_lid(primary: Any, alternative: Any) -> tuple[str | None, str | None]:
    """The phone-number JID and the LID among a sender JID and its alternative (either may be empty)."""
    pn = lid = None
    for jid in (primary, alternative):
        if jid.Server == USER_SERVER and jid.User and pn is None:
            pn = jid_to_str(jid)
        elif jid.Server == LID_SERVER and jid.User and lid is None:
            lid = jid_to_str(jid)
    return pn, lid


def chat_jid_of(source: Any) -> str:
    """The chat a message or receipt belongs to, by phone number when WhatsApp addressed it by LID."""
    chat = source.Chat
    if chat.Server == LID_SERVER and not source.IsGroup:
        alternative = source.RecipientAlt if source.IsFromMe else source.SenderAlt
        if alternative.Server == USER_SERVER and alternative.User:
            return jid_to_str(alternative)
    return jid_to_str(chat)


def inbound_message(event: Any) -> InboundMessage | None:
    """A `MessageEv` as an `InboundMessage`; None for what is not a chat message (reactions, protocol
    messages, status updates, newsletters)."""
    info = event.Info
    source = info.MessageSource
    chat = chat_jid_of(source)
    if not chat or chat == STATUS_BROADCAST or chat.endswith("@newsletter") or not info.ID:
        return None
    text, media = message_content(event.Message)
    if not text and media is None:
        return None
    pn, lid = _pn_and_lid(source.Sender, source.SenderAlt)
    sender = pn or lid or jid_to_str(source.Sender)
    return InboundMessage(
        wa_id=str(info.ID),
        chat_jid=chat,
        sender_jid=sender,
        sender_phone=pn.split("@", 1)[0] if pn else None,
        from_me=bool(source.IsFromMe),
        is_group=bool(source.IsGroup),
        text=text,
        timestamp=from_epoch(int(info.Timestamp)),
        push_name=str(info.Pushname) or None,
        media_type=media,
        sender_lid=lid,
    )


def receipt_event(device_id: UUID, event: Any) -> Receipt | None:
    kind = _RECEIPT_TYPES.get(int(event.Type))
    if kind is None or not event.MessageIDs:
        return None  # retries, our own other devices reading, server errors: nothing to record
    return Receipt(
        device_id,
        chat_jid=chat_jid_of(event.MessageSource),
        message_ids=tuple(str(i) for i in event.MessageIDs),
        type=kind,
        timestamp=from_epoch(int(event.Timestamp)),
    )


def history_chunks(
    device_id: UUID, event: Any, *, own_jid: str | None = None, chunk_size: int = HISTORY_CHUNK_SIZE
) -> list[HistoryChunk]:
    """The chat messages of a `HistorySyncEv`, in chunks of at most `chunk_size` messages."""
    data = event.Data
    lid_to_pn = {
        non_ad(str(m.lidJID)): non_ad(str(m.pnJID)) for m in data.phoneNumberToLidMappings if m.lidJID and m.pnJID
    }
    me = non_ad(own_jid) if own_jid else ""
    messages: list[InboundMessage] = []
    for conversation in data.conversations:
        raw_chat = non_ad(str(conversation.ID))
        chat = lid_to_pn.get(raw_chat, raw_chat)
        if not chat or chat == STATUS_BROADCAST or chat.endswith("@newsletter"):
            continue
        for item in conversation.messages:
            message = _history_message(item.message, chat, raw_chat, me, lid_to_pn)
            if message is not None:
                messages.append(message)
    progress = int(data.progress)
    size = max(chunk_size, 1)
    return [
        HistoryChunk(device_id, messages=tuple(messages[i : i + size]), progress=progress)
        for i in range(0, len(messages), size)
    ]


def _history_message(web: Any, chat: str, raw_chat: str, me: str, lid_to_pn: dict[str, str]) -> InboundMessage | None:
    key = web.key
    if not key.ID:
        return None
    text, media = message_content(web.message)
    if not text and media is None:
        return None
    is_group = chat.endswith("@" + GROUP_SERVER)
    if key.fromMe:
        raw_sender = me
    elif is_group:
        raw_sender = non_ad(str(key.participant or web.participant))
    else:
        raw_sender = raw_chat
    sender = lid_to_pn.get(raw_sender, raw_sender)
    lid = raw_sender if raw_sender.endswith("@" + LID_SERVER) else None
    return InboundMessage(
        wa_id=str(key.ID),
        chat_jid=chat,
        sender_jid=sender,
        sender_phone=sender.split("@", 1)[0] if sender.endswith("@" + USER_SERVER) else None,
        from_me=bool(key.fromMe),
        is_group=is_group,
        text=text,
        timestamp=from_epoch(int(web.messageTimestamp)),
        push_name=str(web.pushName) or None,
        media_type=media,
        sender_lid=lid,
    )


def map_event(
    device_id: UUID,
    event: Any,
    *,
    own_jid: str | None = None,
    will_retry: bool = True,
    history_chunk_size: int = HISTORY_CHUNK_SIZE,
) -> list[TransportEvent]:
    """The domain events for one neonize event (none for what the domain does not track).

    `will_retry` is whether whatsmeow will reconnect after a `DisconnectedEv` (it does after a remote drop,
    unless the session was stopped).
    """
    if isinstance(event, MessageEv):
        message = inbound_message(event)
        return [MessageReceived(device_id, message)] if message is not None else []
    if isinstance(event, ReceiptEv):
        receipt = receipt_event(device_id, event)
        return [receipt] if receipt is not None else []
    if isinstance(event, ConnectedEv):
        return [Connected(device_id)]
    if isinstance(event, DisconnectedEv):
        return [Disconnected(device_id, reason="connection lost", will_retry=will_retry)]
    if isinstance(event, LoggedOutEv):
        return [LoggedOut(device_id, reason=logout_reason(int(event.Reason)), on_connect=bool(event.OnConnect))]
    if isinstance(event, TemporaryBanEv):
        code = nz.TemporaryBan.TempBanReason.Name(event.Code).lower() if event.Code else "unknown"
        return [TemporaryBan(device_id, code=code, expires_in_s=max(int(event.Expire), 0))]
    if isinstance(event, StreamReplacedEv):
        return [StreamReplaced(device_id)]
    if isinstance(event, KeepAliveTimeoutEv):
        return [KeepAliveTimeout(device_id, error_count=int(event.ErrorCount))]
    if isinstance(event, ConnectFailureEv):
        name = nz.ConnectFailureReason.Name(event.Reason).lower() if event.Reason else "unknown"
        reason = f"{name}: {event.Message}" if event.Message else name
        return [ConnectFailure(device_id, reason=reason)]
    if isinstance(event, ClientOutdatedEv):
        return [ConnectFailure(device_id, reason="client_outdated: WhatsApp rejects this neonize version")]
    if isinstance(event, PairStatusEv):
        if event.Status != nz.PairStatus.SUCCESS:
            return []
        return [Paired(device_id, jid=jid_to_str(event.ID, keep_device=True), phone=str(event.ID.User))]
    if isinstance(event, HistorySyncEv):
        return list(history_chunks(device_id, event, own_jid=own_jid, chunk_size=history_chunk_size))
    return []


def pairing_error(event: Any) -> str | None:
    """The error of a failed `PairStatusEv`, else None."""
    if isinstance(event, PairStatusEv) and event.Status == nz.PairStatus.ERROR:
        return str(event.Error) or "pairing failed"
    return None


_NOT_CONNECTED = re.compile(
    r"websocket not connected|not logged in|client is nil|client not found|doesn't contain a device|not connected",
    re.IGNORECASE,
)


def transport_error(exc: BaseException, action: str) -> TransportError:
    """A neonize error as a domain error: not-connected ones as `NotConnected`, the rest retryable."""
    text = str(exc).strip() or type(exc).__name__
    if _NOT_CONNECTED.search(text):
        return NotConnected(f"{action}: {text}")
    return TransportError(f"{action}: {text}", retryable=True, details={"neonize": type(exc).__name__})


# --- sessions --------------------------------------------------------------------------------------------


class _Attempt:
    """One `Neonize()` call: a client object with its own Go key, from its start until Go forgets the key.

    Each attempt gets a fresh uuid, so a new attempt never shares Go state with an older one still winding
    down, and a late `Stop()` of the old one cannot hit the new one.
    """

    __slots__ = ("client", "jid", "mode", "registered", "settled", "stop_requested", "stopped", "task", "uuid")

    def __init__(self, client: Any, mode: Mode, jid: str | None) -> None:
        self.client = client
        self.uuid = client.uuid.decode()
        self.mode = mode  # what it was started for: "qr", "code" or "restore"
        self.jid = jid  # the device's JID (a pairing attempt learns it when paired)
        self.registered = False  # Go's maps may hold the uuid: from the start until our Stop()
        self.stop_requested = False
        self.settled = asyncio.Event()  # the start is past its Go map writes (event, QR code or return)
        self.stopped = asyncio.Event()  # Go forgot the uuid
        self.task: asyncio.Task[Any] | None = None

    @property
    def active(self) -> bool:
        return self.registered and not self.stop_requested

    def is_registered(self) -> bool:
        """`registered`, read again after an await (a method, so type checkers do not assume it unchanged)."""
        return self.registered


class _Session:
    """What the transport knows about one device. Small: thousands of these live at once."""

    __slots__ = (
        "attempt",
        "device_id",
        "events",
        "first_qr",
        "jid",
        "live",
        "lock",
        "mode",
        "muted",
        "outcome",
        "pair_timer",
        "qr_count",
        "wanted",
    )

    def __init__(self, device_id: UUID) -> None:
        self.device_id = device_id
        self.attempt: _Attempt | None = None  # the current one; callbacks of others are ignored
        self.jid: str | None = None
        self.mode: Mode = "idle"
        self.live = False  # connected, as far as the last event says
        self.wanted = False  # the owner wants it connected (whatsmeow may reconnect it)
        self.muted = False  # connected only to be logged out: report nothing to the sink
        self.first_qr: asyncio.Future[None] | None = None
        self.outcome: asyncio.Future[None] | None = None  # resolved on Connected (logout's reconnect)
        self.pair_timer: asyncio.TimerHandle | None = None
        self.qr_count = 0
        self.lock = asyncio.Lock()  # one command at a time per device
        self.events = EventLine()

    @property
    def active(self) -> bool:
        return self.attempt is not None and self.attempt.active

    def cancel_timer(self) -> None:
        if self.pair_timer is not None:
            self.pair_timer.cancel()
            self.pair_timer = None


class NeonizeTransport:
    """The `Transport` port over neonize. Create it with `from_config`; `start` before use."""

    name = "neonize"

    def __init__(
        self,
        store: str,
        *,
        connects_per_second: float = 50.0,
        connect_settle_s: float = 0.1,
        whatsmeow_log_level: int | str = logging.WARNING,
        qr_timeout_s: float = 170.0,
        first_qr_timeout_s: float = 30.0,
        stop_wait_s: float = 5.0,
        close_timeout_s: float = 10.0,
        logout_connect_timeout_s: float = 15.0,
        history_chunk_size: int = HISTORY_CHUNK_SIZE,
        check_recipients: bool = True,
        device_name: str = "WAMD",
        proxy: str | None = None,
        thread_headroom: int = 64,
    ) -> None:
        """`store`: a `postgres://` URL or a SQLite file path (see `whatsmeow_dsn`).

        Each start holds the Go-map gate until it settles (failed, connected, first QR) or for
        `max(1 / connects_per_second, connect_settle_s)`, whichever comes first: whatsmeow writes the maps
        after opening its database, so a start must not overlap the previous one's writes.

        Commands that stop a client wait at most `stop_wait_s` for it (a dial in progress cannot be
        interrupted: the stop then completes in the background); `close` at most `close_timeout_s`.

        `proxy`: an optional `socks5://` or `http://` proxy URL for every client (websocket and media).
        """
        if connects_per_second <= 0:
            raise ValueError("connects_per_second must be positive")
        self._store_spec = store
        self._dsn = whatsmeow_dsn(store)
        self._sql: _StoreSql = (
            _PostgresStore(store) if is_postgres_store(store) else _SqliteStore(_sqlite_path(self._dsn))
        )
        self._hold_s = max(1.0 / connects_per_second, connect_settle_s)
        self._log_level = whatsmeow_log_level
        self._qr_timeout_s = qr_timeout_s
        self._first_qr_timeout_s = first_qr_timeout_s
        self._stop_wait_s = stop_wait_s
        self._close_timeout_s = close_timeout_s
        self._logout_connect_timeout_s = logout_connect_timeout_s
        self._history_chunk_size = history_chunk_size
        self._check_recipients = check_recipients
        self._props = DeviceProps(os=device_name, platformType=DeviceProps.CHROME)
        self._headroom = thread_headroom
        self._proxy = proxy
        self._executor = _ElasticExecutor(thread_headroom)
        self._gate = _GoGate(lambda: self._executor.unstarted)
        self._sink: TransportEventSink | None = None
        self._sessions: dict[UUID, _Session] = {}
        # Attempts whose Go call may still call back into their client object: kept alive until it returns
        # (a collected client would free the ctypes callbacks Go still holds).
        self._attempts: set[_Attempt] = set()
        self._closing: dict[str, _Attempt] = {}  # device JID -> its attempt whose stop is still under way
        self._serial = itertools.count(1)
        self._recipients: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False  # no new commands or events
        self._finished = False  # close is done: nothing more is started (the loop may be ending)

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> NeonizeTransport:
        """The transport for `config.wa_store`, paced by `config.connects_per_second`.

        whatsmeow logs at WARNING, or at the configured level when that is stricter: its DEBUG output crosses
        the FFI for every client and is never the default.
        """
        level = max(logging.WARNING, logging.getLevelName(config.log_level))
        options.setdefault("whatsmeow_log_level", level)
        options.setdefault("connects_per_second", config.connects_per_second)
        return cls(config.wa_store, **options)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, sink: TransportEventSink) -> None:
        loop = asyncio.get_running_loop()
        self._sink = sink
        self._closed = self._finished = False
        # Read by Go at every connect(); NOTSET would make Go forward DEBUG records over the FFI.
        logging.getLogger("neonize.utils.log").setLevel(self._log_level)
        # neonize keeps the first loop it saw in a module global; events must go to this one.
        neonize_events.event_global_loop = loop
        loop.set_default_executor(self._executor)
        if not is_postgres_store(self._store_spec):
            await asyncio.to_thread(_sqlite_path(self._dsn).parent.mkdir, parents=True, exist_ok=True)
        self._started = True

    async def close(self) -> None:
        """Stop every session (none is logged out) and release the store connection."""
        self._closed = True
        sessions = list(self._sessions.values())
        for session in sessions:
            session.wanted = False
            for future in (session.first_qr, session.outcome):
                if future is not None and not future.done():
                    future.cancel()
            await self._stop(session, wait=False)
        # Stops run concurrently (disconnects in parallel, Stop() calls one at a time behind the gate).
        pending = {a for s in sessions if (a := s.attempt) is not None and not a.stopped.is_set()}
        pending |= {a for a in self._closing.values() if not a.stopped.is_set()}
        if pending:
            waiters = [asyncio.ensure_future(a.stopped.wait()) for a in pending]
            _, late = await asyncio.wait(waiters, timeout=self._close_timeout_s)
            for waiter in late:
                waiter.cancel()
            if late:
                log.warning("%d WhatsApp clients did not stop in time (a dial in progress); leaving them", len(late))
        self._finished = True
        for attempt in self._attempts:
            # Its Go call has not returned. When the loop shuts down it cancels the connect task, and neonize
            # then calls Stop(uuid) on the loop thread, which waits out a dial in progress: point that call
            # at a key Go does not know, so it returns at once.
            attempt.client.uuid = f"closed:{attempt.uuid}".encode()
        for session in sessions:
            session.events.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._sql.close()
        self._started = False

    # --- pairing --------------------------------------------------------------------------------------

    async def pair_qr(self, device_id: UUID) -> None:
        session = self._session(device_id)
        async with session.lock:
            await self._begin_pairing(session, "qr")

    async def pair_code(self, device_id: UUID, phone: str) -> str:
        digits = "".join(ch for ch in phone if ch.isdigit())
        if not digits or digits != phone.strip().lstrip("+"):
            raise TransportError(f"not a phone number: {phone!r}", retryable=False)
        session = self._session(device_id)
        async with session.lock:
            client = await self._begin_pairing(session, "code")
            try:
                code = await client.PairPhone(
                    phone=digits,
                    show_push_notification=True,
                    client_name=ClientName.LINUX,
                    client_type=ClientType.CHROME,
                )
            except NeonizeError as exc:
                await self._stop(session)
                raise TransportError(f"WhatsApp refused a pairing code for +{digits}: {exc}", retryable=False) from exc
            return str(code)

    async def _begin_pairing(self, session: _Session, mode: Literal["qr", "code"]) -> Any:
        """Start a fresh pairing client and wait for its first QR code (the socket is then up)."""
        self._check_started()
        if session.live and session.mode in ("restore", "paired"):
            raise DeviceBusy("the device is connected; log it out before pairing again")
        await self._stop(session)
        uuid = f"pair-{session.device_id}-{next(self._serial)}"
        client = _new_client(NewAClient(self._dsn, props=self._props, uuid=uuid, new_device=True))
        attempt = _Attempt(client, mode, None)
        session.jid = None
        session.wanted = False
        session.first_qr = first_qr = _future()
        await self._launch(session, attempt)
        if session.attempt is attempt and session.mode == mode:  # else the start already failed
            session.pair_timer = asyncio.get_running_loop().call_later(
                self._qr_timeout_s, self._spawn_pair_timeout, session, attempt
            )
        try:
            await asyncio.wait_for(asyncio.shield(first_qr), self._first_qr_timeout_s)
        except TimeoutError:
            await self._stop(session)
            raise TransportError("WhatsApp sent no QR code in time", retryable=True) from None
        except asyncio.CancelledError:
            if first_qr.cancelled():  # stopped by `close`, not a cancellation of this call
                raise TransportError("pairing was cancelled", retryable=True) from None
            raise
        await self._ready(session, client, live=False)
        return client

    def _spawn_pair_timeout(self, session: _Session, attempt: _Attempt) -> None:
        session.pair_timer = None
        self._spawn(self._pair_timed_out(session, attempt))

    async def _pair_timed_out(self, session: _Session, attempt: _Attempt) -> None:
        async with session.lock:
            if session.attempt is not attempt or session.mode not in ("qr", "code"):
                return  # paired, cancelled or restarted meanwhile
            log.info("device %s: pairing timed out without a scan", session.device_id)
            await self._stop(session)
            self._enqueue(session, None, PairTimeout(session.device_id))

    # --- sessions -------------------------------------------------------------------------------------

    async def has_session(self, jid: str) -> bool:
        return await self._sql.has_device(jid)

    async def connect(self, device_id: UUID, jid: str) -> None:
        self._check_started()
        session = self._session(device_id)
        async with session.lock:
            if session.active and session.jid == jid and session.mode in ("restore", "paired"):
                session.wanted = True
                return
            await self._stop(session)
            await self._restore(session, jid)

    async def _restore(self, session: _Session, jid: str) -> None:
        if "@" not in jid:
            raise SessionMissing(f"not a device JID: {jid!r}")
        closing = self._closing.get(jid)
        if closing is not None:
            # Two clients with the same keys would knock each other off (StreamReplaced).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.stopped.wait(), self._stop_wait_s)
            if not closing.stopped.is_set():
                raise TransportError("the device's previous connection is still closing; try again", retryable=True)
        key = restore_jid(jid)
        client = _new_client(NewAClient(self._dsn, jid=key, props=self._props))
        client.uuid = f"{key.User}#{next(self._serial)}".encode()  # neonize would key every attempt by jid.User
        attempt = _Attempt(client, "restore", jid)
        session.jid = jid
        session.wanted = True

        async def precheck() -> None:
            # Inside the gate, so `forget` cannot delete the row between this check and Go's lookup:
            # whatsmeow dereferences a nil device for an unknown JID and the process aborts.
            if not await self._sql.has_device(jid):
                raise SessionMissing()

        try:
            await self._launch(session, attempt, precheck=precheck)
        except SessionMissing:
            session.wanted = False
            raise

    async def disconnect(self, device_id: UUID) -> None:
        session = self._sessions.get(device_id)
        if session is None:
            return
        session.wanted = False
        session.cancel_timer()
        async with session.lock:
            session.wanted = False
            await self._stop(session)

    async def logout(self, device_id: UUID, jid: str) -> None:
        self._check_started()
        session = self._session(device_id)
        session.wanted = False
        async with session.lock:
            session.wanted = False
            failure: BaseException | None = None
            try:
                client = None
                if session.active and session.live and session.jid == jid and session.attempt is not None:
                    client = session.attempt.client
                if client is None and await self._sql.has_device(jid):
                    client = await self._connect_for_logout(session, jid)
                if client is not None:
                    session.muted = True  # our own unlink is not news for the owner
                    await self._ready(session, client)
                    await client.logout()
            except (NeonizeError, TransportError, TimeoutError) as exc:
                failure = exc
            finally:
                await self._stop(session)
                session.muted = False
                # First the user's decision: the credentials go even when WhatsApp could not be told.
                await self._delete_rows(jid)
            if failure is not None:
                raise TransportError(f"could not unlink the device on WhatsApp: {failure}", retryable=True)

    async def _connect_for_logout(self, session: _Session, jid: str) -> Any:
        """Restore the session quietly, only to unlink it; None if WhatsApp already dropped it."""
        await self._stop(session)
        session.muted = True
        session.outcome = outcome = _future()
        try:
            await self._restore(session, jid)
        except SessionMissing:
            return None
        session.wanted = False
        await asyncio.wait_for(asyncio.shield(outcome), self._logout_connect_timeout_s)
        return session.attempt.client if session.live and session.attempt is not None else None

    async def forget(self, jid: str) -> None:
        for session in [s for s in self._sessions.values() if s.jid == jid]:
            session.wanted = False
            async with session.lock:
                if session.jid == jid:
                    await self._stop(session)
        await self._delete_rows(jid)

    async def _delete_rows(self, jid: str) -> None:
        async with self._gate.writing():  # never while a restore checks and opens this row
            await self._sql.delete_device(jid)

    # --- messaging ------------------------------------------------------------------------------------

    async def send(self, device_id: UUID, message: OutboundMessage) -> SendResult:
        session, client = self._live(device_id)
        to = await self._recipient(session, client, message.to)
        if message.image is not None:
            body = await self._image_message(session, client, message)
        elif message.text:
            # A Message object, not a str: neonize would turn "@123" in the text into mentions.
            body = Message(conversation=message.text)
        else:
            raise TransportError("nothing to send: no text and no image", retryable=False)
        await self._ready(session, client)
        try:
            response = await client.send_message(to, body)
        except NeonizeError as exc:
            raise transport_error(exc, "send failed") from exc
        return SendResult(wa_id=str(response.ID), server_timestamp=from_epoch(int(response.Timestamp)))

    async def _image_message(self, session: _Session, client: Any, message: OutboundMessage) -> Any:
        assert message.image is not None
        try:
            thumbnail, width, height, sniffed = await asyncio.to_thread(_thumbnail, message.image)
        except OSError as exc:
            raise TransportError(f"not an image: {exc}", retryable=False) from exc
        await self._ready(session, client)
        try:
            upload = await client.upload(message.image, MediaType.MediaImage)
        except NeonizeError as exc:
            raise transport_error(exc, "image upload failed") from exc
        return Message(
            imageMessage=ImageMessage(
                URL=upload.url,
                directPath=upload.DirectPath,
                mediaKey=upload.MediaKey,
                fileEncSHA256=upload.FileEncSHA256,
                fileSHA256=upload.FileSHA256,
                fileLength=upload.FileLength,
                mimetype=message.image_mime or sniffed,
                caption=message.text or None,
                JPEGThumbnail=thumbnail,
                width=width,
                height=height,
            )
        )

    async def _recipient(self, session: _Session, client: Any, to: str) -> Any:
        """The JID to send to. Phone numbers are checked once (cached): whatsmeow accepts a send to a
        number without WhatsApp and nothing is ever delivered; WhatsApp also answers the canonical JID
        (e.g. Brazil's ninth digit)."""
        jid = build_jid(to)
        if not self._check_recipients or jid.Server != USER_SERVER:
            return jid
        digits = str(jid.User)
        now = time.monotonic()
        cached = self._recipients.get(digits)
        if cached is not None and cached[1] > now:
            self._recipients.move_to_end(digits)
            resolved = cached[0]
        else:
            await self._ready(session, client)
            try:
                answers = await client.is_on_whatsapp("+" + digits)
            except NeonizeError as exc:
                raise transport_error(exc, "could not check the recipient") from exc
            resolved = _resolve_recipient(answers)
            ttl = 86_400.0 if resolved else 3_600.0
            self._recipients[digits] = (resolved, now + ttl)
            while len(self._recipients) > 50_000:
                self._recipients.popitem(last=False)
        if resolved is None:
            raise RecipientNotOnWhatsApp(f"+{digits} is not on WhatsApp")
        return build_jid(resolved)

    async def mark_read(self, device_id: UUID, chat_jid: str, sender_jid: str, wa_ids: Sequence[str]) -> None:
        if not wa_ids:
            return
        session, client = self._live(device_id)
        await self._ready(session, client)
        try:
            await client.mark_read(
                *wa_ids,
                chat=build_jid(chat_jid),
                sender=build_jid(sender_jid or chat_jid),
                receipt=NzReceiptType.READ,
            )
        except NeonizeError as exc:
            raise transport_error(exc, "mark read failed") from exc

    async def set_typing(self, device_id: UUID, chat_jid: str, typing: bool) -> None:
        session, client = self._live(device_id)
        state = ChatPresence.CHAT_PRESENCE_COMPOSING if typing else ChatPresence.CHAT_PRESENCE_PAUSED
        await self._ready(session, client)
        try:
            await client.send_chat_presence(build_jid(chat_jid), state, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT)
        except NeonizeError as exc:
            raise transport_error(exc, "typing indicator failed") from exc

    async def probe(self, device_id: UUID, timeout_s: float) -> bool:
        try:
            session, client = self._live(device_id)
            await self._ready(session, client)
            # `is_connected` is a property returning a coroutine (neonize.md §3): it must be awaited.
            return bool(await asyncio.wait_for(client.is_connected, timeout_s))
        except (NotConnected, NeonizeError, TimeoutError):
            return False

    def _live(self, device_id: UUID) -> tuple[_Session, Any]:
        session = self._sessions.get(device_id)
        if session is None or session.attempt is None or not session.active or not session.live or session.muted:
            raise NotConnected("the device is not connected")
        return session, session.attempt.client

    async def _ready(self, session: _Session, client: Any, *, live: bool = True) -> None:
        """Right before a Go call on `client`: wait until no Go-map write may be in progress, then check the
        client is still registered in Go (several calls dereference a nil client and abort the process)."""
        await self._gate.quiet()
        attempt = session.attempt
        if attempt is None or attempt.client is not client or not attempt.active or (live and not session.live):
            raise NotConnected("the device is not connected")

    # --- starting and stopping Go clients ---------------------------------------------------------------

    async def _launch(
        self, session: _Session, attempt: _Attempt, *, precheck: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Run `connect()` behind the gate and hold the gate until the start settles or the stagger ends."""
        async with self._gate.writing():
            if self._closed:
                raise NotConnected("the transport is closed")
            if precheck is not None:
                await precheck()
            session.attempt = attempt
            session.mode = attempt.mode
            session.live = False
            session.qr_count = 0
            self._register_handlers(session, attempt)
            # Busy threads include Neonize() calls blocked for good (see _ElasticExecutor).
            self._executor.ensure_capacity(self._executor.busy + 1 + self._headroom)
            attempt.registered = True
            self._attempts.add(attempt)
            try:
                task = await attempt.client.connect(ProxySettings(proxy_address=self._proxy) if self._proxy else None)
            except Exception as exc:
                attempt.registered = False
                attempt.stopped.set()
                self._attempts.discard(attempt)
                session.mode = "idle"
                raise transport_error(exc, "could not start the WhatsApp client") from exc
            attempt.task = task
            task.add_done_callback(lambda done: self._on_task_done(session, attempt, done))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.settled.wait(), self._hold_s)

    async def _stop(self, session: _Session, *, wait: bool = True) -> None:
        """End the session's current attempt (keeps the credentials). No event is reported.

        A start that has not settled is stopped once it does: Go's Stop() would wait for the dial (whatsmeow
        holds its socket lock while dialing, up to a minute), and a dial that later succeeded would leave a
        connected client nobody owns. `wait` bounds how long the caller waits for Go to let go.
        """
        session.cancel_timer()
        session.live = False
        session.mode = "idle"
        if session.first_qr is not None and not session.first_qr.done():
            session.first_qr.cancel()
        attempt = session.attempt
        if attempt is None:
            return
        if not attempt.stop_requested:
            attempt.stop_requested = True
            if not attempt.registered:
                attempt.stopped.set()
            else:
                if attempt.jid is not None:
                    self._closing[attempt.jid] = attempt  # a restore of this JID waits for it
                if attempt.settled.is_set():
                    self._spawn(self._go_stop(attempt))
        if wait and not attempt.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.stopped.wait(), self._stop_wait_s)

    def _settle(self, attempt: _Attempt) -> None:
        if attempt.settled.is_set():
            return
        attempt.settled.set()
        if attempt.stop_requested and attempt.registered and not self._finished:
            self._spawn(self._go_stop(attempt))

    async def _go_stop(self, attempt: _Attempt) -> None:
        """Make Go forget the attempt's uuid (its client disconnects). Only for a settled start."""
        try:
            if not attempt.registered:
                return
            if attempt.task is not None and not attempt.task.done():
                # Disconnect first, outside the gate: it may wait out a reconnect dial; Stop()'s own
                # disconnect is then instant and the gate is held only for the map writes.
                await self._gate.quiet()
                if attempt.registered:
                    try:
                        await attempt.client.disconnect()
                    except Exception:
                        log.debug("disconnecting %s failed", attempt.uuid, exc_info=True)
            async with self._gate.writing():
                if not attempt.is_registered():  # another stop got here first
                    return
                attempt.registered = False
                try:
                    await attempt.client.stop()
                except Exception:
                    log.exception("stopping the WhatsApp client %s failed", attempt.uuid)
        finally:
            if not attempt.registered:
                attempt.stopped.set()
                if attempt.jid is not None and self._closing.get(attempt.jid) is attempt:
                    del self._closing[attempt.jid]

    def _on_task_done(self, session: _Session, attempt: _Attempt, task: asyncio.Task[Any]) -> None:
        """`Neonize()` returned: after our stop, or on a setup or connect error (no retry follows)."""
        error = None if task.cancelled() else task.exception()
        self._attempts.discard(attempt)
        if attempt.stop_requested or self._closed:
            self._settle(attempt)  # stops it if it was waiting for that
            return
        # Ended by itself: Go still maps the uuid to the dead client.
        attempt.stop_requested = True
        attempt.settled.set()
        self._spawn(self._go_stop(attempt))
        if session.attempt is not attempt:
            return
        reason = str(error) if error is not None else "the WhatsApp client ended"
        log.info("device %s: WhatsApp client ended (%s): %s", session.device_id, attempt.mode, reason)
        mode = session.mode
        session.mode = "idle"
        session.live = False
        session.cancel_timer()
        failure = TransportError(f"could not reach WhatsApp: {reason}", retryable=True)
        if session.first_qr is not None and not session.first_qr.done():
            session.first_qr.set_exception(failure)
            return
        if session.outcome is not None and not session.outcome.done():
            session.outcome.set_exception(failure)
        if mode in ("qr", "code"):
            event: TransportEvent = PairTimeout(session.device_id)
        elif error is not None:
            event = ConnectFailure(session.device_id, reason=reason)
        else:
            event = Disconnected(session.device_id, reason=reason, will_retry=False)
        if not session.muted:
            self._enqueue(session, None, event)

    # --- neonize callbacks ------------------------------------------------------------------------------

    def _register_handlers(self, session: _Session, attempt: _Attempt) -> None:
        """One handler per event type on the attempt's client (registered before `connect`, as Go reads the
        subscribed types then)."""

        async def on_event(_client: Any, event: Any) -> None:
            try:
                self._on_event(session, attempt, event)
            except Exception:
                log.exception("device %s: handling %s failed", session.device_id, type(event).__name__)

        async def on_qr(_client: Any, data: bytes) -> None:
            try:
                self._on_qr(session, attempt, data)
            except Exception:
                log.exception("device %s: handling a QR code failed", session.device_id)

        client = attempt.client
        for kind in (
            ConnectedEv,
            DisconnectedEv,
            LoggedOutEv,
            TemporaryBanEv,
            StreamReplacedEv,
            KeepAliveTimeoutEv,
            ConnectFailureEv,
            ClientOutdatedEv,
            PairStatusEv,
            MessageEv,
            ReceiptEv,
            HistorySyncEv,
        ):
            client.event(kind)(on_event)
        client.event.qr(on_qr)

    def _on_qr(self, session: _Session, attempt: _Attempt, data: bytes) -> None:
        self._settle(attempt)
        if session.attempt is not attempt or attempt.stop_requested or session.mode not in ("qr", "code"):
            return
        ttl = QR_FIRST_TTL_S if session.qr_count == 0 else QR_NEXT_TTL_S
        session.qr_count += 1
        if session.first_qr is not None and not session.first_qr.done():
            session.first_qr.set_result(None)
        if session.mode == "qr":  # a phone-code pairing shows no QR
            code = data.decode("utf-8", "replace")
            expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
            self._enqueue(session, None, QrCode(session.device_id, code=code, expires_at=expires_at))

    def _on_event(self, session: _Session, attempt: _Attempt, event: Any) -> None:
        """Runs on the loop in arrival order: updates the session at once, then queues domain events."""
        self._settle(attempt)
        if session.attempt is not attempt or self._closed:
            return
        if attempt.stop_requested and not isinstance(event, (MessageEv, ReceiptEv, HistorySyncEv)):
            return  # what a stopping session says about its connection is moot; its messages are not
        device_id = session.device_id
        pre: PreAction | None = None
        error = pairing_error(event)
        if error is not None:
            log.warning("device %s: pairing failed: %s", device_id, error)
            session.cancel_timer()
            self._spawn(self._end_pairing(session, attempt))
            return
        mapped = map_event(
            device_id,
            event,
            own_jid=session.jid,
            will_retry=session.wanted and not self._closed,
            history_chunk_size=self._history_chunk_size,
        )
        for domain_event in mapped:
            if isinstance(domain_event, Paired):
                session.cancel_timer()
                session.mode = "paired"
                session.jid = attempt.jid = domain_event.jid
                session.wanted = True
            elif isinstance(domain_event, Connected):
                session.live = True
                if session.outcome is not None and not session.outcome.done():
                    session.outcome.set_result(None)
            elif isinstance(domain_event, Disconnected):
                session.live = False
            elif isinstance(domain_event, (LoggedOut, TemporaryBan, StreamReplaced)):
                # whatsmeow does not reconnect after these; free the thread and the socket.
                session.wanted = False
                session.live = False
                if session.outcome is not None and not session.outcome.done():
                    session.outcome.set_exception(TransportError(f"WhatsApp ended the session: {domain_event}"))
                pre = self._after_end(session, attempt, domain_event)
            elif isinstance(domain_event, ConnectFailure) and isinstance(event, ClientOutdatedEv):
                session.wanted = False
                session.live = False
                pre = self._after_end(session, attempt, None)
        if not session.muted:
            for domain_event in mapped:
                self._enqueue(session, pre, domain_event)
                pre = None
        elif pre is not None:
            self._enqueue(session, pre, None)

    def _after_end(self, session: _Session, attempt: _Attempt, event: TransportEvent | None) -> PreAction:
        jid = attempt.jid

        async def stop_and_drop() -> None:
            if session.attempt is attempt:
                async with session.lock:
                    if session.attempt is attempt:
                        await self._stop(session, wait=False)
            if isinstance(event, LoggedOut) and jid:
                await self._delete_rows(jid)  # whatsmeow deletes them too; make sure

        return stop_and_drop

    async def _end_pairing(self, session: _Session, attempt: _Attempt) -> None:
        async with session.lock:
            if session.attempt is not attempt or session.mode not in ("qr", "code"):
                return
            await self._stop(session, wait=False)
            self._enqueue(session, None, PairTimeout(session.device_id))

    # --- ordered delivery -------------------------------------------------------------------------------

    def _enqueue(self, session: _Session, pre: PreAction | None, event: TransportEvent | None) -> None:
        if not self._closed:
            session.events.push(session.device_id, pre, event, lambda: self._sink, self._spawn)

    # --- helpers ----------------------------------------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started or self._closed:
            raise NotConnected("the neonize transport is not started")

    def _session(self, device_id: UUID) -> _Session:
        session = self._sessions.get(device_id)
        if session is None:
            session = self._sessions[device_id] = _Session(device_id)
        return session

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def executor_threads(self) -> int:
        """Threads currently in the transport's executor (for diagnostics and tests)."""
        return self._executor.threads

    def running_devices(self) -> list[UUID]:
        """Devices with a Go client that is not being stopped (connecting, pairing or connected)."""
        return [s.device_id for s in self._sessions.values() if s.active]


def _new_client(client: Any) -> Any:
    """A new `NewAClient` without its `weakref.finalize`, which would call Go's Stop(uuid) when the object is
    collected or the interpreter exits: an ungated Go map write, and a call that waits out a dial in
    progress. This adapter stops its clients itself."""
    finalizer = getattr(client, "_stop_finalizer", None)
    if finalizer is not None:
        finalizer.detach()
    return client


def _future() -> asyncio.Future[None]:
    """A future whose exception counts as retrieved: the command that awaited it may have given up."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    return future


def _resolve_recipient(answers: Iterable[Any]) -> str | None:
    """The JID WhatsApp answered for a number, or None when it is not on WhatsApp."""
    for answer in answers:
        if not answer.IsIn:
            return None
        jid = jid_to_str(answer.JID)
        return jid or None
    raise TransportError("WhatsApp gave no answer about the recipient", retryable=True)


def _thumbnail(data: bytes) -> tuple[bytes, int, int, str]:
    """A JPEG thumbnail (at most 200 px), the image size and its MIME type. Runs in a thread."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        mime = Image.MIME.get(image.format or "", "image/jpeg")
        image.thumbnail((200, 200))
        rgb: Image.Image = image if image.mode == "RGB" else image.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=60)
    return out.getvalue(), width, height, mime


if TYPE_CHECKING:

    def _implements_the_port(transport: NeonizeTransport) -> Transport:
        return transport  # mypy checks NeonizeTransport against the Transport protocol here
