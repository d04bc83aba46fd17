"""WebSocket event types and their payloads (the `event` object inside `{"type": "event", ...}`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

DEVICE_STATUS = "device.status"
DEVICE_QR = "device.qr"
DEVICE_PAIRED = "device.paired"
DEVICE_LOGGED_OUT = "device.logged_out"
MESSAGE_NEW = "message.new"
MESSAGE_STATUS = "message.status"
CHAT_UPDATED = "chat.updated"
CAMPAIGN_PROGRESS = "campaign.progress"
SEQUENCE_PROGRESS = "sequence.progress"
LEADS_IMPORT_PROGRESS = "leads.import.progress"

EVENT_TYPES = (
    DEVICE_STATUS,
    DEVICE_QR,
    DEVICE_PAIRED,
    DEVICE_LOGGED_OUT,
    MESSAGE_NEW,
    MESSAGE_STATUS,
    CHAT_UPDATED,
    CAMPAIGN_PROGRESS,
    SEQUENCE_PROGRESS,
    LEADS_IMPORT_PROGRESS,
)

# Internal bus event, never sent to clients: a user's grants, role or activity changed; WebSocket hubs
# reload that user's view (and close the connections of a deactivated or deleted user).
ACCESS_CHANGED = "_access.changed"
# Internal: messages were queued for these devices; their workers' dispatchers look now.
OUTBOX_QUEUED = "_outbox.queued"
# Internal: a phone opted out (a stop word, or a lead marked by hand); dispatchers stop sending to it at once.
OPTED_OUT = "_leads.opted_out"
# Internal: no lead with this phone is opted out any more (taken back by hand); dispatchers send to it again.
# (An event of its own: a worker of an older version, which knows only OPTED_OUT, ignores it.)
OPTED_IN = "_leads.opted_in"

DeviceStatusName = Literal["unpaired", "pairing", "connecting", "online", "offline", "logged_out", "banned"]


class DeviceStatusEvent(BaseModel):
    device_id: str
    status: DeviceStatusName
    reason: str | None = None
    phone: str | None = None
    jid: str | None = None
    last_seen_at: datetime | None = None


class DeviceQrEvent(BaseModel):
    device_id: str
    code: str
    expires_at: datetime


class DevicePairedEvent(BaseModel):
    device_id: str
    phone: str
    jid: str


class DeviceLoggedOutEvent(BaseModel):
    device_id: str
    reason: str
    phone: str | None = None
    jid: str | None = None


class MessageOut(BaseModel):
    wa_id: str
    chat_jid: str
    from_me: bool
    sender_jid: str | None = None
    sender_phone: str | None = None
    push_name: str | None = None
    text: str
    media_type: str | None = None
    is_group: bool = False
    timestamp: datetime


class MessageNewEvent(BaseModel):
    device_id: str
    chat_jid: str
    message: MessageOut


class MessageStatusEvent(BaseModel):
    device_id: str
    chat_jid: str
    wa_ids: list[str]
    status: Literal["sent", "delivered", "read", "played", "failed"]


class ChatUpdatedEvent(BaseModel):
    device_id: str
    chat_jid: str


class CampaignProgressEvent(BaseModel):
    campaign_id: str
    status: str
    should_send: int
    done_send: int
    failed_send: int
    remaining_send: int


class LeadsImportProgressEvent(BaseModel):
    """Sent to the importing user only, every 5,000 rows and at the end (`done`; `error` if it stopped)."""

    import_id: str
    rows: int
    created: int
    updated: int
    failed: int
    done: bool
    error: str | None = None
