"""REST request and response bodies (the wire contract shared with the desktop)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from wamd_server.protocol.events import DeviceStatusName

T = TypeVar("T")

Role = Literal["admin", "staff"]


class Request(BaseModel):
    """Request bodies: unknown fields and wrong types are errors, not silently coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    db: Literal["ok", "error"]
    bus: Literal["local", "redis", "error"]
    version: str
    transport: str


class LoginRequest(Request):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    id: str
    email: str
    name: str
    role: Role
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None = None


class LoginResponse(BaseModel):
    token: str
    user: UserOut


class MeOut(UserOut):
    device_ids: list[str] | None = None  # staff: the devices granted; admins see all (null)


class UserCreate(Request):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=8, max_length=1024)
    role: Role = "staff"
    name: str = Field(default="", max_length=200)


class UserPatch(Request):
    name: str | None = Field(default=None, max_length=200)
    role: Role | None = None
    is_active: bool | None = None
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class GrantsIn(Request):
    device_ids: list[str] = Field(max_length=10_000)


class GrantsOut(BaseModel):
    device_ids: list[str]


class DeviceOut(BaseModel):
    id: str
    name: str
    phone: str | None
    jid: str | None
    status: DeviceStatusName
    status_reason: str | None
    last_seen_at: datetime | None
    min_delay_s: float
    max_delay_s: float
    hourly_cap: int
    daily_cap: int
    quiet_start: str | None = None
    quiet_end: str | None = None
    warmup_days: int = 0
    typing: bool = True
    queue_paused_reason: str | None = None
    created_at: datetime


class DeviceCreate(Request):
    name: str = Field(min_length=1, max_length=100)


