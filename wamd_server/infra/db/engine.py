"""Engine construction for Postgres (psycopg 3) and SQLite (aiosqlite)."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from wamd_server.infra.db.sqlite_writer import WAIT_FOR_TURN_S, OneWriter

SQLITE_BUSY_TIMEOUT_MS = 15_000
# A pooled Postgres connection unused for this long is pinged before it is handed out (see `_ping_if_idle`).
PING_AFTER_IDLE_S = 10.0


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers work during a write; foreign keys are off by default in SQLite.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return set_pragmas


def _stop_sqlite_worker(dbapi_connection: Any) -> None:
    """Drop an aiosqlite connection: roll back, then stop its worker thread (which closes it first).

    SQLAlchemy's own way, for a connection given up while its task was cancelled, also starts a "graceful" close in
    a task of its own; that task can end up waiting on the thread it has just stopped, and the event loop then never
    shuts down. The rollback comes first because SQLite's close does not end a transaction while one of its
    statements is still active (an UPDATE ... RETURNING whose rows were not all read when the cancel came): the
    connection then stays open with its write lock until that statement is garbage-collected, and every other writer
    fails with "database is locked" once its busy timeout has passed.
    (`_terminate_force_close`, aiosqlite's `stop` and its worker queue `_tx` need SQLAlchemy 2.1 and aiosqlite
    0.22.1, which pyproject asks for.)"""
    worker = dbapi_connection._connection  # the aiosqlite connection; its calls run in order on its thread
    try:
        worker._tx.put_nowait((None, functools.partial(_roll_back, worker)))
    finally:  # stopped even if a later aiosqlite renamed what this uses (tests/db/test_engine.py would then fail)
        dbapi_connection._terminate_force_close()


def _roll_back(worker: Any) -> None:
    """On the worker's thread: end the connection's transaction, if any (a failure here changes nothing: the
    connection is closed next)."""
    connection: sqlite3.Connection | None = worker._connection
    with contextlib.suppress(sqlite3.Error):  # also raised by a connection closed meanwhile
        if connection is not None and connection.in_transaction:
            connection.rollback()


def _ping_if_idle(engine: AsyncEngine, after_s: float) -> tuple[Any, Any]:
    """Pool listeners that ping a connection at checkout only when it sat unused for `after_s` or more. A ping at
    every checkout (`pool_pre_ping`) was a round trip per batch of a broadcast (3 % of the sending process's CPU);
    a connection dropped while idle (a database restart) is still replaced before anyone gets it. One dropped
    within the last seconds fails its statement once, and the pool then discards it; the send path starts over
    with the rows still queued."""

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("wamd_returned_at")
        if returned is not None and time.monotonic() - returned < after_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)  # as `pool_pre_ping` does: outside any transaction
        except Exception as exc:  # the pool discards this connection and tries another
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["wamd_returned_at"] = time.monotonic()

    return checkout, checkin


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    ping_after_idle_s: float = PING_AFTER_IDLE_S,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    sqlite_turn_wait_s: float = WAIT_FOR_TURN_S,
) -> AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": sqlite_busy_timeout_ms / 1000})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(sqlite_busy_timeout_ms))
        engine.dialect.do_terminate = _stop_sqlite_worker  # type: ignore[method-assign]
        OneWriter(sqlite_turn_wait_s).install(engine)  # after do_terminate is set: it wraps it
        return engine
    # Each process keeps at most twice pool_size connections: size Postgres' max_connections for every process.
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
    checkout, checkin = _ping_if_idle(engine, ping_after_idle_s)
    event.listen(engine.sync_engine, "checkout", checkout)
    event.listen(engine.sync_engine, "checkin", checkin)
    return engine


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the engine's pool as the bare psycopg connection, in autocommit mode: each statement is
    its own transaction, so the hot statements are written as single statements (data-modifying CTEs where a
    batch touches several tables) and cost one round trip instead of BEGIN, statement(s) and COMMIT. Postgres only.

    For the few statements of the send path that run per batch of messages: psycopg directly skips SQLAlchemy's
    statement compilation and result processing, and repeated statements become server-side prepared statements
    (psycopg's `prepare_threshold`). The pool still owns the connection: it is checked out (pinged if it sat idle)
    and returned as usual, back in the transactional mode SQLAlchemy expects."""
    async with engine.connect() as conn:
        fairy = await conn.get_raw_connection()
        driver = fairy.driver_connection
        assert isinstance(driver, psycopg.AsyncConnection), "driver_connection needs the psycopg driver"
        await driver.set_autocommit(True)
        try:
            yield driver
        finally:
            if driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                await driver.set_autocommit(False)
            elif not driver.closed:
                # A statement or transaction was cut short (cancelled): the connection's state is unknown.
                await conn.invalidate()


def sync_url(url: str) -> str:
    """The synchronous driver URL for the same database (Alembic runs synchronously)."""
    return url.replace("sqlite+aiosqlite", "sqlite", 1)
