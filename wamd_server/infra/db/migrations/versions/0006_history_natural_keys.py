"""messages and chats keyed by what identifies them: (device, message id) and (device, chat JID)

Both tables had a random uuid primary key that nothing read, beside a unique constraint on the natural key. Every
message sent wrote an entry at a random place of two more indexes (the `messages` and `chats` keys) and made two
random uuids: about a third of the Postgres work of writing a broadcast's chat history. The unique constraints
become the primary keys (on Postgres one index build per table: a few seconds per million rows, under the lock
migrations hold).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> (its natural key, the unique constraint holding it)
_KEYS = {
    "messages": (["device_id", "wa_message_id"], "uq_messages_device_id_wa_message_id"),
    "chats": (["device_id", "jid"], "uq_chats_device_id_jid"),
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, (key, unique) in _KEYS.items():
        if postgres:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT pk_{table}")
            op.execute(f"ALTER TABLE {table} DROP COLUMN id")
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {unique}")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY ({', '.join(key)})")
            continue
        with op.batch_alter_table(table, recreate="always") as batch_op:
            batch_op.drop_constraint(unique, type_="unique")
            batch_op.drop_constraint(f"pk_{table}", type_="primary")
            batch_op.drop_column("id")
            batch_op.create_primary_key(f"pk_{table}", key)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, (key, unique) in _KEYS.items():
        if postgres:
            op.execute(f"ALTER TABLE {table} ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid()")
            op.execute(f"ALTER TABLE {table} ALTER COLUMN id DROP DEFAULT")
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT pk_{table}")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {unique} UNIQUE ({', '.join(key)})")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (id)")
            continue
        with op.batch_alter_table(table, recreate="always") as batch_op:
            batch_op.add_column(sa.Column("id", sa.Uuid(), nullable=True))
        # SQLAlchemy's Uuid on SQLite: 32 hex digits.
        op.execute(
            sa.table(table, sa.column("id")).update().values(id=sa.func.lower(sa.func.hex(sa.func.randomblob(16))))
        )
        with op.batch_alter_table(table, recreate="always") as batch_op:
            batch_op.alter_column("id", existing_type=sa.Uuid(), nullable=False)
            batch_op.drop_constraint(f"pk_{table}", type_="primary")
            batch_op.create_primary_key(f"pk_{table}", ["id"])
            batch_op.create_unique_constraint(unique, key)
