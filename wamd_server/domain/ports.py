"""Ports: what the services need from the outside world. Adapters in `infra` implement them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.events import TransportEvent
from wamd_server.domain.models import (
    Device,
    DevicePatch,
    DeviceStatus,
    InboundMessage,
    OutboundMessage,
    Role,
    SendResult,
    User,
)


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait until `event` is set or `seconds` (of this clock) pass; True when the event was set."""
        ...


# --- WhatsApp link -----------------------------------------------------------------------------------------

# Where a transport delivers its events. It must not block (it queues the event and returns): a transport may
# call it from the reader of a link that many devices share.
TransportEventSink = Callable[[TransportEvent], Awaitable[None]]


class Transport(Protocol):
    """One WhatsApp link serving many device sessions.

    Rules every implementation keeps: at most one live session per device; `connect` of a device that is
    already connected does nothing; every asynchronous outcome (QR codes, pairing, connected, logged out,
    bans, messages, receipts) is reported through the sink given to `start`, never raised from a callback.
    """

    name: str

    async def start(self, sink: TransportEventSink) -> None: ...

    async def close(self) -> None:
        """Stop every session (without logging any out) and release resources."""
        ...

    async def pair_qr(self, device_id: UUID) -> None:
        """Begin QR pairing. Codes arrive as `QrCode` events, then `Paired` + `Connected` or `PairTimeout`."""
        ...

    async def pair_code(self, device_id: UUID, phone: str) -> str:
        """Begin phone-code pairing for `phone` (digits only); returns the code the user types on the phone."""
        ...

    async def has_session(self, jid: str) -> bool:
        """Whether credentials for `jid` are stored, so `connect` can restore without a QR."""
        ...

    async def connect(self, device_id: UUID, jid: str) -> None:
        """Restore the stored session. Raises `SessionMissing` when there is none; the outcome
        (`Connected`, `LoggedOut`, `TemporaryBan`, `ConnectFailure`) arrives as an event."""
        ...

    async def disconnect(self, device_id: UUID) -> None:
        """End the live session, keep credentials. No automatic reconnect follows."""
        ...

    async def logout(self, device_id: UUID, jid: str) -> None:
        """Unlink the device on WhatsApp's side and delete its credentials. Credentials are deleted even
        when the unlink cannot reach WhatsApp (the error is raised after)."""
        ...

    async def forget(self, jid: str) -> None:
        """Delete stored credentials for `jid` without contacting WhatsApp."""
        ...

    async def send(self, device_id: UUID, message: OutboundMessage) -> SendResult:
        """Send and wait for the server's ack. The caller bounds the wait (the dispatcher's `send_timeout_s`)."""
        ...

    async def mark_read(self, device_id: UUID, chat_jid: str, sender_jid: str, wa_ids: Sequence[str]) -> None: ...

    async def set_typing(self, device_id: UUID, chat_jid: str, typing: bool) -> None: ...

    async def probe(self, device_id: UUID, timeout_s: float) -> bool:
        """Whether the device's session answers WhatsApp-side within `timeout_s` (for the health watchdog)."""
        ...


class SessionStore(Protocol):
    """Where a transport keeps a device's credentials (the simulator client's equivalent of whatsmeow's store)."""

    async def get(self, jid: str) -> str | None: ...

    async def put(self, jid: str, transport: str, secret: str) -> None: ...

    async def delete(self, jid: str) -> None: ...


# --- Event bus ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusEvent:
    """An event for clients. `device_id`/`user_id` decide who may receive it (see the WS hub)."""

    type: str
    data: dict[str, Any]
    device_id: UUID | None = None
    user_id: UUID | None = None
    at: datetime | None = None


BusHandler = Callable[[BusEvent], Awaitable[None]]


class EventBus(Protocol):
    kind: str  # "local" or "redis"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: BusEvent) -> None: ...

    def subscribe(self, handler: BusHandler) -> Callable[[], None]:
        """Register a handler for every event; returns a function that removes it."""
        ...

    async def ping(self) -> bool: ...


# --- Repositories ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: User
    password_hash: str


class UserRepository(Protocol):
    async def add(self, email: str, password_hash: str, role: Role, name: str) -> User: ...

    async def get(self, user_id: UUID) -> User | None: ...

    async def by_email(self, email: str) -> Credentials | None: ...

    async def list_page(self, limit: int, after: UUID | None) -> list[User]: ...

    async def update(
        self,
        user_id: UUID,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
        password_hash: str | None = None,
        keep_an_admin: bool = False,
    ) -> User | None:
        """Change a user. With `keep_an_admin`, atomically refuse (`Conflict`) if no other active admin remains."""
        ...

    async def delete(self, user_id: UUID, *, keep_an_admin: bool = False) -> bool: ...

    async def touch_login(self, user_id: UUID, at: datetime) -> None: ...

    async def granted_device_ids(self, user_id: UUID) -> set[UUID]: ...

    async def set_grants(self, user_id: UUID, device_ids: Sequence[UUID]) -> None: ...


class TokenRepository(Protocol):
    async def add(self, user_id: UUID, token_hash: str, expires_at: datetime) -> None: ...

    async def user_for(self, token_hash: str, now: datetime) -> User | None: ...

    async def delete(self, token_hash: str) -> None: ...

    async def delete_for_user(self, user_id: UUID) -> None: ...


