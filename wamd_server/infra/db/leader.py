"""One leader at a time for the planners: a Postgres advisory lock held on its own connection (released when
the connection or process dies). On SQLite there is one process, which always leads."""

from __future__ import annotations

import contextlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

PLANNER_LOCK_ID = 0x57414D45


class LeaderLock:
    def __init__(self, engine: AsyncEngine, lock_id: int = PLANNER_LOCK_ID) -> None:
        self._engine = engine
        self._lock_id = lock_id
        self._conn: AsyncConnection | None = None

    async def is_leader(self) -> bool:
        """Try to become (or check we still are) the leader."""
        if self._engine.dialect.name != "postgresql":
            return True
        try:
            if self._conn is not None:
                await self._conn.execute(text("SELECT 1"))
                # Not left idle in a transaction: that would hold back the cleanup of the whole database's old
                # row versions (vacuum, and HOT pruning of the outbox) for as long as the process leads.
                await self._conn.commit()
                return True
            conn = await self._engine.connect()
            taken = (await conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": self._lock_id})).scalar()
            await conn.commit()
            if taken:
                self._conn = conn
                log.info("this process now plans campaigns")
                return True
            await conn.close()
            return False
        except Exception:
            log.warning("lost the planner lock (database unreachable)")
            await self.release()
            return False

    async def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
