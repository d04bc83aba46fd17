"""Core entities. Plain dataclasses: storage and wire formats are mapped at the edges."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from wamd_server.domain.ids import user_jid


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
    linked_at: datetime | None = None
    quiet_start: str | None = None  # "HH:MM" local (WAMD_TIMEZONE); no sends from quiet_start to quiet_end
    quiet_end: str | None = None
    warmup_days: int = 0  # 0: no warm-up; else the daily cap ramps up over this many days after linking
    typing: bool = True  # show "typing…" before each send
    queue_paused_reason: str | None = None
    queue_pause_kind: str | None = None  # failures | ban | logout | user
    queue_paused_at: datetime | None = None


@dataclass
class DevicePatch:
    """Fields a user may change on a device. None means unchanged."""

    name: str | None = None
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    hourly_cap: int | None = None
    daily_cap: int | None = None
    quiet_start: str | None = None
    quiet_end: str | None = None
    warmup_days: int | None = None
    typing: bool | None = None


@dataclass(slots=True)
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
    status: str | None = None  # our own sends as we store them: the latest receipt already known (None: sent)

    @classmethod
    def own_send(
        cls, wa_id: str, recipient: str, text: str, timestamp: datetime, has_media: bool, status: str | None = None
    ) -> InboundMessage:
        """A message one of our devices sent to `recipient` (phone digits), as its chat history keeps it."""
        return cls(
            wa_id=wa_id,
            chat_jid=user_jid(recipient),
            sender_jid="",
            sender_phone=None,
            from_me=True,
            is_group=False,
            text=text,
            timestamp=timestamp,
            media_type="image" if has_media else None,
            status=status,
        )


@dataclass(slots=True)
class OutboundMessage:
    """What a transport sends. `wa_id` is assigned before the send so a retry reuses it."""

    wa_id: str
    to: str
    text: str = ""
    image: bytes | None = None
    image_mime: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    wa_id: str
    server_timestamp: datetime


class TargetStatus(enum.StrEnum):
    PROSPECT = "prospect"
    CUSTOMER = "customer"


@dataclass
class Lead:
    id: UUID
    user_id: UUID
    phone: str  # E.164 digits without '+'
    name: str = ""
    niche: str = ""
    target_status: TargetStatus = TargetStatus.PROSPECT
    triggers: list[str] = field(default_factory=list)
    device_id: UUID | None = None  # the owner device that sends to this lead
    notes: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    opted_out_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class OutboxStatus(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SourceKind(enum.StrEnum):
    CAMPAIGN = "campaign"
    SEQUENCE = "sequence"
    MANUAL = "manual"
    PLUGIN = "plugin"


@dataclass(slots=True)
class OutboxItem:
    """One outbound message on its way (see DESIGN §2). Plugins' `wamd_before_send` may edit `text`."""

    id: UUID
    device_id: UUID
    recipient: str  # phone digits
    text: str
    source_kind: SourceKind
    source_key: str
    wa_message_id: str
    status: OutboxStatus
    scheduled_at: datetime
    user_id: UUID | None = None
    lead_id: UUID | None = None
    media_id: UUID | None = None
    source_id: UUID | None = None
    attempts: int = 0
    last_error: str | None = None
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    sent_at: datetime | None = None
    seq: int = 0  # enqueue order among messages due at the same time
    greeting: str | None = None  # where `text` holds a greeting to be that of the send (`templating.regreet`)


class CampaignStatus(enum.StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


@dataclass
class Campaign:
    id: UUID
    user_id: UUID
    type: str
    title: str
    message: str
    scheduled_at: datetime
    status: CampaignStatus
    image_media_id: UUID | None = None
    niche: str | None = None
    target_status: str = "all"  # prospect | customer | all
    device_ids: list[UUID] = field(default_factory=list)
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    options: dict[str, object] = field(default_factory=dict)
    status_reason: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    leads_waiting: int = 0  # leads without an owner no device could take yet (see `services/planner.py`)