class DevicePatchIn(Request):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    min_delay_s: float | None = Field(default=None, ge=0, le=3600)
    max_delay_s: float | None = Field(default=None, ge=0, le=3600)
    hourly_cap: int | None = Field(default=None, ge=1, le=10_000)
    daily_cap: int | None = Field(default=None, ge=1, le=100_000)
    quiet_start: str | None = Field(default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$|^$")  # "" clears
    quiet_end: str | None = Field(default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$|^$")
    warmup_days: int | None = Field(default=None, ge=0, le=90)
    typing: bool | None = None


class PairRequest(Request):
    method: Literal["qr", "code"]
    phone: str | None = Field(default=None, min_length=5, max_length=32)


class PairOut(BaseModel):
    status: DeviceStatusName
    pair_code: str | None = None


class QrOut(BaseModel):
    code: str
    expires_at: datetime


class RefreshOut(BaseModel):
    status: Literal["online", "connecting", "offline", "banned", "qr_required"]


class Ok(BaseModel):
    ok: bool = True


# --- templates and media ---------------------------------------------------------------------------------


class TemplateLeadIn(Request):
    """A lead given inline to a preview (not stored)."""

    name: str = Field(default="", max_length=200)
    phone: str = Field(default="", max_length=32)
    fields: dict[str, str] = Field(default_factory=dict, max_length=1000)


class TemplatePreviewIn(Request):
    template: str = Field(min_length=1, max_length=65_536)
    lead_id: str | None = None  # a lead the caller may see
    lead: TemplateLeadIn | None = None  # or an inline lead (not both); neither: no name, no phone
    language: str | None = Field(default=None, min_length=2, max_length=16)  # greeting language, default "ms"
    at: datetime | None = None  # the moment to render for (with offset); default now
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # the same seed, the same spintax choices


class TemplateIssueOut(BaseModel):
    code: str  # unbalanced_brace | too_deep | empty_option | unknown_placeholder
    severity: Literal["error", "warning"]
    message: str
    position: int  # character index in the template


class TemplatePreviewOut(BaseModel):
    text: str
    warnings: list[TemplateIssueOut]
    language: str
    at: datetime


class MediaUpload(BaseModel):
    """multipart/form-data with one part `file`: the image."""

    file: bytes


class MediaOut(BaseModel):
    id: str
    mime: str
    size: int
    width: int | None
    height: int | None
    sha256: str


# --- leads ------------------------------------------------------------------------------------------------

TargetStatusName = Literal["prospect", "customer"]


class LeadOut(BaseModel):
    id: str
    name: str
    phone: str  # E.164 digits without '+'
    niche: str
    target_status: TargetStatusName
    triggers: list[str]
    device_id: str | None  # the owner device that sends to this lead
    notes: str
    fields: dict[str, str]  # custom fields
    opted_out_at: datetime | None
    created_at: datetime
    updated_at: datetime


class LeadCreate(Request):
    """Limits (checked by the server, errors name the field): name ≤200, niche ≤100, notes ≤5000 characters;
    at most 50 triggers of ≤100 characters (trimmed, repeats dropped, no , or ;); at most 50 custom fields."""

    phone: str = Field(min_length=1, max_length=64, description="any common notation; stored as E.164 digits")
    name: str = ""
    niche: str = ""
    target_status: TargetStatusName = "prospect"
    triggers: list[str] = Field(default_factory=list)
    device_id: str | None = Field(default=None, description="a device the caller may see")
    notes: str = ""
    fields: dict[str, str] = Field(default_factory=dict)


class LeadPatch(Request):
    """Only the fields given change; `device_id: null` removes the owner device; `opted_out` sets or clears
    the opt-out."""

    phone: str | None = Field(default=None, min_length=1, max_length=64)
    name: str | None = None
    niche: str | None = None
    target_status: TargetStatusName | None = None
    triggers: list[str] | None = None
    device_id: str | None = None
    notes: str | None = None
    fields: dict[str, str] | None = None
    opted_out: bool | None = None


class ImportFailure(BaseModel):
    row: int  # 1-based data row as in the file (header excluded; blank lines keep their number)
    error: str
    field: str | None = None


class ImportResult(BaseModel):
    import_id: str
    rows: int  # data rows read (blank lines not counted)
    created: int
    updated: int
    failed: list[ImportFailure]  # the first 1000 failed rows
    failed_count: int  # every failed row
    encoding: str  # what the file was read as: utf-8 or windows-1252


class LeadImportForm(BaseModel):
    """multipart/form-data; the option parts must come before `file`, which is read as it arrives."""

    mapping: str | None = Field(
        default=None,
        description='JSON object {"CSV header": "lead field" | "fields.<name>" | null}; '
        "other columns are recognised by their header (name, phone/number/mobile/whatsapp, niche, "
        "target_status/status, trigger(s), notes/journey, device_id), the rest become custom fields",
    )
    default_niche: str | None = None
    default_target_status: TargetStatusName | None = None
    device_id: str | None = Field(default=None, description="owner device of rows without a device_id")
    import_id: str | None = Field(default=None, description="an id of the caller's choice for the progress events")
    encoding: Literal["auto", "utf-8", "windows-1252"] | None = Field(
        default=None,
        description="the file's text encoding (also spelled utf8, cp1252); auto (the default): decided from the "
        "file's start, UTF-8 unless it holds bytes beyond ASCII and no UTF-8 character (Windows-1252, as Excel on "
        "Windows saves CSV); a start in plain ASCII is read as UTF-8 until a row is not",
    )
    file: bytes = Field(
        description="the CSV (UTF-8 or Windows-1252; comma, semicolon or tab separated; first row the header)"
    )


# --- campaigns ---------------------------------------------------------------------------------------------

TargetStatusFilter = Literal["prospect", "customer", "all"]


class CampaignTypeOut(BaseModel):
    name: str
    title: str
    description: str
    options_schema: dict[str, Any]


class CampaignOut(BaseModel):
    id: str
    type: str
    title: str
    message: str
    image_media_id: str | None
    niche: str | None
    target_status: TargetStatusFilter
    device_ids: list[str]
    scheduled_at: datetime
    min_delay_s: float | None
    max_delay_s: float | None
    status: Literal["draft", "scheduled", "running", "paused", "completed", "cancelled"]
    status_reason: str | None
    options: dict[str, Any]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    leads_waiting: int = Field(
        default=0, description="leads without an owner device that no device of the campaign could take yet"
    )


class CampaignCreate(Request):
    type: str = Field(default="broadcast", min_length=1, max_length=50)
    title: str = Field(min_length=1, max_length=200)
    message: str = Field(default="", max_length=4096)
    image_media_id: str | None = None
    niche: str | None = Field(default=None, max_length=100)
    target_status: TargetStatusFilter = "all"
    device_ids: list[str] = Field(default_factory=list, max_length=5000)
    scheduled_at: datetime | None = None  # without an offset: local time in WAMD_TIMEZONE; absent: now
    min_delay_s: float | None = Field(default=None, ge=0, le=3600)
    max_delay_s: float | None = Field(default=None, ge=0, le=3600)
    options: dict[str, Any] = Field(default_factory=dict)
    draft: bool = False


class CampaignPatch(Request):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    message: str | None = Field(default=None, max_length=4096)
    image_media_id: str | None = None
    niche: str | None = Field(default=None, max_length=100)
    target_status: TargetStatusFilter | None = None
    device_ids: list[str] | None = Field(default=None, max_length=5000)
    scheduled_at: datetime | None = None
    min_delay_s: float | None = Field(default=None, ge=0, le=3600)
    max_delay_s: float | None = Field(default=None, ge=0, le=3600)
    options: dict[str, Any] | None = None


class RetryFailedIn(Request):
    device_id: str | None = None


class RetryFailedOut(BaseModel):
    retried: int


class SendNumbers(BaseModel):
    should_send: int
    done_send: int
    failed_send: int
    remaining_send: int


class DeviceReportRow(SendNumbers):
    device_id: str
    name: str
    jid: str | None


class CampaignReport(SendNumbers):
    campaign_id: str
    status: str
    devices: list[DeviceReportRow]


class RecipientOut(BaseModel):
    id: str
    device_id: str
    lead_id: str | None
    lead_name: str | None
    recipient: str
    status: Literal["queued", "sending", "sent", "failed", "cancelled"]
    attempts: int
    error: str | None
    wa_message_id: str
    scheduled_at: datetime
    sent_at: datetime | None


class CampaignStats(BaseModel):
    total: int
    draft: int
    scheduled: int
    running: int
    paused: int
    completed: int
    cancelled: int


class BroadcastStats(BaseModel):
    total_should_send: int
    total_done_send: int
    total_failed_send: int
    total_remaining_send: int


class RecentCampaign(SendNumbers):
    id: str
    title: str
    status: str
    scheduled_at: datetime


class CampaignSummary(BaseModel):
    campaigns: CampaignStats
    broadcast_stats: BroadcastStats
    recent_campaigns: list[RecentCampaign]


# --- the send queue ----------------------------------------------------------------------------------------


class QueueRow(BaseModel):
    device_id: str
    name: str
    status: str
    queued: int
    sending: int
    sent_last_hour: int
    hourly_cap: int
    next_send_at: datetime | None
    paused_reason: str | None
    pause_kind: str | None


class QueueOut(BaseModel):
    items: list[QueueRow]


# --- chats -------------------------------------------------------------------------------------------------


class ChatOut(BaseModel):
    jid: str
    name: str | None
    is_group: bool
    last_message_at: datetime | None
    last_message_text: str | None
    unread_count: int


class ChatMessageOut(BaseModel):
    wa_id: str
    chat_jid: str
    from_me: bool
    sender_jid: str | None
    sender_phone: str | None
    push_name: str | None
    text: str
    media_type: str | None
    status: str | None  # ours: sent | delivered | read | played; theirs: read once read here
    timestamp: datetime


class ChatSend(Request):
    text: str = Field(default="", max_length=4096)
    client_id: str | None = Field(default=None, min_length=1, max_length=100)  # repeat it to retry safely
    image_media_id: str | None = None


class ChatSendOut(BaseModel):
    id: str
    wa_message_id: str
    status: str


class ChatReadOut(BaseModel):
    read: int
