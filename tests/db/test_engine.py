"""The Postgres engine's pool: a connection that sat idle is pinged before it is handed out, a busy one is not."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import PG_ADMIN
from wamd_server.infra.db.engine import create_engine


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def terminate(pid: int) -> None:
    """Drop a server connection, as a database restart would."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


async def test_a_connection_that_sat_idle_is_pinged_and_replaced_when_it_was_dropped(fresh_pg_url: str) -> None:
    engine = create_engine(fresh_pg_url, pool_size=1, ping_after_idle_s=0.0)
    try:
        dropped = await backend_pid(engine)
        terminate(dropped)
        assert await backend_pid(engine) != dropped  # the caller never saw the dead connection
    finally:
        await engine.dispose()


async def test_a_connection_used_a_moment_ago_is_handed_out_unpinged(fresh_pg_url: str) -> None:
    # The price of not pinging busy connections: one dropped since its last use fails its statement once, then the
    # pool has replaced it.
    engine = create_engine(fresh_pg_url, pool_size=1, ping_after_idle_s=3600.0)
    try:
        dropped = await backend_pid(engine)
        terminate(dropped)
        with pytest.raises(DBAPIError):
            await backend_pid(engine)
        assert await backend_pid(engine) != dropped
    finally:
        await engine.dispose()
