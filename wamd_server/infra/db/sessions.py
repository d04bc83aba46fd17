"""Stored credentials of the simulator transport (the `SessionStore` port)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.infra.db.tables import transport_sessions
from wamd_server.infra.db.upsert import insert_for


class SqlSessionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, jid: str) -> str | None:
        query = select(transport_sessions.c.secret).where(transport_sessions.c.jid == jid)
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).scalar_one_or_none()

    async def put(self, jid: str, transport: str, secret: str) -> None:
        async with self._engine.begin() as conn:
            stmt = insert_for(conn, transport_sessions).values(
                jid=jid, transport=transport, secret=secret, updated_at=datetime.now(UTC)
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[transport_sessions.c.jid],
                set_={"transport": transport, "secret": secret, "updated_at": datetime.now(UTC)},
            )
            await conn.execute(stmt)

    async def delete(self, jid: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(transport_sessions).where(transport_sessions.c.jid == jid))
