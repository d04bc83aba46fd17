"""initial schema: users, tokens, devices, grants, sessions, chats, messages

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import wamd_server.infra.db.types

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "transport_sessions",
        sa.Column("jid", sa.String(length=128), nullable=False),
        sa.Column("transport", sa.String(length=32), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jid", name=op.f("pk_transport_sessions")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default="1", nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "devices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("jid", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("last_seen_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("min_delay_s", sa.Float(), server_default="10", nullable=False),
        sa.Column("max_delay_s", sa.Float(), server_default="30", nullable=False),
        sa.Column("hourly_cap", sa.Integer(), server_default="80", nullable=False),
        sa.Column("daily_cap", sa.Integer(), server_default="500", nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("qr_code", sa.Text(), nullable=True),
        sa.Column("qr_expires_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("banned_until", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_devices_created_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_jid"), ["jid"], unique=False)

    op.create_table(
        "chats",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("jid", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("is_group", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("last_message_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("last_message_text", sa.Text(), nullable=True),
        sa.Column("unread_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_chats_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chats")),
        sa.UniqueConstraint("device_id", "jid", name=op.f("uq_chats_device_id_jid")),
    )
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.create_index("ix_chats_device_recent", ["device_id", "last_message_at"], unique=False)

    op.create_table(
        "device_grants",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_grants_device_id_devices"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_device_grants_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "device_id", name=op.f("pk_device_grants")),
    )
    with op.batch_alter_table("device_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_grants_device_id"), ["device_id"], unique=False)

    op.create_table(
        "messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("chat_jid", sa.String(length=128), nullable=False),
        sa.Column("wa_message_id", sa.String(length=128), nullable=False),
        sa.Column("from_me", sa.Boolean(), nullable=False),
        sa.Column("sender_jid", sa.String(length=128), nullable=True),
        sa.Column("sender_phone", sa.String(length=32), nullable=True),
        sa.Column("push_name", sa.String(length=200), nullable=True),
        sa.Column("text", sa.Text(), server_default="", nullable=False),
        sa.Column("media_type", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("sent_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_messages_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("device_id", "wa_message_id", name=op.f("uq_messages_device_id_wa_message_id")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_chat_time", ["device_id", "chat_jid", "sent_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_chat_time")

    op.drop_table("messages")
    with op.batch_alter_table("device_grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_grants_device_id"))

    op.drop_table("device_grants")
    with op.batch_alter_table("chats", schema=None) as batch_op:
        batch_op.drop_index("ix_chats_device_recent")

    op.drop_table("chats")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_jid"))

    op.drop_table("devices")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))

    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("transport_sessions")