@dataclass(frozen=True)
class DeviceScope:
    """Which devices a caller may see: all (admins, the system) or a granted set (staff)."""

    user_id: UUID | None = None  # None: unrestricted

    @staticmethod
    def everything() -> DeviceScope:
        return DeviceScope(None)


class DeviceRepository(Protocol):
    async def add(self, name: str, created_by: UUID | None, grant_to: UUID | None) -> Device: ...

    async def get(self, device_id: UUID, scope: DeviceScope) -> Device | None: ...

    async def list_page(self, scope: DeviceScope, limit: int, after: tuple[datetime, UUID] | None) -> list[Device]:
        """Devices in creation order, after the (created_at, id) of the previous page's last one."""
        ...

    async def patch(self, device_id: UUID, patch: DevicePatch) -> Device: ...

    async def set_fields(self, device_id: UUID, **values: Any) -> Device | None:
        """Write the given columns; returns the updated device (None if it no longer exists)."""
        ...

    async def delete(self, device_id: UUID) -> bool: ...

    async def set_status_where(
        self, device_ids: Iterable[UUID], current: Iterable[DeviceStatus], status: DeviceStatus, reason: str
    ) -> list[Device]:
        """Set the status of those devices that are in one of `current` statuses; returns them, updated."""
        ...

    async def to_reconnect(self) -> list[Device]:
        """Linked devices that nobody logged out, in a stable order, for the start-up reconnect."""
        ...

    async def exists(self, device_ids: Sequence[UUID]) -> set[UUID]: ...


class MessageRepository(Protocol):
    async def store_inbound(self, device_id: UUID, message: InboundMessage) -> bool:
        """Persist a message and its chat row in one transaction; False when it was already stored."""
        ...

    async def mark_status(self, keys: Sequence[tuple[UUID, str]], status: str) -> set[tuple[UUID, str]]:
        """Move our sent messages (device, message id) forward (sent → delivered → read → played); returns the
        keys of the messages found."""
        ...


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_s: int) -> int:
        """Count one event for `key`; returns seconds to wait if `limit` is exceeded within the window, else 0."""
        ...

    async def blocked_for(self, key: str, limit: int, window_s: int) -> int:
        """Seconds to wait before `key` may try again (0 if not blocked), without counting."""
        ...

    async def reset(self, key: str) -> None: ...


class DeviceController(Protocol):
    """Commands to the device worker that owns a device (in-process now; over the bus with remote workers)."""

    async def pair_qr(self, device_id: UUID) -> None: ...

    async def pair_code(self, device_id: UUID, phone: str) -> str: ...

    async def logout(self, device_id: UUID) -> None: ...

    async def refresh(self, device_id: UUID) -> str:
        """Reconnect from the stored session; answers the device status reached or `qr_required`."""
        ...

    async def remove(self, device_id: UUID) -> None:
        """Stop the device's session and unlink it; the caller deletes the row afterwards."""
        ...


# --- Device workers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    capacity: int


@dataclass(frozen=True)
class LiveWorker:
    id: str
    capacity: int
    held: int


class LeaseRepository(Protocol):
    """Leases say which worker runs which device; an expired lease may be taken over."""

    async def register(self, worker: WorkerInfo) -> None: ...

    async def heartbeat(self, worker_id: str, ttl_s: float) -> set[UUID]:
        """Renew the worker and all its leases; returns the devices it holds."""
        ...

    async def claim(self, worker_id: str, limit: int, ttl_s: float) -> list[UUID]:
        """Take up to `limit` linked devices without a live lease."""
        ...

    async def assign(self, device_id: UUID, worker_id: str, ttl_s: float) -> str | None:
        """Give a device to a worker unless another holds a live lease; returns the owner."""
        ...

    async def owner(self, device_id: UUID) -> str | None: ...

    async def release(self, worker_id: str, device_ids: Iterable[UUID] | None = None) -> None: ...

    async def live_workers(self, ttl_s: float) -> list[LiveWorker]: ...

    async def needing_sessions(self) -> int: ...

    async def idle_leases(self, worker_id: str, older_than_s: float) -> list[UUID]: ...

    async def orphaned_pairings(self) -> list[UUID]: ...

    async def forget_worker(self, worker_id: str) -> None: ...

    async def prune_workers(self, older_than_s: float) -> int: ...


class WorkerCommands(Protocol):
    """Sends a device command to a worker process and returns its answer (raising its `DomainError`)."""

    async def call(self, worker_id: str, op: str, device_id: UUID, args: dict[str, Any], timeout_s: float) -> Any: ...


@dataclass(frozen=True, slots=True)
class Sent:
    """An outbox row WhatsApp acknowledged."""

    id: UUID
    sent_at: datetime
    server_ts: datetime
    wa_id: str = ""  # its message id (the row's own)
    edited_text: str | None = None  # the text sent, when a plugin's `wamd_before_send` changed the row's


@dataclass(slots=True)
class HistorySend:
    """A send waiting to join its device's chat history, which reads the message from its outbox row (see
    `services/history.py`), with the latest receipt status known (None: sent)."""

    device_id: UUID
    sent: Sent
    status: str | None = None
