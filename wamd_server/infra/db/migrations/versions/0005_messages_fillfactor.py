"""messages: room on each page for receipt updates (Postgres)

A receipt changes a sent message's `status`, which no index holds: with free room on the row's page, Postgres
writes the new version there without touching the table's three indexes (a HOT update). Pages filled to the brim
(the default fillfactor, 100) ruled that out: every receipt of a broadcast added an entry to every index.
SQLite has no such setting; nothing changes there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 85


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Applies to pages written from now on; existing pages keep their rows where they are.
        op.execute(f"ALTER TABLE messages SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE messages RESET (fillfactor)")
