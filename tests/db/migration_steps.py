"""Helpers of the tests that store rows under an older revision and migrate them (both backends)."""

from __future__ import annotations

import uuid
from datetime import datetime

from alembic import command
from sqlalchemy import Connection, Uuid, column
from sqlalchemy import table as table_clause
from sqlalchemy.ext.asyncio import AsyncConnection

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


async def device_under(conn: AsyncConnection, revision: str, at: datetime) -> uuid.UUID:
    """Migrate to `revision` and store one online device as that revision's schema has it; its id."""
    await conn.run_sync(upgrade_to, revision)
    device = uuid.uuid4()
    await conn.execute(
        OLD_DEVICES.insert(), {"id": device, "name": "d", "status": "online", "created_at": at, "updated_at": at}
    )
    return device
