"""Helpers of the tests that store rows under an older revision and migrate them (both backends)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Connection, Uuid, column
from sqlalchemy import table as table_clause

from wamd_server.infra.db import migrate
from wamd_server.infra.db.types import UtcDateTime


def upgrade_to(conn: Connection, revision: str) -> None:
    cfg = migrate.alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def downgrade_to(conn: Connection, revision: str) -> None:
    cfg = migrate.alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)


# `devices` as every revision so far has it (the columns these tests write), typed for both backends.
OLD_DEVICES = table_clause(
    "devices",
    column("id", Uuid),
    column("name"),
    column("status"),
    column("created_at", UtcDateTime),
    column("updated_at", UtcDateTime),
)
