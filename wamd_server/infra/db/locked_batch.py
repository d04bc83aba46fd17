"""Locked batches: how a lane that sends without pauses (pacing off) takes its rows on Postgres.

The lane selects its device's due rows `FOR UPDATE SKIP LOCKED` in an open transaction, sends them, and writes each
row's result in the same transaction: one write per message instead of two (`sending`, then the result), which was
the costliest part of a broadcast for the database. The row locks stand for `sending`: no other claim takes the
rows meanwhile, and if the process dies the transaction ends with its connection and the rows are `queued` again
with their message ids, to be sent again with the same ids, as rows left `sending` are. A batch stays open at most
`max_open_s` (a slow network must not hold rows and a connection for long); paced lanes, the default, keep claim →
`sending` → result, since their sends are minutes apart. At most `max_open` batches are open at once, fewer than
the pool's connections: a lane in a batch may need a second connection (say, to reload the opt-out list), and
batches holding every connection would wait for one another until the pool gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.domain.models import Device, InboundMessage, OutboxItem, OutboxStatus
from wamd_server.domain.ports import Sent
from wamd_server.infra.db.devices import DEVICE_BY_ID_PG, device_from_tuple
from wamd_server.infra.db.engine import driver_connection
from wamd_server.infra.db.outbox import HELD_CAMPAIGNS, NEXT_DUE_PG, execute_record_sent, item_from_tuple, utc_or_none

# The due rows of `_CLAIM_PG` (same columns), locked instead of written; the attempt they are for is counted when
# their result is written, so `attempts` comes back as it will be then.
LOCK_DUE_PG = """
SELECT o.id, o.device_id, o.recipient, o.text, o.source_kind, o.source_key, o.wa_message_id, o.status,
    o.scheduled_at, o.user_id, o.lead_id, o.media_id, o.source_id, o.attempts + 1, o.last_error, o.min_delay_s,
    o.max_delay_s, o.sent_at, o.seq, o.greeting
FROM outbox_due d JOIN outbox o ON o.id = d.id
WHERE d.device_id = %(device)s AND d.scheduled_at <= %(now)s AND o.status = %(queued)s AND o.device_id = %(device)s
  AND (d.source_id IS NULL OR d.source_id NOT IN (SELECT id FROM campaigns WHERE status = ANY(%(held)s::text[])))
