"""The engines: the Postgres pool pings a connection that sat idle before handing it out, not a busy one; a
SQLite connection given up mid-statement releases its write lock at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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


@asynccontextmanager
async def counters_db(tmp_path: Path, *rows: int, **engine_options: Any) -> AsyncIterator[AsyncEngine]:
    """A SQLite engine on a new file with a `counters (n)` table holding `rows`, disposed of at the end."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'wamd.db'}", **engine_options)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE counters (n INTEGER)"))
            for n in rows:
                await conn.execute(text("INSERT INTO counters VALUES (:n)"), {"n": n})
        yield engine
    finally:
        await engine.dispose()


async def counters(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT n FROM counters ORDER BY n"))).scalars().all())


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


async def test_a_sqlite_connection_given_up_mid_statement_lets_other_writers_in_at_once(tmp_path: Path) -> None:
    # A statement cut short (an UPDATE ... RETURNING whose rows were not all read when its task was cancelled) kept a
    # dropped SQLite connection open, with its write lock, until the statement was garbage-collected: every other
    # writer meanwhile failed with "database is locked" once the busy timeout had passed.
    async with counters_db(tmp_path, 1, 2, 3) as engine:
        async with engine.connect() as conn:
            rows = await conn.stream(text("UPDATE counters SET n = n + 10 RETURNING n"))
            assert await rows.fetchone() is not None
            await conn.invalidate()  # what SQLAlchemy does with a connection whose task was cancelled mid-statement
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO counters VALUES (4)"))
        assert await counters(engine) == [1, 2, 3, 4]  # the update given up was rolled back


async def test_sqlite_writers_take_turns_instead_of_failing_on_the_busy_timeout(tmp_path: Path) -> None:
    # Twenty transactions, each writing and holding its write for 50 ms, together far longer than SQLite's busy
    # timeout (0.2 s here): SQLite's own waiting let some fail with "database is locked"; in turns, all get through.
    async with counters_db(tmp_path, sqlite_busy_timeout_ms=200) as engine:

        async def write(n: int) -> None:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT count(*) FROM counters"))  # a read first takes no turn
                await conn.execute(text("INSERT INTO counters VALUES (:n)"), {"n": n})
                await asyncio.sleep(0.05)

        await asyncio.gather(*(write(n) for n in range(20)))
        assert await counters(engine) == list(range(20))


async def test_a_sqlite_writer_that_gets_no_turn_fails_and_the_turn_comes_back_when_the_writer_ends(
    tmp_path: Path,
) -> None:
    async with counters_db(tmp_path, sqlite_turn_wait_s=0.2) as engine:

        async def write(n: int) -> None:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO counters VALUES (:n)"), {"n": n})

        for end in ("rollback", "invalidate"):
            async with engine.connect() as first:
                await first.execute(text("INSERT INTO counters VALUES (0)"))  # holds the turn, uncommitted
                with pytest.raises(DBAPIError, match=r"no turn to write within 0\.2 s"):
                    await write(1)
                if end == "rollback":
                    await first.rollback()
                else:
                    await first.invalidate()  # a connection given up (its task cancelled)
                await write(2)  # at once: the turn came back
        assert await counters(engine) == [2, 2]
