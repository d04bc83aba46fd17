"""One writer at a time on a SQLite engine, in the order they came.

SQLite lets one connection write at a time; the others wait in its busy handler, which sleeps and tries again.
That wait is not fair: under load a writer can lose the race again and again until its busy timeout ends in
"database is locked", while later ones get through. In this process the writers queue on an asyncio lock
instead, taken by a transaction at its first writing statement and given back when it commits or rolls back (or
its connection is dropped). SQLite's busy timeout still covers writers of other processes (the CLI).

Not covered (wamd does neither): a connection in AUTOCOMMIT keeps the turn until SQLAlchemy ends its
transaction, and a `detach()`ed connection collected without being closed never gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import await_

# A statement that may write: its first keyword, or a data-modifying WITH (a false match only queues a reader).
_WRITES = re.compile(
    r"\s*(?:INSERT|UPDATE|DELETE|REPLACE|CREATE|ALTER|DROP)\b|\s*WITH\b.*\b(?:INSERT|UPDATE|DELETE|REPLACE)\b",
    re.IGNORECASE | re.DOTALL,
)
# How long a writer waits for its turn before failing as SQLite would: far longer than any transaction of ours
# holds it; it only ends a wait that cannot end (a transaction waiting for another of its own task).
WAIT_FOR_TURN_S = 60.0


class OneWriter:
    def __init__(self, wait_s: float = WAIT_FOR_TURN_S) -> None:
        self._wait_s = wait_s
        self._turn = asyncio.Lock()
        self._holder: Any = None  # the DBAPI connection whose transaction writes
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "before_cursor_execute", self._before_execute)
        dialect = engine.dialect
        for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
            setattr(dialect, name, self._giving_back(getattr(dialect, name)))

    def _before_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        dbapi_connection = conn.connection.dbapi_connection
        if self._holder is dbapi_connection or not _WRITES.match(statement):
            return
        try:
            await_(self._take())
        except TimeoutError:
            raise sqlite3.OperationalError(f"database is locked (no turn to write within {self._wait_s:g} s)") from None
        self._holder = dbapi_connection

    async def _take(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._wait_s):
            await self._turn.acquire()

    def _giving_back(self, method: Any) -> Any:
        """`method` (the dialect's commit, rollback, close or terminate), then the turn is given back if this
        connection held it: also when the method fails, since the transaction is over or the connection gone."""

        def wrapped(connection: Any) -> None:
            try:
                method(connection)
            finally:
                # Commit and rollback are given the pool's proxy of the connection, close and terminate the
                # connection itself.
                if self._holder is not None and self._holder is getattr(connection, "dbapi_connection", connection):
                    self._give_back()

        return wrapped

    def _give_back(self) -> None:
        self._holder = None
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop or self._loop is None:
            self._turn.release()
        else:  # a connection collected by the garbage collector on another thread (SQLAlchemy closes it there)
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits for the turn
                self._loop.call_soon_threadsafe(self._turn.release)
