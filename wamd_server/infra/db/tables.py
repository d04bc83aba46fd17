"""Schema (SQLAlchemy Core). Changes go through an Alembic migration in `migrations/versions`."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)

from wamd_server.infra.db.types import JsonType, UtcDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),  # stored lower-cased
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("is_active", Boolean, nullable=False, server_default="1"),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("last_login_at", UtcDateTime),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 hex of the bearer token
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("last_used_at", UtcDateTime),
)

devices = Table(
    "devices",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("phone", String(32)),
    Column("jid", String(128), index=True),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text),
    Column("last_seen_at", UtcDateTime),
    Column("min_delay_s", Float, nullable=False, server_default="10"),
    Column("max_delay_s", Float, nullable=False, server_default="30"),
    Column("hourly_cap", Integer, nullable=False, server_default="80"),
    Column("daily_cap", Integer, nullable=False, server_default="500"),
    Column("created_by", Uuid, ForeignKey("users.id", ondelete="SET NULL")),
    Column("qr_code", Text),
    Column("qr_expires_at", UtcDateTime),
    Column("banned_until", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Sending: first link time (for the warm-up ramp), quiet hours ("HH:MM" in WAMD_TIMEZONE), typing presence,
    # and why the send queue is paused (None: running).
    Column("linked_at", UtcDateTime),
    Column("quiet_start", String(5)),
    Column("quiet_end", String(5)),
    Column("warmup_days", Integer, nullable=False, server_default="0"),
    Column("typing", Boolean, nullable=False, server_default="1"),
    Column("queue_paused_reason", Text),
    Column("queue_pause_kind", String(16)),
    Column("queue_paused_at", UtcDateTime),
)

device_grants = Table(
    "device_grants",
    metadata,
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True),
    Column("created_at", UtcDateTime, nullable=False),
)

# Credentials of the simulator transport (neonize keeps its own in the whatsmeow store).
transport_sessions = Table(
    "transport_sessions",
    metadata,
    Column("jid", String(128), primary_key=True),
    Column("transport", String(32), nullable=False),
    Column("secret", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# `chats` and `messages` are keyed by what identifies a row (device and chat JID, device and message id), with no
# surrogate id: one more key would be one more index entry at a random place for every message sent. Nor do they
# have a foreign key to `devices`: checking it was a third of the cost of writing a broadcast's history (migration
# 0008); deleting a device deletes its history (`SqlDeviceRepository.delete`).
chats = Table(
    "chats",
    metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("jid", String(128), primary_key=True),
    Column("name", String(200)),
    Column("is_group", Boolean, nullable=False, server_default="0"),
    Column("last_message_at", UtcDateTime),
    Column("last_message_text", Text),
    Column("unread_count", Integer, nullable=False, server_default="0"),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_chats_device_recent", "device_id", "last_message_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("chat_jid", String(128), nullable=False),
    Column("wa_message_id", String(128), primary_key=True),
    Column("from_me", Boolean, nullable=False),
    Column("sender_jid", String(128)),
    Column("sender_phone", String(32)),
    Column("push_name", String(200)),
    Column("text", Text, nullable=False, server_default=""),
    Column("media_type", String(32)),
    Column("status", String(16)),  # our sends: sent | delivered | read
    Column("sent_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_messages_chat_time", "device_id", "chat_jid", "sent_at"),
)

# Device workers (processes that run WhatsApp sessions) and which worker owns which device.
workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
)

device_leases = Table(
    "device_leases",
    metadata,
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("worker_id", String(64), nullable=False, index=True),
    Column("acquired_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)

media = Table(
    "media",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="SET NULL")),
    Column("mime", String(100), nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("width", Integer),
    Column("height", Integer),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

leads = Table(
    "leads",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("phone", String(32), nullable=False),  # E.164 digits without '+'
    Column("niche", String(100), nullable=False, server_default=""),
    Column("target_status", String(16), nullable=False, server_default="prospect"),
    Column("triggers", JsonType, nullable=False),
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="SET NULL"), index=True),
    Column("notes", Text, nullable=False, server_default=""),
    Column("fields", JsonType, nullable=False),
    Column("opted_out_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    UniqueConstraint("user_id", "phone"),
    Index("ix_leads_user_niche", "user_id", "niche"),
    Index("ix_leads_phone", "phone"),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("type", String(50), nullable=False),
    Column("title", String(200), nullable=False),
    Column("message", Text, nullable=False),
    Column("image_media_id", Uuid, ForeignKey("media.id", ondelete="SET NULL")),
    Column("niche", String(100)),  # None: every niche
    Column("target_status", String(16), nullable=False, server_default="all"),
    Column("device_ids", JsonType, nullable=False),  # [] : every device the owner may use
    Column("scheduled_at", UtcDateTime, nullable=False),
    Column("min_delay_s", Float),  # None: each device's own pacing
    Column("max_delay_s", Float),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text),
    Column("options", JsonType, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    # Leads without an owner device that no device of the campaign could take yet: planned again when one can.
    Column("leads_waiting", Integer, nullable=False, server_default="0"),
    Index("ix_campaigns_status_due", "status", "scheduled_at"),
)

# Every outbound message, whoever produced it. `source_key` makes producing idempotent; `wa_message_id` is
# assigned before the first attempt so a re-send after a crash reuses it.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("seq", BigInteger, nullable=False),  # enqueue order within a scheduled time
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="SET NULL")),
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("lead_id", Uuid, ForeignKey("leads.id", ondelete="SET NULL")),
    Column("recipient", String(32), nullable=False),
    Column("text", Text, nullable=False, server_default=""),
    Column("media_id", Uuid, ForeignKey("media.id", ondelete="SET NULL")),
    Column("source_kind", String(16), nullable=False),
    Column("source_id", Uuid),
    Column("source_key", String(200), nullable=False, unique=True),
    Column("wa_message_id", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("scheduled_at", UtcDateTime, nullable=False),
    Column("min_delay_s", Float),
    Column("max_delay_s", Float),
    Column("claimed_at", UtcDateTime),
    Column("sent_at", UtcDateTime),
    Column("server_ts", UtcDateTime),
    Column("delivered_at", UtcDateTime),
    Column("read_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Where `text` holds a `{greeting}`, put in again when the message is sent (`templating.regreet`).
    Column("greeting", Text),
    # No index holds `status` or the times a send sets: settling a row (`sent`, `failed`, ...) is then an update
    # Postgres writes on the row's own page without a new entry in any index (HOT; fillfactor 50, migration
    # 0007). Finding due rows and a device's recent sends, which needed such indexes, goes through the next two
    # tables.
    Index("ix_outbox_device", "device_id"),
    Index("ix_outbox_source", "source_id"),
    Index("ix_outbox_recipient", "recipient"),
)

# The outbox rows still to send (`queued`, or `sending` while an attempt is under way) by device and due time: what
# a claim searches. A row leaves this table when it settles (sent, failed, cancelled) and comes back when it is
# queued again (retry).
outbox_due = Table(
    "outbox_due",
    metadata,
    Column("id", Uuid, ForeignKey("outbox.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", Uuid, nullable=False),
    Column("source_id", Uuid),
    Column("scheduled_at", UtcDateTime, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Index("ix_outbox_due_device", "device_id", "scheduled_at", "seq"),
    Index("ix_outbox_due_source", "source_id"),
)

# Every send of a device by time, written when its row is marked `sent`: pacing's caps, the queue's "sent in the
# last hour", a lead distribution's record. Deleting the device deletes them (`SqlDeviceRepository.delete`: a
# foreign key would cost a lookup per send).
outbox_sent = Table(
    "outbox_sent",
    metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("sent_at", UtcDateTime, primary_key=True),
    Column("outbox_id", Uuid, primary_key=True),
)

# Every time a row of a device was marked `failed`, by time (a lead distribution's record of the device's recent
# failures). Like `outbox_sent`, deleted with the device.
outbox_failed = Table(
    "outbox_failed",
    metadata,
    Column("device_id", Uuid, primary_key=True),
    Column("failed_at", UtcDateTime, primary_key=True),
    Column("outbox_id", Uuid, primary_key=True),
)

# Why a lead distribution plugin (`wamd_distribute_leads`) gave each device its share of a campaign: one JSON
# document per campaign and plugin, deleted with the campaign. Kept out of `campaigns.options`, which users edit.
distribution_reports = Table(
    "distribution_reports",
    metadata,
    Column("campaign_id", Uuid, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True),
    Column("plugin", String(100), primary_key=True),
    Column("report", JsonType, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
