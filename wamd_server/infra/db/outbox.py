"""The outbox: one table for every outbound message and its fate.

Producers insert with a unique `source_key` (`ON CONFLICT DO NOTHING`), so producing twice never doubles a
message. The worker that owns a device claims its due rows (`FOR UPDATE SKIP LOCKED` on Postgres; SQLite has
one writer), marks them `sending`, and records `sent` or `failed` after the attempt. Reports are computed from
these rows only.

A row still to send also has an `outbox_due` row (device, due time: what claims search), and each send an
`outbox_sent` row (device, time: pacing's caps); see `tables.py`. Every statement here that queues or settles a
row keeps both in step, in the same transaction, locking `outbox` rows before theirs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import ColumnElement, bindparam, case, delete, distinct, func, insert, literal, or_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wamd_server.domain.ids import new_message_id
from wamd_server.domain.models import CampaignStatus, InboundMessage, OutboxItem, OutboxStatus, SourceKind
from wamd_server.domain.ports import Sent
from wamd_server.infra.db.engine import driver_connection, is_postgres
from wamd_server.infra.db.messages import SENT_HISTORY_CTES_PG, sent_history_params, write_sent
from wamd_server.infra.db.tables import (
    campaigns,
    devices,
    distribution_reports,
    leads,
    messages,
    outbox,
    outbox_due,
    outbox_failed,
    outbox_sent,
)
from wamd_server.infra.db.types import UtcDateTime
from wamd_server.infra.db.upsert import insert_for

INSERT_BATCH = 1000

# The send path on Postgres, as plain SQL run by psycopg (see `driver_connection`): it runs once per batch of a
# device, thousands of times a minute during a broadcast. Same semantics as the SQLAlchemy statements used on
# SQLite (and kept next to them): claim due rows of one device, oldest first, skipping rows locked by another
# claim and rows of paused or cancelled campaigns. The device is checked on the outbox row too: a row moved to
# another device (`move_rows`) while the claim waited for its lock is re-checked as it is now, its `outbox_due`
# row as it was.
_CLAIM_PG = """
UPDATE outbox SET status = %(sending)s, attempts = attempts + 1, claimed_at = %(now)s, updated_at = %(now)s
WHERE id IN (
    SELECT o.id FROM outbox_due d JOIN outbox o ON o.id = d.id
    WHERE d.device_id = %(device)s AND d.scheduled_at <= %(now)s AND o.status = %(queued)s
      AND o.device_id = %(device)s
      AND (d.source_id IS NULL OR d.source_id NOT IN (SELECT id FROM campaigns WHERE status = ANY(%(held)s::text[])))
    ORDER BY d.scheduled_at, d.seq
    LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
)
RETURNING id, device_id, recipient, text, source_kind, source_key, wa_message_id, status, scheduled_at, user_id,
    lead_id, media_id, source_id, attempts, last_error, min_delay_s, max_delay_s, sent_at, seq, greeting
