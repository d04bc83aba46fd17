"""Events a transport reports about a device session, in WhatsApp's vocabulary but free of any library.

Both transports (neonize and the simulator client) translate what they see into these, so the device pool has
one state machine whatever the link is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from wamd_server.domain.models import InboundMessage


class LogoutReason(enum.StrEnum):
    """Why WhatsApp ended a session (whatsmeow ConnectFailureReason names, lower-cased)."""

    GENERIC = "generic"
    LOGGED_OUT = "logged_out"  # unlinked from the phone
    TEMP_BANNED = "temp_banned"
    MAIN_DEVICE_GONE = "main_device_gone"
    UNKNOWN_LOGOUT = "unknown_logout"
    CLIENT_OUTDATED = "client_outdated"
    BAD_USER_AGENT = "bad_user_agent"
    USER = "user"  # our own user pressed logout


class ReceiptType(enum.StrEnum):
    DELIVERED = "delivered"
    READ = "read"
    PLAYED = "played"


@dataclass(frozen=True)
class TransportEvent:
    device_id: UUID


@dataclass(frozen=True)
class QrCode(TransportEvent):
    code: str
    expires_at: datetime


@dataclass(frozen=True)
class PairTimeout(TransportEvent):
    """Every QR code expired without a scan; the pairing session has stopped."""


@dataclass(frozen=True)
class Paired(TransportEvent):
    jid: str
    phone: str
    push_name: str | None = None


@dataclass(frozen=True)
class Connected(TransportEvent):
    pass


@dataclass(frozen=True)
class Disconnected(TransportEvent):
    reason: str
    will_retry: bool


@dataclass(frozen=True)
class ConnectFailure(TransportEvent):
    reason: str


@dataclass(frozen=True)
class LoggedOut(TransportEvent):
    reason: LogoutReason
    on_connect: bool = False


@dataclass(frozen=True)
class TemporaryBan(TransportEvent):
    code: str
    expires_in_s: int


@dataclass(frozen=True)
class StreamReplaced(TransportEvent):
    """Another client connected with the same keys; WhatsApp dropped this one."""


@dataclass(frozen=True)
class KeepAliveTimeout(TransportEvent):
    error_count: int


@dataclass(frozen=True)
class MessageReceived(TransportEvent):
    message: InboundMessage


@dataclass(frozen=True)
class Receipt(TransportEvent):
    chat_jid: str
    message_ids: tuple[str, ...]
    type: ReceiptType
    timestamp: datetime


@dataclass(frozen=True)
class HistoryChunk(TransportEvent):
    """A bounded slice of history WhatsApp sent after pairing."""

    messages: tuple[InboundMessage, ...]
    progress: int