ORDER BY d.scheduled_at, d.seq
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED
"""
# A result other than `sent`: failed or cancelled rows leave `outbox_due` (a failure is logged in `outbox_failed`),
# a row queued again is due at its new time.
_SETTLE_PG = """
WITH settled AS (
    UPDATE outbox SET status = %(status)s, last_error = %(error)s, scheduled_at = coalesce(%(at)s, scheduled_at),
        attempts = attempts + 1, updated_at = %(now)s
    WHERE id = %(id)s
    RETURNING id, device_id, status, scheduled_at
),
gone AS (
    DELETE FROM outbox_due USING settled WHERE outbox_due.id = settled.id AND settled.status <> %(queued)s
),
failure AS (
    INSERT INTO outbox_failed (device_id, failed_at, outbox_id)
    SELECT device_id, %(now)s, id FROM settled WHERE status = %(failed)s
)
UPDATE outbox_due SET scheduled_at = settled.scheduled_at FROM settled
WHERE outbox_due.id = settled.id AND settled.status = %(queued)s
"""
MAX_OPEN_S = 1.0


@dataclass(frozen=True)
class _Settled:
    id: UUID
    status: OutboxStatus
    error: str
    now: datetime
    at: datetime | None = None


class LockedBatch:
    """The locked rows of one device and the results of their attempts, written when the batch ends. Also the
    device as it was when the batch began (the lane checks it is still to send unpaced) and, once the batch has
    ended, when its next queued row is due: reads the lane would otherwise make on connections of their own."""

    def __init__(
        self,
        device_id: UUID,
        device: Device | None,
        items: list[OutboxItem],
        max_open_s: float,
        history: HistorySink | None,
    ) -> None:
        self.history = history
        self.history_later = history is not None
        self.committed = False
        self.device = device
        self.items = items
        self.next_due: datetime | None = None
        self.device_id = device_id
        self._deadline = time.monotonic() + max_open_s
        self._settled: list[_Settled] = []
        self._sent: list[Sent] = []
        self._history: list[InboundMessage] = []

    def expired(self) -> bool:
        return time.monotonic() >= self._deadline

    async def cancelled(self, item_id: UUID, reason: str, now: datetime) -> None:
        self._settled.append(_Settled(item_id, OutboxStatus.CANCELLED, reason, now))

    async def failed(self, item_id: UUID, error: str, now: datetime) -> None:
        self._settled.append(_Settled(item_id, OutboxStatus.FAILED, error, now))

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None:
        self._settled.append(_Settled(item_id, OutboxStatus.QUEUED, error, now, at))

    async def release(self, item_ids: Iterable[UUID], now: datetime) -> None:
        """Nothing to write: a row not settled stays `queued` when the locks go."""

    async def sent(self, sent: Sequence[Sent], history: Sequence[InboundMessage]) -> None:
        self._sent.extend(sent)
        self._history.extend(history)
        if self.history is not None:
            self.history.hold(self.device_id, sent)

    @property
    def sent_rows(self) -> list[Sent]:
        return self._sent

    async def write(self, pg: psycopg.AsyncConnection[Any]) -> None:
        if self._sent or self._history:
            params = {
                "ids": [s.id for s in self._sent],
                "sent_at": [s.sent_at for s in self._sent],
                "server_ts": [s.server_ts for s in self._sent],
                "sent": OutboxStatus.SENT.value,
                "held_as": OutboxStatus.QUEUED.value,
                "counted": 1,
            }
            await execute_record_sent(pg, self.device_id, params, self._history)
        for s in self._settled:
            params = {"status": s.status.value, "error": s.error, "at": s.at, "now": s.now, "id": s.id}
            await pg.execute(
                _SETTLE_PG, {**params, "queued": OutboxStatus.QUEUED.value, "failed": OutboxStatus.FAILED.value}
            )


async def _outlast(task: asyncio.Future[None]) -> None:
    """Await `task` to its end even if the caller is cancelled meanwhile (then the cancel is raised after): a
    commit must finish before anything else touches its connection, and before anyone decides it failed (a
    ROLLBACK sent between its statements would put sent rows back in the queue)."""
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class HistorySink(Protocol):
    """Where a batch's sends go for the chat history (`services/history.py`): held when the lane records them,
    added once their rows are committed, released if the batch fails."""

    def hold(self, device_id: UUID, sent: Sequence[Sent]) -> None: ...

    def add(self, device_id: UUID, sent: Sequence[Sent]) -> None: ...

    def release(self, device_id: UUID, sent: Sequence[Sent]) -> None: ...


class LockedBatches:
    """Opens locked batches on a Postgres engine (see the module's docstring)."""

    def __init__(
        self, engine: AsyncEngine, max_open: int, max_open_s: float = MAX_OPEN_S, history: HistorySink | None = None
    ) -> None:
        self._engine = engine
        self._history = history
        self._max_open_s = max_open_s
        self._open = asyncio.Semaphore(max_open)

    @contextlib.asynccontextmanager
    async def batch(self, device_id: UUID, now: datetime, limit: int) -> AsyncIterator[LockedBatch]:
        """Up to `limit` due rows of the device, oldest first, locked until the block ends; the results given to
        the batch are written and committed then, also when the block fails or is cancelled. No rows (and no
        device) when the device is gone."""
        params = {
            "device": device_id,
            "now": now,
            "limit": limit,
            "queued": OutboxStatus.QUEUED.value,
            "held": HELD_CAMPAIGNS,
        }
        async with self._open, driver_connection(self._engine) as pg:
            batch: LockedBatch | None = None
            await pg.execute("BEGIN")
            try:
                found = await (await pg.execute(DEVICE_BY_ID_PG, params)).fetchone()
                rows = await (await pg.execute(LOCK_DUE_PG, params, binary=True)).fetchall() if found else []
                device = device_from_tuple(found) if found else None
                items = [item_from_tuple(r) for r in rows]
                batch = LockedBatch(device_id, device, items, self._max_open_s, self._history)
                try:
                    yield batch
                finally:
                    # What was sent is recorded even when the lane is cancelled meanwhile (device offline).
                    await _outlast(asyncio.ensure_future(self._commit(pg, batch)))
            finally:
                if batch is None or not batch.committed:
                    if self._history is not None and batch is not None and batch.sent_rows:
                        self._history.release(device_id, batch.sent_rows)
                    if not pg.closed:
                        with contextlib.suppress(psycopg.Error):
                            await pg.execute("ROLLBACK")

    async def _commit(self, pg: psycopg.AsyncConnection[Any], batch: LockedBatch) -> None:
        await batch.write(pg)
        if batch.device is not None:
            params = {"device": batch.device.id, "queued": OutboxStatus.QUEUED.value, "held": HELD_CAMPAIGNS}
            row = await (await pg.execute(NEXT_DUE_PG, params)).fetchone()
            batch.next_due = utc_or_none(row[0]) if row is not None else None
        await pg.execute("COMMIT")
        batch.committed = True
        if self._history is not None and batch.sent_rows:
            # Only once committed: the history writer reads the messages from their rows, `sent` by then.
            self._history.add(batch.device_id, batch.sent_rows)