"""
CLAIM_COLUMNS = tuple(name.strip() for name in _CLAIM_PG.rsplit("RETURNING", 1)[1].split(","))
# Marking a batch sent: one statement instead of one per row (executemany); the rows' own times travel as arrays
# (`%b`: psycopg's binary format, several times cheaper to build than array literals).
# Run on its own, or together with the batch's chat history (`record_sent`): one statement, so one transaction.
# `(status = 'sending') IS TRUE` is `status = 'sending'` that no index can answer: the statistics see hardly any
# `sending` row while a broadcast holds thousands, and the planner scanned all of them (index on status) for every
# batch instead of looking the batch's ids up by primary key.
# `%(held_as)s` is the status the rows are held in: `sending` after a claim, `queued` in a locked batch (whose
# attempt is then counted here, `%(counted)s`, instead of by a claim). The rows marked leave `outbox_due` and
# enter `outbox_sent`.
_MARK_SENT_CTE_PG = """
marked AS (
    UPDATE outbox SET status = %(sent)s, sent_at = v.sent_at, server_ts = v.server_ts, updated_at = v.sent_at,
        last_error = NULL, attempts = outbox.attempts + %(counted)s
    FROM unnest(%(ids)b::uuid[], %(sent_at)b::timestamptz[], %(server_ts)b::timestamptz[])
         AS v(id, sent_at, server_ts)
    WHERE outbox.id = v.id AND (outbox.status = %(held_as)s) IS TRUE
    RETURNING outbox.id, outbox.device_id, outbox.sent_at
),
undue AS (
    DELETE FROM outbox_due USING marked WHERE outbox_due.id = marked.id
),
logged AS (
    INSERT INTO outbox_sent (device_id, sent_at, outbox_id) SELECT device_id, sent_at, id FROM marked
)
"""
_MARK_SENT_PG = "WITH " + _MARK_SENT_CTE_PG + "SELECT 1"
_RECORD_SENT_PG = "WITH " + _MARK_SENT_CTE_PG + ", " + SENT_HISTORY_CTES_PG + "SELECT 1"
# Producing on Postgres: a chunk of messages as one INSERT over arrays (one statement per row before, through
# SQLAlchemy's executemany: a 200,000-lead broadcast took minutes to enqueue), each new row due as well. The row
# count is what was new.
_ENQUEUE_PG = """
WITH new AS (
INSERT INTO outbox (id, seq, user_id, device_id, lead_id, recipient, text, media_id, source_kind, source_id,
                    source_key, wa_message_id, status, attempts, scheduled_at, min_delay_s, max_delay_s, created_at,
                    updated_at, greeting)
SELECT gen_random_uuid(), r.seq, r.user_id, r.device_id, r.lead_id, r.recipient, r.text, r.media_id, r.source_kind,
       r.source_id, r.source_key, r.wa_message_id, %(queued)s, 0, r.scheduled_at, r.min_delay_s, r.max_delay_s,
       %(now)s, %(now)s, r.greeting
FROM unnest(%(seq)b::bigint[], %(user_id)b::uuid[], %(device_id)b::uuid[], %(lead_id)b::uuid[],
            %(recipient)b::text[], %(text)b::text[], %(media_id)b::uuid[], %(source_kind)b::text[],
            %(source_id)b::uuid[], %(source_key)b::text[], %(wa_message_id)b::text[],
            %(scheduled_at)b::timestamptz[], %(min_delay_s)b::float8[], %(max_delay_s)b::float8[],
            %(greeting)b::text[])
     AS r(seq, user_id, device_id, lead_id, recipient, text, media_id, source_kind, source_id, source_key,
          wa_message_id, scheduled_at, min_delay_s, max_delay_s, greeting)
ON CONFLICT (source_key) DO NOTHING
RETURNING id, device_id, source_id, scheduled_at, seq
)
INSERT INTO outbox_due (id, device_id, source_id, scheduled_at, seq)
SELECT id, device_id, source_id, scheduled_at, seq FROM new
"""
ENQUEUE_CHUNK_PG = 5000
# The first due row in the device's order that is queued (not `sending`) and not held.
NEXT_DUE_PG = """
SELECT d.scheduled_at FROM outbox_due d JOIN outbox o ON o.id = d.id
WHERE d.device_id = %(device)s AND o.status = %(queued)s AND o.device_id = %(device)s
  AND (d.source_id IS NULL OR d.source_id NOT IN (SELECT id FROM campaigns WHERE status = ANY(%(held)s::text[])))
ORDER BY d.scheduled_at, d.seq
LIMIT 1
"""
DUE_COLUMNS = ("id", "device_id", "source_id", "scheduled_at", "seq")
WAITING = (OutboxStatus.QUEUED.value, OutboxStatus.SENDING.value)
HELD_CAMPAIGNS = [CampaignStatus.PAUSED.value, CampaignStatus.CANCELLED.value]


async def execute_record_sent(
    pg: psycopg.AsyncConnection[Any], device_id: UUID, params: dict[str, Any], history: Sequence[InboundMessage]
) -> None:
    """Mark a batch sent (`params` as in `_MARK_SENT_CTE_PG`), with its chat history when there is one."""
    if history:
        params.update(sent_history_params([(device_id, m) for m in history]))
        await pg.execute(_RECORD_SENT_PG, params)
    else:
        await pg.execute(_MARK_SENT_PG, params)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


_SOURCE_KINDS = {kind.value: kind for kind in SourceKind}
_STATUSES = {status.value: status for status in OutboxStatus}


def item_from_tuple(row: Sequence[Any]) -> OutboxItem:
    """An `OutboxItem` from a row `RETURNING` the columns of `_CLAIM_PG` (in that order), as psycopg returns it
    (times in the session's zone, where SQLAlchemy's column type gives UTC). Built field by field with the enums
    looked up in dicts: it runs for every message sent, and the generic path was 5 % of a broadcast's CPU."""
    (item_id, device_id, recipient, text, source_kind, source_key, wa_message_id, status, scheduled_at, user_id,
     lead_id, media_id, source_id, attempts, last_error, min_delay_s, max_delay_s, sent_at, seq,
     greeting) = row  # fmt: skip
    return OutboxItem(
        id=item_id,
        device_id=device_id,
        recipient=recipient,
        text=text,
        source_kind=_SOURCE_KINDS[source_kind],
        source_key=source_key,
        wa_message_id=wa_message_id,
        status=_STATUSES[status],
        scheduled_at=scheduled_at.astimezone(UTC),
        user_id=user_id,
        lead_id=lead_id,
        media_id=media_id,
        source_id=source_id,
        attempts=attempts,
        last_error=last_error,
        min_delay_s=min_delay_s,
        max_delay_s=max_delay_s,
        sent_at=None if sent_at is None else sent_at.astimezone(UTC),
        seq=seq,
        greeting=greeting,
    )


