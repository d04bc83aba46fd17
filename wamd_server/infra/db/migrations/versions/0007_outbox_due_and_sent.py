"""outbox: due rows and sends in tables of their own, so settling a row touches no index

Marking a row `sent` changed `status` and `sent_at`, which four of the outbox's seven indexes held: Postgres wrote
a new entry in all seven for every message (about half of marking a broadcast sent). Now `outbox_due` holds the
rows still to send by device and due time (what a claim searches), `outbox_sent` each send by device and time
(pacing's caps, the queue overview, a lead distribution's record) and `outbox_failed` each failure likewise; the
outbox keeps indexes on what never changes when a row settles, and on Postgres room on each page (fillfactor 50)
for the settled version of a row. Rows stored before keep their pages until rewritten (VACUUM FULL).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import wamd_server.infra.db.types

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A broadcast settles every row of a page within a second or two, before Postgres may prune the old versions: all
# of them are HOT only if half of each page is free (measured in bench/dispatch.py: 100 % at 50, 42 % at 70, where
# the updates that do not fit move their rows to new pages and the table ends larger than at 50).
FILLFACTOR = 50
_OLD_INDEXES = {
    "ix_outbox_due": ["device_id", "status", "scheduled_at", "seq"],
    "ix_outbox_source": ["source_kind", "source_id", "status"],
    "ix_outbox_sent": ["device_id", "sent_at"],
    "ix_outbox_recipient": ["recipient", "status"],
}
_NEW_INDEXES = {
    "ix_outbox_device": ["device_id"],
    "ix_outbox_source": ["source_id"],
    "ix_outbox_recipient": ["recipient"],
}


def upgrade() -> None:
    op.create_table(
        "outbox_due",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("source_id", sa.Uuid(), nullable=True),
        sa.Column("scheduled_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["outbox.id"], name=op.f("fk_outbox_due_id_outbox"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_due")),
    )
    op.create_index("ix_outbox_due_device", "outbox_due", ["device_id", "scheduled_at", "seq"], unique=False)
    op.create_index("ix_outbox_due_source", "outbox_due", ["source_id"], unique=False)
    op.create_table(
        "outbox_sent",
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("sent_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("outbox_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sent_at", "outbox_id", name=op.f("pk_outbox_sent")),
    )
    op.create_table(
        "outbox_failed",
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("failed_at", wamd_server.infra.db.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column("outbox_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "failed_at", "outbox_id", name=op.f("pk_outbox_failed")),
    )
    op.execute(
        "INSERT INTO outbox_due (id, device_id, source_id, scheduled_at, seq) "
        "SELECT id, device_id, source_id, scheduled_at, seq FROM outbox WHERE status IN ('queued', 'sending')"
    )
    op.execute(
        "INSERT INTO outbox_sent (device_id, sent_at, outbox_id) "
        "SELECT device_id, sent_at, id FROM outbox WHERE status = 'sent' AND sent_at IS NOT NULL"
    )
    op.execute(
        "INSERT INTO outbox_failed (device_id, failed_at, outbox_id) "
        "SELECT device_id, updated_at, id FROM outbox WHERE status = 'failed'"
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        for name in _OLD_INDEXES:
            batch_op.drop_index(name)
        for name, columns in _NEW_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # Applies to pages written from now on (new rows); SQLite has no such setting.
        op.execute(f"ALTER TABLE outbox SET (fillfactor = {FILLFACTOR})")
        op.execute("ANALYZE outbox_due, outbox_sent, outbox_failed")  # claims plan with the backfilled rows known


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE outbox RESET (fillfactor)")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        for name in _NEW_INDEXES:
            batch_op.drop_index(name)
        for name, columns in _OLD_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
    op.drop_table("outbox_failed")
    op.drop_table("outbox_sent")
    op.drop_index("ix_outbox_due_source", table_name="outbox_due")
    op.drop_index("ix_outbox_due_device", table_name="outbox_due")
    op.drop_table("outbox_due")
