"""Core entities. Plain dataclasses: storage and wire formats are mapped at the edges."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID


class Role(enum.StrEnum):
    ADMIN = "admin"
    STAFF = "staff"


class DeviceStatus(enum.StrEnum):
    UNPAIRED = "unpaired"
    PAIRING = "pairing"
    CONNECTING = "connecting"
    ONLINE = "online"
    OFFLINE = "offline"
    LOGGED_OUT = "logged_out"
    BANNED = "banned"


# Statuses from which the device pool reconnects on start: the device is linked and nobody logged it out.
RECONNECTABLE = frozenset({DeviceStatus.ONLINE, DeviceStatus.CONNECTING, DeviceStatus.OFFLINE, DeviceStatus.BANNED})


@dataclass
class User:
    id: UUID
    email: str
    role: Role
    name: str
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass
class Device:
    id: UUID
    name: str
    status: DeviceStatus
    created_at: datetime
    phone: str | None = None
    jid: str | None = None
    status_reason: str | None = None
    last_seen_at: datetime | None = None
    min_delay_s: float = 10.0
    max_delay_s: float = 30.0
    hourly_cap: int = 80
    daily_cap: int = 500
    created_by: UUID | None = None
    qr_code: str | None = None
    qr_expires_at: datetime | None = None
    banned_until: datetime | None = None


@dataclass
class DevicePatch:
    """Fields a user may change on a device. None means unchanged."""

    name: str | None = None
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    hourly_cap: int | None = None
    daily_cap: int | None = None


@dataclass
class InboundMessage:
    """A message as WhatsApp delivered it to a linked device (either direction: from_me marks our own sends)."""

    wa_id: str
    chat_jid: str
    sender_jid: str
    sender_phone: str | None
    from_me: bool
    is_group: bool
    text: str
    timestamp: datetime
    push_name: str | None = None
    media_type: str | None = None
    sender_lid: str | None = None


@dataclass
class OutboundMessage:
    """What a transport sends. `wa_id` is assigned before the send so a retry reuses it."""

    wa_id: str
    to: str
    text: str = ""
    image: bytes | None = None
    image_mime: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    wa_id: str
    server_timestamp: datetime
