"""leads campaigns media outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import wamd_server.infra.db.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "media",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("mime", sa.String(length=100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_media_user_id_users"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_media")),
    )
    with op.batch_alter_table("media", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_media_sha256"), ["sha256"], unique=False)

    op.create_table(
        "campaigns",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=50), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("image_media_id", sa.Uuid(), nullable=True),
        sa.Column("niche", sa.String(length=100), nullable=True),
        sa.Column("target_status", sa.String(length=16), server_default="all", nullable=False),
        sa.Column(
            "device_ids", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("scheduled_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("min_delay_s", sa.Float(), nullable=True),
        sa.Column("max_delay_s", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column(
            "options", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("started_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["image_media_id"], ["media.id"], name=op.f("fk_campaigns_image_media_id_media"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_campaigns_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.create_index("ix_campaigns_status_due", ["status", "scheduled_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_campaigns_user_id"), ["user_id"], unique=False)

    op.create_table(
        "leads",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=False),
        sa.Column("niche", sa.String(length=100), server_default="", nullable=False),
        sa.Column("target_status", sa.String(length=16), server_default="prospect", nullable=False),
        sa.Column(
            "triggers", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("device_id", sa.Uuid(), nullable=True),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "fields", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("opted_out_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_leads_device_id_devices"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_leads_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leads")),
        sa.UniqueConstraint("user_id", "phone", name=op.f("uq_leads_user_id_phone")),
    )
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_leads_device_id"), ["device_id"], unique=False)
        batch_op.create_index("ix_leads_phone", ["phone"], unique=False)
        batch_op.create_index("ix_leads_user_niche", ["user_id", "niche"], unique=False)

    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("lead_id", sa.Uuid(), nullable=True),
        sa.Column("recipient", sa.String(length=32), nullable=False),
        sa.Column("text", sa.Text(), server_default="", nullable=False),
        sa.Column("media_id", sa.Uuid(), nullable=True),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("source_id", sa.Uuid(), nullable=True),
        sa.Column("source_key", sa.String(length=200), nullable=False),
        sa.Column("wa_message_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("scheduled_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("min_delay_s", sa.Float(), nullable=True),
        sa.Column("max_delay_s", sa.Float(), nullable=True),
        sa.Column("claimed_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("sent_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("server_ts", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("read_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column("created_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_outbox_device_id_devices"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"], name=op.f("fk_outbox_lead_id_leads"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["media_id"], ["media.id"], name=op.f("fk_outbox_media_id_media"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_outbox_user_id_users"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("source_key", name=op.f("uq_outbox_source_key")),
        sa.UniqueConstraint("wa_message_id", name=op.f("uq_outbox_wa_message_id")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["device_id", "status", "scheduled_at", "seq"], unique=False)
        batch_op.create_index("ix_outbox_recipient", ["recipient", "status"], unique=False)
        batch_op.create_index("ix_outbox_sent", ["device_id", "sent_at"], unique=False)
        batch_op.create_index("ix_outbox_source", ["source_kind", "source_id", "status"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("linked_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("quiet_start", sa.String(length=5), nullable=True))
        batch_op.add_column(sa.Column("quiet_end", sa.String(length=5), nullable=True))
        batch_op.add_column(sa.Column("warmup_days", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("typing", sa.Boolean(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("queue_paused_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("queue_pause_kind", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("queue_paused_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("queue_paused_at")
        batch_op.drop_column("queue_pause_kind")
        batch_op.drop_column("queue_paused_reason")
        batch_op.drop_column("typing")
        batch_op.drop_column("warmup_days")
        batch_op.drop_column("quiet_end")
        batch_op.drop_column("quiet_start")
        batch_op.drop_column("linked_at")

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_source")
        batch_op.drop_index("ix_outbox_sent")
        batch_op.drop_index("ix_outbox_recipient")
        batch_op.drop_index("ix_outbox_due")

    op.drop_table("outbox")
    with op.batch_alter_table("leads", schema=None) as batch_op:
        batch_op.drop_index("ix_leads_user_niche")
        batch_op.drop_index("ix_leads_phone")
        batch_op.drop_index(batch_op.f("ix_leads_device_id"))

    op.drop_table("leads")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaigns_user_id"))
        batch_op.drop_index("ix_campaigns_status_due")

    op.drop_table("campaigns")
    with op.batch_alter_table("media", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_media_sha256"))

    op.drop_table("media")