def item_from_row(row: RowMapping | Mapping[str, Any]) -> OutboxItem:
    """An `OutboxItem` from a row read through SQLAlchemy (any backend; times already in UTC)."""
    return item_from_tuple([row[name] for name in CLAIM_COLUMNS])


@dataclass(frozen=True)
class NewMessage:
    """What a producer gives the outbox."""

    device_id: UUID
    recipient: str
    text: str
    source_kind: SourceKind
    source_key: str
    scheduled_at: datetime
    user_id: UUID | None = None
    lead_id: UUID | None = None
    media_id: UUID | None = None
    source_id: UUID | None = None
    min_delay_s: float | None = None
    max_delay_s: float | None = None
    greeting: str | None = None  # where `text` holds its greeting (`templating.render_with_greeting`)


@dataclass(frozen=True)
class Tally:
    should_send: int
    done_send: int
    failed_send: int
    remaining_send: int
    cancelled: int = 0


def tally_columns() -> list[Any]:
    status = outbox.c.status
    return [
        func.count().label("should_send"),
        func.sum(case((status == OutboxStatus.SENT.value, 1), else_=0)).label("done_send"),
        func.sum(case((status == OutboxStatus.FAILED.value, 1), else_=0)).label("failed_send"),
        func.sum(case((status.in_([OutboxStatus.QUEUED.value, OutboxStatus.SENDING.value]), 1), else_=0)).label(
            "remaining_send"
        ),
        func.sum(case((status == OutboxStatus.CANCELLED.value, 1), else_=0)).label("cancelled"),
    ]


def tally_from(row: Any) -> Tally:
    # Cancelled messages (opted out, vetoed, campaign cancelled) were never due: they do not count as "should".
    cancelled = int(row.cancelled or 0)
    return Tally(
        should_send=int(row.should_send or 0) - cancelled,
        done_send=int(row.done_send or 0),
        failed_send=int(row.failed_send or 0),
        remaining_send=int(row.remaining_send or 0),
        cancelled=cancelled,
    )


def _not_held() -> ColumnElement[bool]:
    """A due row not of a paused or cancelled campaign (those wait for a resume)."""
    held = select(campaigns.c.id).where(campaigns.c.status.in_(HELD_CAMPAIGNS))
    return outbox_due.c.source_id.is_(None) | outbox_due.c.source_id.not_in(held)


def _due_of(device_id: UUID) -> Any:
    """The device's rows waiting in `outbox_due` that are queued (not `sending`) and not held (paused or cancelled
    campaign), as a select of their ids, to be ordered, limited or aggregated."""
    return (
        select(outbox_due.c.id)
        .join(outbox, outbox.c.id == outbox_due.c.id)
        .where(
            outbox_due.c.device_id == device_id,
            outbox.c.device_id == device_id,
            outbox.c.status == OutboxStatus.QUEUED.value,
            _not_held(),
        )
    )


def _due_again(rows: ColumnElement[bool]) -> Any:
    """`outbox_due` rows for the outbox rows matching `rows` that are queued and not due yet (queued again)."""
    waiting = select(outbox_due.c.id).where(outbox_due.c.id == outbox.c.id).exists()
    return insert(outbox_due).from_select(
        list(DUE_COLUMNS),
        select(*(outbox.c[name] for name in DUE_COLUMNS)).where(
            rows, outbox.c.status == OutboxStatus.QUEUED.value, ~waiting
        ),
    )


def _settled_leave(rows: ColumnElement[bool], *due: ColumnElement[bool]) -> Any:
    """Remove from `outbox_due` the rows matching `rows` (and, to narrow the search there, `due`) that are no
    longer waiting. The outbox rows are found first (through `rows`' index), then their due rows by key."""
    settled = select(outbox.c.id).where(rows, outbox.c.status.not_in(WAITING))
    return delete(outbox_due).where(outbox_due.c.id.in_(settled), *due)


async def _cancel_if_campaign_ended(conn: AsyncConnection, rows: ColumnElement[bool], now: datetime) -> None:
    """Cancel the queued rows among `rows` whose campaign was cancelled or deleted. A campaign's cancel leaves its
    `sending` rows alone: queued again afterwards (released, or to retry), they would wait forever for a campaign
    that never sends again (or, deleted, be sent for nothing)."""
    campaign = select(campaigns.c.status).where(campaigns.c.id == outbox.c.source_id).scalar_subquery()
    ended = (
        update(outbox)
        .where(
            rows,
            outbox.c.status == OutboxStatus.QUEUED.value,
            outbox.c.source_kind == SourceKind.CAMPAIGN.value,
            or_(campaign.is_(None), campaign == CampaignStatus.CANCELLED.value),
        )
        .values(
            status=OutboxStatus.CANCELLED.value,
            last_error=case((campaign.is_(None), "campaign deleted"), else_="campaign cancelled"),
            updated_at=now,
        )
    )
    if (await conn.execute(ended)).rowcount:
        await conn.execute(_settled_leave(rows))


class SqlOutboxRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> int:
        """Insert new messages; those whose `source_key` exists already are skipped. Returns how many were new."""
        created = 0
        base = time.time_ns()
        if is_postgres(self._engine):
            for start in range(0, len(messages), ENQUEUE_CHUNK_PG):
                chunk = messages[start : start + ENQUEUE_CHUNK_PG]
                params = {
                    "queued": OutboxStatus.QUEUED.value,
                    "now": now,
                    "seq": [base + start + i for i in range(len(chunk))],
                    "user_id": [m.user_id for m in chunk],
                    "device_id": [m.device_id for m in chunk],
                    "lead_id": [m.lead_id for m in chunk],
                    "recipient": [m.recipient for m in chunk],
                    "text": [m.text for m in chunk],
                    "media_id": [m.media_id for m in chunk],
                    "source_kind": [m.source_kind.value for m in chunk],
                    "source_id": [m.source_id for m in chunk],
                    "source_key": [m.source_key for m in chunk],
                    "wa_message_id": [new_message_id() for _ in chunk],
                    "scheduled_at": [m.scheduled_at for m in chunk],
                    "min_delay_s": [m.min_delay_s for m in chunk],
                    "max_delay_s": [m.max_delay_s for m in chunk],
                    "greeting": [m.greeting for m in chunk],
                }
                async with driver_connection(self._engine) as pg:
                    created += (await pg.execute(_ENQUEUE_PG, params)).rowcount
            return created
        for start in range(0, len(messages), INSERT_BATCH):
            rows = [
                {
                    "id": uuid.uuid4(),
                    "seq": base + start + i,
                    "user_id": m.user_id,
                    "device_id": m.device_id,
                    "lead_id": m.lead_id,
                    "recipient": m.recipient,
                    "text": m.text,
                    "media_id": m.media_id,
                    "source_kind": m.source_kind.value,
                    "source_id": m.source_id,
                    "source_key": m.source_key,
                    "wa_message_id": new_message_id(),
                    "status": OutboxStatus.QUEUED.value,
                    "attempts": 0,
                    "scheduled_at": m.scheduled_at,
                    "min_delay_s": m.min_delay_s,
                    "max_delay_s": m.max_delay_s,
                    "greeting": m.greeting,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, m in enumerate(messages[start : start + INSERT_BATCH])
            ]
            async with self._engine.begin() as conn:
                stmt = (
                    insert_for(conn, outbox)
                    .on_conflict_do_nothing(index_elements=[outbox.c.source_key])
                    .returning(*(outbox.c[name] for name in DUE_COLUMNS))
                )
                # executemany: SQLAlchemy sends it as batched multi-row INSERTs without compiling one per size.
                new = [dict(r) for r in (await conn.execute(stmt, rows)).mappings()]
                if new:
                    await conn.execute(insert(outbox_due), new)
                created += len(new)
        return created

    async def claim(self, device_id: UUID, now: datetime, limit: int) -> list[OutboxItem]:
        """Mark up to `limit` due rows of a device `sending` and return them, oldest first.

        Rows of paused or cancelled campaigns wait; so do rows to recipients who opted out (the dispatcher
        cancels those when it meets them, see `cancel_opted_out`)."""
        if is_postgres(self._engine):
            params = {
                "device": device_id,
                "now": now,
                "limit": limit,
                "queued": OutboxStatus.QUEUED.value,
                "sending": OutboxStatus.SENDING.value,
                "held": HELD_CAMPAIGNS,
            }
            async with driver_connection(self._engine) as pg:
                claimed = await (await pg.execute(_CLAIM_PG, params, binary=True)).fetchall()
            items = [item_from_tuple(r) for r in claimed]
            return sorted(items, key=lambda item: (item.scheduled_at, item.seq))
        due = (
            _due_of(device_id)
            .where(outbox_due.c.scheduled_at <= now)
            .order_by(outbox_due.c.scheduled_at, outbox_due.c.seq)
            .limit(limit)
            .correlate(None)  # its `outbox` is not the one the statement updates
            .scalar_subquery()
        )
        stmt = (
            update(outbox)
            .where(outbox.c.id.in_(due))
            .values(status=OutboxStatus.SENDING.value, attempts=outbox.c.attempts + 1, claimed_at=now, updated_at=now)
            .returning(*outbox.c)
        )
        async with self._engine.begin() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        items = [item_from_row(r) for r in rows]
        return sorted(items, key=lambda item: (item.scheduled_at, item.seq))

    async def next_due(self, device_id: UUID) -> datetime | None:
        """When the device's earliest queued message is due (None: nothing queued). Rows of paused or cancelled
        campaigns are not due: the lane would otherwise poll for them every 50 ms until the campaign resumes
        (resuming wakes the lanes anyway)."""
        if is_postgres(self._engine):
            params = {"device": device_id, "queued": OutboxStatus.QUEUED.value, "held": HELD_CAMPAIGNS}
            async with driver_connection(self._engine) as pg:
                row = await (await pg.execute(NEXT_DUE_PG, params)).fetchone()
            return utc_or_none(row[0]) if row is not None else None
        query = _due_of(device_id).with_only_columns(func.min(outbox_due.c.scheduled_at))
        async with self._engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar_one()
        return value

    async def send_first_bounds(self, device_id: UUID, now: datetime) -> tuple[datetime | None, datetime | None]:
        """Of the device's queued rows due by `now` and not held: the earliest of campaigns and sequences (what a
        message to send first goes before), and the latest typed by hand or sent by a plugin (what it goes after,
        so two such messages keep their order)."""
        kind = outbox.c.source_kind
        bulk = kind.in_([SourceKind.CAMPAIGN.value, SourceKind.SEQUENCE.value])
        due_at = outbox_due.c.scheduled_at
        query = _due_of(device_id).with_only_columns(
            func.min(case((bulk, due_at), else_=None)), func.max(case((~bulk, due_at), else_=None))
        )
        async with self._engine.connect() as conn:
            first_bulk, last_other = (await conn.execute(query.where(due_at <= now))).one()
        return first_bulk, last_other

    async def in_flight(self, device_id: UUID) -> list[OutboxItem]:
        """Rows left `sending` (a crash between claim and result): they are sent again with the same id."""
        query = (
            select(outbox)
            .join(outbox_due, outbox_due.c.id == outbox.c.id)
            .where(outbox_due.c.device_id == device_id, outbox.c.status == OutboxStatus.SENDING.value)
            .order_by(outbox.c.scheduled_at, outbox.c.seq)
        )
        async with self._engine.connect() as conn:
            return [item_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def record_sent(self, device_id: UUID, sent: Sequence[Sent], history: Sequence[InboundMessage]) -> None:
        """Mark acknowledged rows `sent` (only rows still `sending`: a row is settled once) and add the sends to
        the device's chat history, in one transaction: a claimed row never lacks its history message, and a batch
        costs one commit instead of two. (Locked batches leave the history to `services/history.py`.)"""
        if not sent and not history:
            return
        if is_postgres(self._engine):
            params = {
                "ids": [s.id for s in sent],
                "sent_at": [s.sent_at for s in sent],
                "server_ts": [s.server_ts for s in sent],
                "sent": OutboxStatus.SENT.value,
                "held_as": OutboxStatus.SENDING.value,
                "counted": 0,
            }
            async with driver_connection(self._engine) as pg:
                await execute_record_sent(pg, device_id, params, history)
            return
        stmt = (
            update(outbox)
            .where(outbox.c.id == bindparam("b_id"), outbox.c.status == OutboxStatus.SENDING.value)
            .values(
                status=OutboxStatus.SENT.value,
                sent_at=bindparam("b_sent"),
                server_ts=bindparam("b_ts"),
                updated_at=bindparam("b_sent"),
                last_error=None,
            )
        )
        async with self._engine.begin() as conn:
            # SQLite has one writer: the rows found still `sending` here are the ones the update settles.
            held = select(outbox.c.id).where(
                outbox.c.id.in_([s.id for s in sent]), outbox.c.status == OutboxStatus.SENDING.value
            )
            settled = set((await conn.execute(held)).scalars()) if sent else set()
            marked = list({s.id: s for s in sent if s.id in settled}.values())
            if marked:
                await conn.execute(stmt, [{"b_id": s.id, "b_sent": s.sent_at, "b_ts": s.server_ts} for s in marked])
                await conn.execute(delete(outbox_due).where(outbox_due.c.id.in_(settled)))
                await conn.execute(
                    insert(outbox_sent),
                    [{"device_id": device_id, "sent_at": s.sent_at, "outbox_id": s.id} for s in marked],
                )
            if history:
                await write_sent(conn, [(device_id, m) for m in history])

    async def sent_without_history(self, device_id: UUID, since: datetime) -> list[tuple[OutboxItem, Sent]]:
        """Rows the device sent since `since` whose message is missing from its chat history: the history of
        unpaced sends is stored a moment after them (`services/history.py`), which a crash can prevent."""
        stored = (
            select(messages.c.wa_message_id)
            .where(messages.c.device_id == outbox.c.device_id, messages.c.wa_message_id == outbox.c.wa_message_id)
            .exists()
        )
        query = (
            select(outbox)
            .join(outbox_sent, outbox_sent.c.outbox_id == outbox.c.id)
            .where(
                outbox_sent.c.device_id == device_id,
                outbox_sent.c.sent_at >= since,
                outbox.c.status == OutboxStatus.SENT.value,
                ~stored,
            )
            .order_by(outbox_sent.c.sent_at)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [(item_from_row(r), Sent(r["id"], r["sent_at"], r["server_ts"] or r["sent_at"])) for r in rows]

    async def mark_failed(self, item_id: UUID, error: str, now: datetime) -> None:
        await self._set(item_id, now, status=OutboxStatus.FAILED.value, last_error=error)

    async def mark_cancelled(self, item_id: UUID, reason: str, now: datetime) -> None:
        await self._set(item_id, now, status=OutboxStatus.CANCELLED.value, last_error=reason)

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None:
        await self._set(item_id, now, status=OutboxStatus.QUEUED.value, scheduled_at=at, last_error=error)

    async def release(self, item_ids: Iterable[UUID], now: datetime) -> None:
        """Back to `queued` without counting the attempt (the device went away before sending)."""
        ids = list(item_ids)
        if not ids:
            return
        stmt = (
            update(outbox)
            # By primary key, never through an index on status (see `_MARK_SENT_CTE_PG`).
            .where(outbox.c.id.in_(ids), (outbox.c.status == OutboxStatus.SENDING.value).is_(True))
            .values(status=OutboxStatus.QUEUED.value, attempts=outbox.c.attempts - 1, updated_at=now)
        )
        async with self._engine.begin() as conn:
            await conn.execute(stmt)
            await _cancel_if_campaign_ended(conn, outbox.c.id.in_(ids), now)

    async def _set(self, item_id: UUID, now: datetime, **values: Any) -> None:
        """Settle a row (or queue it again), its `outbox_due` row following (and `outbox_failed`)."""
        async with self._engine.begin() as conn:
            await conn.execute(update(outbox).where(outbox.c.id == item_id).values(updated_at=now, **values))
            await conn.execute(delete(outbox_due).where(outbox_due.c.id == item_id))
            if values.get("status") == OutboxStatus.QUEUED.value:
                await _cancel_if_campaign_ended(conn, outbox.c.id == item_id, now)
            await conn.execute(_due_again(outbox.c.id == item_id))
            if values.get("status") == OutboxStatus.FAILED.value:
                failure = select(outbox.c.device_id, literal(now, UtcDateTime), outbox.c.id)
                logged = insert(outbox_failed).from_select(
                    ["device_id", "failed_at", "outbox_id"], failure.where(outbox.c.id == item_id)
                )
                await conn.execute(logged)

    async def sent_since(self, device_id: UUID, since: datetime) -> list[datetime]:
        query = select(outbox_sent.c.sent_at).where(outbox_sent.c.device_id == device_id, outbox_sent.c.sent_at > since)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def sends_for_pacing(
        self, device_ids: Sequence[UUID], hour_start: datetime, day_start: datetime
    ) -> dict[UUID, tuple[list[datetime], int]]:
        """Per device asked for: its sends after `hour_start` (what the hourly cap and the gap look at), and how
        many it made since `day_start` (the daily cap): counted, not loaded, as that can be a day of sends."""
        found: dict[UUID, tuple[list[datetime], int]] = {device_id: ([], 0) for device_id in device_ids}
        if not found:
            return found
        asked = outbox_sent.c.device_id.in_(list(found))
        recent = select(outbox_sent.c.device_id, outbox_sent.c.sent_at).where(asked, outbox_sent.c.sent_at > hour_start)
        today = (
            select(outbox_sent.c.device_id, func.count())
            .where(asked, outbox_sent.c.sent_at >= day_start)
            .group_by(outbox_sent.c.device_id)
        )
        async with self._engine.connect() as conn:
            for device_id, count in await conn.execute(today):
                found[device_id] = ([], int(count))
            for device_id, sent_at in await conn.execute(recent):
                found[device_id][0].append(sent_at)
        return found

    async def opted_out_phones(self) -> set[str]:
        """Every phone that opted out (a short list next to the leads: kept in memory by the dispatchers)."""
        query = select(leads.c.phone).where(leads.c.opted_out_at.is_not(None)).distinct()
        async with self._engine.connect() as conn:
            return set((await conn.execute(query)).scalars())

    async def devices_sending(self, source_id: UUID) -> list[UUID]:
        """Devices with a message of this source claimed `sending` (a paced one waiting out its gap, say)."""
        query = (  # through the due rows (a claimed row keeps its due row), not every row of the source
            select(outbox.c.device_id)
            .join(outbox_due, outbox_due.c.id == outbox.c.id)
            .where(outbox_due.c.source_id == source_id, outbox.c.status == OutboxStatus.SENDING.value)
            .distinct()
        )
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def campaign_status(self, campaign_id: UUID) -> CampaignStatus | None:
        """The campaign's status (None: deleted)."""
        async with self._engine.connect() as conn:
            status = (await conn.execute(select(campaigns.c.status).where(campaigns.c.id == campaign_id))).scalar()
        return None if status is None else CampaignStatus(status)

    async def is_opted_out(self, phone: str) -> bool:
        query = select(leads.c.id).where(leads.c.phone == phone, leads.c.opted_out_at.is_not(None)).limit(1)
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def cancel_for_recipient(self, recipient: str, reason: str, now: datetime) -> int:
        """Cancel every message still waiting for `recipient` (they opted out)."""
        of_recipient = outbox.c.recipient == recipient
        stmt = (
            update(outbox)
            .where(of_recipient, outbox.c.status == OutboxStatus.QUEUED.value)
            .values(status=OutboxStatus.CANCELLED.value, last_error=reason, updated_at=now)
        )
        async with self._engine.begin() as conn:
            cancelled = int((await conn.execute(stmt)).rowcount or 0)
            await conn.execute(_settled_leave(of_recipient))
        return cancelled

    async def cancel_source(self, source_id: UUID, reason: str, now: datetime) -> int:
        stmt = (
            update(outbox)
            .where(outbox.c.source_id == source_id, outbox.c.status == OutboxStatus.QUEUED.value)
            .values(status=OutboxStatus.CANCELLED.value, last_error=reason, updated_at=now)
        )
        async with self._engine.begin() as conn:
            cancelled = int((await conn.execute(stmt)).rowcount or 0)
            await conn.execute(_settled_leave(outbox.c.source_id == source_id, outbox_due.c.source_id == source_id))
        return cancelled

    async def retry_failed(self, source_id: UUID, device_id: UUID | None, now: datetime) -> int:
        """Failed messages of a source back to the queue (same message ids), due now."""
        of_source = outbox.c.source_id == source_id
        if device_id is not None:
            of_source = of_source & (outbox.c.device_id == device_id)
        stmt = (
            update(outbox)
            .where(of_source, outbox.c.status == OutboxStatus.FAILED.value)
            .values(status=OutboxStatus.QUEUED.value, attempts=0, scheduled_at=now, updated_at=now)
        )
        async with self._engine.begin() as conn:
            retried = int((await conn.execute(stmt)).rowcount or 0)
            if retried:
                await conn.execute(_due_again(of_source))
        return retried

    # --- reports (the only source of every number shown for sending) --------------------------------------

    async def tally(self, source_id: UUID) -> Tally:
        query = select(*tally_columns()).where(outbox.c.source_id == source_id)
        async with self._engine.connect() as conn:
            return tally_from((await conn.execute(query)).one())

    async def tally_many(self, source_ids: Sequence[UUID]) -> dict[UUID, Tally]:
        if not source_ids:
            return {}
        query = (
            select(outbox.c.source_id, *tally_columns())
            .where(outbox.c.source_id.in_(list(source_ids)))
            .group_by(outbox.c.source_id)
        )
        async with self._engine.connect() as conn:
            found = {row.source_id: tally_from(row) for row in await conn.execute(query)}
        return {sid: found.get(sid, Tally(0, 0, 0, 0)) for sid in source_ids}

    async def tally_by_device(self, source_id: UUID) -> list[tuple[UUID, str, str | None, Tally]]:
        query = (
            select(outbox.c.device_id, devices.c.name, devices.c.jid, *tally_columns())
            .join(devices, devices.c.id == outbox.c.device_id)
            .where(outbox.c.source_id == source_id)
            .group_by(outbox.c.device_id, devices.c.name, devices.c.jid)
            .order_by(devices.c.name)
        )
        async with self._engine.connect() as conn:
            return [(r.device_id, r.name, r.jid, tally_from(r)) for r in await conn.execute(query)]

    async def recipients(
        self,
        source_id: UUID,
        *,
        status: OutboxStatus | None,
        device_id: UUID | None,
        limit: int,
        after: tuple[datetime, UUID] | None,
    ) -> list[dict[str, Any]]:
        query = (
            select(
                outbox.c.id,
                outbox.c.device_id,
                outbox.c.lead_id,
                outbox.c.recipient,
                leads.c.name.label("lead_name"),
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.last_error,
                outbox.c.wa_message_id,
                outbox.c.scheduled_at,
                outbox.c.sent_at,
                outbox.c.created_at,
            )
            .outerjoin(leads, leads.c.id == outbox.c.lead_id)
            .where(outbox.c.source_id == source_id)
            .order_by(outbox.c.created_at, outbox.c.id)
            .limit(limit)
        )
        if status is not None:
            query = query.where(outbox.c.status == status.value)
        if device_id is not None:
            query = query.where(outbox.c.device_id == device_id)
        if after is not None:
            at, last = after
            query = query.where((outbox.c.created_at > at) | ((outbox.c.created_at == at) & (outbox.c.id > last)))
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def queue_overview(self, device_ids: Sequence[UUID] | None, now: datetime) -> dict[UUID, dict[str, Any]]:
        """Per device: queued, sending, sent in the last hour, and when the next queued message is due (not
        counting messages of paused or cancelled campaigns: they wait for a resume)."""
        status = outbox.c.status
        queued = status == OutboxStatus.QUEUED.value
        sendable = queued & _not_held()
        waiting = (
            select(
                outbox_due.c.device_id,
                func.sum(case((queued, 1), else_=0)).label("queued"),
                func.sum(case((status == OutboxStatus.SENDING.value, 1), else_=0)).label("sending"),
                func.min(case((sendable, outbox_due.c.scheduled_at), else_=None)).label("next_due"),
            )
            .join(outbox, outbox.c.id == outbox_due.c.id)
            .group_by(outbox_due.c.device_id)
        )
        sent = (
            select(outbox_sent.c.device_id, func.count().label("sent_last_hour"))
            .where(outbox_sent.c.sent_at > now - timedelta(hours=1))
            .group_by(outbox_sent.c.device_id)
        )
        if device_ids is not None:
            waiting = waiting.where(outbox_due.c.device_id.in_(list(device_ids)))
            sent = sent.where(outbox_sent.c.device_id.in_(list(device_ids)))
        overview: dict[UUID, dict[str, Any]] = {}

        def entry(device_id: UUID) -> dict[str, Any]:
            return overview.setdefault(device_id, {"queued": 0, "sending": 0, "sent_last_hour": 0, "next_due": None})

        async with self._engine.connect() as conn:
            for r in await conn.execute(waiting):
                entry(r.device_id).update(queued=int(r.queued or 0), sending=int(r.sending or 0), next_due=r.next_due)
            for r in await conn.execute(sent):
                entry(r.device_id)["sent_last_hour"] = int(r.sent_last_hour)
        return overview

    # --- lead distribution: the record a distributor weighs, and the report it leaves ---------------------

    async def device_history(self, device_ids: Sequence[UUID], since: datetime) -> dict[UUID, dict[str, int]]:
        """Per device since `since`: messages `sent` and `failed`, and `replied`: recipients of a message it sent
        in that time who wrote to the same device afterwards. Every device asked for has an entry."""
        history = {device_id: {"sent": 0, "failed": 0, "replied": 0} for device_id in device_ids}
        if not history:
            return history
        asked = list(history)
        sends = (outbox_sent.c.device_id.in_(asked)) & (outbox_sent.c.sent_at >= since)
        sent = select(outbox_sent.c.device_id, func.count().label("n")).where(sends).group_by(outbox_sent.c.device_id)
        failed = (  # rows failing since, and failed still (not retried meanwhile)
            select(outbox_failed.c.device_id, func.count(distinct(outbox_failed.c.outbox_id)).label("n"))
            .join(outbox, outbox.c.id == outbox_failed.c.outbox_id)
            .where(
                outbox_failed.c.device_id.in_(asked),
                outbox_failed.c.failed_at >= since,
                outbox.c.status == OutboxStatus.FAILED.value,
            )
            .group_by(outbox_failed.c.device_id)
        )
        reply = (
            select(messages.c.wa_message_id)
            .where(
                messages.c.device_id == outbox_sent.c.device_id,
                messages.c.chat_jid == outbox.c.recipient + "@s.whatsapp.net",
                messages.c.from_me.is_(False),
                messages.c.sent_at > outbox_sent.c.sent_at,
            )
            .exists()
        )
        replied = (
            select(outbox_sent.c.device_id, func.count(distinct(outbox.c.recipient)).label("n"))
            .join(outbox, outbox.c.id == outbox_sent.c.outbox_id)
            .where(sends, reply)
            .group_by(outbox_sent.c.device_id)
        )
        async with self._engine.connect() as conn:
            for key, query in (("sent", sent), ("failed", failed), ("replied", replied)):
                for row in await conn.execute(query):
                    history[row.device_id][key] = int(row.n)
        return history

    async def distribution_report(self, campaign_id: UUID, plugin: str) -> dict[str, Any] | None:
        query = select(distribution_reports.c.report).where(
            distribution_reports.c.campaign_id == campaign_id, distribution_reports.c.plugin == plugin
        )
        async with self._engine.connect() as conn:
            report = (await conn.execute(query)).scalar_one_or_none()
        return dict(report) if report is not None else None

    async def save_distribution_report(
        self, campaign_id: UUID, plugin: str, report: dict[str, Any], now: datetime
    ) -> None:
        """Store (replace) `plugin`'s report on how it distributed the campaign's leads."""
        key = [distribution_reports.c.campaign_id, distribution_reports.c.plugin]
        async with self._engine.begin() as conn:
            stmt = insert_for(conn, distribution_reports).values(
                campaign_id=campaign_id, plugin=plugin, report=report, updated_at=now
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=key, set_={"report": stmt.excluded.report, "updated_at": stmt.excluded.updated_at}
                )
            )

    async def by_source_key(self, source_key: str) -> OutboxItem | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(outbox).where(outbox.c.source_key == source_key))).mappings().first()
        return item_from_row(row) if row else None
