"""outbox.greeting: where a message's text holds its `{greeting}`

A campaign's messages were rendered when it launched, greeting included, so a paced campaign that ran into the
afternoon still said good morning. The text now keeps where its greeting is, and the dispatcher puts in the
greeting of the moment it sends (`services/templating.py` `regreet`).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("greeting", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("greeting")
