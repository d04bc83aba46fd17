"""device workers and leases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import wamd_server.infra.db.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("started_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_table(
        "device_leases",
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("acquired_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_leases_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_leases")),
    )
    with op.batch_alter_table("device_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_leases_worker_id"), ["worker_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("device_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_leases_worker_id"))

    op.drop_table("device_leases")
    op.drop_table("workers")
