"""Schema (SQLAlchemy Core). Changes go through an Alembic migration in `migrations/versions`."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)

from wamd_server.infra.db.types import UtcDateTime

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

chats = Table(
    "chats",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("jid", String(128), nullable=False),
    Column("name", String(200)),
    Column("is_group", Boolean, nullable=False, server_default="0"),
    Column("last_message_at", UtcDateTime),
    Column("last_message_text", Text),
    Column("unread_count", Integer, nullable=False, server_default="0"),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("device_id", "jid"),
    Index("ix_chats_device_recent", "device_id", "last_message_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("device_id", Uuid, ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    Column("chat_jid", String(128), nullable=False),
    Column("wa_message_id", String(128), nullable=False),
    Column("from_me", Boolean, nullable=False),
    Column("sender_jid", String(128)),
    Column("sender_phone", String(32)),
    Column("push_name", String(200)),
    Column("text", Text, nullable=False, server_default=""),
    Column("media_type", String(32)),
    Column("status", String(16)),  # our sends: sent | delivered | read
    Column("sent_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("device_id", "wa_message_id"),
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
