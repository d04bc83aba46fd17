"""Chat history: messages and the chat list, written together so the list never disagrees with history."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import case, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wamd_server.domain.ids import USER_SERVER
from wamd_server.domain.models import InboundMessage
from wamd_server.domain.ports import HistorySend
from wamd_server.infra.db.engine import driver_connection, is_postgres
from wamd_server.infra.db.tables import chats, devices, messages, outbox
from wamd_server.infra.db.upsert import insert_for

PREVIEW_CHARS = 200
# Receipts only move a message forward; a late "delivered" never overwrites "read".
STATUS_ORDER = ("sent", "delivered", "read", "played")
# Receipts per statement: a broadcast's receipts arrive by the thousand. SQLite allows 32766 parameters (2 a key);
# on Postgres the keys travel as two arrays (a row-value IN list of that size exceeded its stack depth: the
# receipts of a whole broadcast flush were lost).
RECEIPT_CHUNK_SQLITE = 2000
RECEIPT_CHUNK_PG = 10_000

# Postgres: the keys as two arrays joined to the table (one index lookup each). Only messages whose status is
# earlier are written; every message found is returned, moved or not (the batcher stops waiting for those), as
# its position in the arrays (an integer is cheaper to read back than a uuid and a string). Only the keys the
# update did not move are looked up a second time (most receipts move their message: one lookup, not two).
# Arrays go as `%b`, psycopg's binary format: several times cheaper to build than array literals in text.
_MARK_STATUS_PG = """
WITH k AS (
    SELECT * FROM unnest(%(devices)b::uuid[], %(ids)b::text[]) WITH ORDINALITY AS k(device_id, wa_message_id, n)
),
moved AS (
    UPDATE messages m SET status = %(status)s FROM k
    WHERE m.device_id = k.device_id AND m.wa_message_id = k.wa_message_id AND m.from_me
      AND m.status = ANY(%(earlier)s::text[])
    RETURNING k.n
)
SELECT n FROM moved
UNION ALL
SELECT k.n FROM k
JOIN messages m ON m.device_id = k.device_id AND m.wa_message_id = k.wa_message_id
WHERE m.from_me AND NOT EXISTS (SELECT 1 FROM moved WHERE moved.n = k.n)
"""

# Postgres: a batch of our own sends as two data-modifying CTEs, one per table, each taking the batch as arrays
# (instead of one statement per row); the outbox runs them in the statement that marks a claimed batch sent (and
# when a lane adds sends missing from the history). A message goes in with the status of the receipts that
# overtook it (`InboundMessage.status`); one stored already only moves forward. Sends of a device deleted meanwhile
# are skipped, and rows go in key order, so two such statements over the same rows cannot deadlock.
SENT_HISTORY_CTES_PG = """
history AS (
    INSERT INTO messages (device_id, chat_jid, wa_message_id, from_me, sender_jid, text, media_type, status,
                          sent_at, created_at)
    SELECT m.device_id, m.chat_jid, m.wa_message_id, true, m.sender_jid, m.text, m.media_type, m.status, m.sent_at,
           %(h_now)s
    FROM unnest(%(h_devices)b::uuid[], %(h_chats)b::text[], %(h_wa_ids)b::text[], %(h_senders)b::text[],
                %(h_texts)b::text[], %(h_media)b::text[], %(h_times)b::timestamptz[], %(h_status)b::text[])
         AS m(device_id, chat_jid, wa_message_id, sender_jid, text, media_type, sent_at, status)
    WHERE EXISTS (SELECT 1 FROM devices WHERE devices.id = m.device_id)
    ON CONFLICT (device_id, wa_message_id) DO UPDATE SET status = excluded.status
    WHERE array_position(%(h_order)s::text[], excluded.status)
          > coalesce(array_position(%(h_order)s::text[], messages.status), 0)
),
chat AS (
    INSERT INTO chats AS c (device_id, jid, is_group, last_message_at, last_message_text, unread_count,
                            created_at)
    SELECT n.device_id, n.jid, false, n.at, n.preview, 0, %(h_now)s
    FROM unnest(%(c_devices)b::uuid[], %(c_jids)b::text[], %(c_times)b::timestamptz[], %(c_previews)b::text[])
         AS n(device_id, jid, at, preview)
    WHERE EXISTS (SELECT 1 FROM devices WHERE devices.id = n.device_id)
    ON CONFLICT (device_id, jid) DO UPDATE SET
        last_message_at = CASE WHEN excluded.last_message_at >= c.last_message_at
                               THEN excluded.last_message_at ELSE c.last_message_at END,
        last_message_text = CASE WHEN excluded.last_message_at >= c.last_message_at
                                 THEN excluded.last_message_text ELSE c.last_message_text END
)
"""
# Postgres: the history writer's sends (`services/history.py`), each message read from its outbox row: only the
# row ids travel, with the statuses their receipts brought and the texts plugins changed (NULL: the row's). Rows
# gone meanwhile (their device deleted), or not `sent` (never expected: they are handed over once committed so),
# are skipped. The same order and rules as `SENT_HISTORY_CTES_PG`;
# "C" collation orders message ids and chats as Python sorts them (`_key_order`), the order receipts lock rows in.
# Each row is looked up by its key (`LATERAL … OFFSET 0` keeps the planner from joining otherwise): statistics
# taken while a broadcast was queued say no row is `sent`, and the planner scanned the whole outbox once per id
# given (minutes for one flush; no index holds `status` to correct it).
HISTORY_FROM_OUTBOX_PG = """
WITH sent AS (
    SELECT DISTINCT ON (o.device_id, o.wa_message_id COLLATE "C")
           o.device_id, o.recipient || %(at_server)s AS chat_jid, o.wa_message_id, coalesce(k.text, o.text) AS text,
           CASE WHEN o.media_id IS NULL THEN NULL ELSE 'image' END AS media_type,
           coalesce(o.server_ts, o.sent_at) AS sent_at, coalesce(k.status, 'sent') AS status
    FROM unnest(%(ids)b::uuid[], %(texts)b::text[], %(statuses)b::text[]) AS k(id, text, status)
    CROSS JOIN LATERAL (
        SELECT device_id, recipient, wa_message_id, text, media_id, server_ts, sent_at FROM outbox
        WHERE outbox.id = k.id AND outbox.status = 'sent'
        OFFSET 0
    ) AS o
    ORDER BY o.device_id, o.wa_message_id COLLATE "C",
             array_position(%(order)s::text[], coalesce(k.status, 'sent')) DESC
),
history AS (
    INSERT INTO messages (device_id, chat_jid, wa_message_id, from_me, sender_jid, text, media_type, status,
                          sent_at, created_at)
    SELECT device_id, chat_jid, wa_message_id, true, NULL, text, media_type, status, sent_at, %(now)s
    FROM sent
    ORDER BY device_id, wa_message_id COLLATE "C"
    ON CONFLICT (device_id, wa_message_id) DO UPDATE SET status = excluded.status
    WHERE array_position(%(order)s::text[], excluded.status)
          > coalesce(array_position(%(order)s::text[], messages.status), 0)
),
chat AS (
    INSERT INTO chats AS c (device_id, jid, is_group, last_message_at, last_message_text, unread_count,
                            created_at)
    SELECT n.device_id, n.chat_jid, false, n.sent_at,
           CASE WHEN n.text <> '' THEN left(n.text, %(preview_chars)s)
                WHEN n.media_type IS NOT NULL THEN '[image]' ELSE '' END,
           0, %(now)s
    FROM (SELECT DISTINCT ON (device_id, chat_jid COLLATE "C") * FROM sent
          ORDER BY device_id, chat_jid COLLATE "C", sent_at DESC) AS n
    ORDER BY n.device_id, n.chat_jid COLLATE "C"
    ON CONFLICT (device_id, jid) DO UPDATE SET
        last_message_at = CASE WHEN excluded.last_message_at >= c.last_message_at
                               THEN excluded.last_message_at ELSE c.last_message_at END,
        last_message_text = CASE WHEN excluded.last_message_at >= c.last_message_at
                                 THEN excluded.last_message_text ELSE c.last_message_text END
)
SELECT 1
"""
# Outbox rows read at once by the generic (SQLite) path of `store_sent`, under SQLite's parameter limit.
_ROWS_CHUNK = 500


class SqlMessageRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def store_inbound(self, device_id: UUID, message: InboundMessage) -> bool:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            stmt = (
                insert_for(conn, messages)
                .values(
                    device_id=device_id,
                    chat_jid=message.chat_jid,
                    wa_message_id=message.wa_id,
                    from_me=message.from_me,
                    sender_jid=message.sender_jid,
                    sender_phone=message.sender_phone,
                    push_name=message.push_name,
                    text=message.text,
                    media_type=message.media_type,
                    status="sent" if message.from_me else None,
                    sent_at=message.timestamp,
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=[messages.c.device_id, messages.c.wa_message_id])
                .returning(messages.c.wa_message_id)
            )
            # A row comes back only when the message is new (rowcount is not reliable for this on every driver).
            if (await conn.execute(stmt)).first() is None:
                return False
            unread = 0 if message.from_me else 1
            preview = message.text[:PREVIEW_CHARS] or (f"[{message.media_type}]" if message.media_type else "")
            chat = insert_for(conn, chats).values(
                device_id=device_id,
                jid=message.chat_jid,
                name=None if message.from_me else message.push_name,
                is_group=message.is_group,
                last_message_at=message.timestamp,
                last_message_text=preview,
                unread_count=unread,
                created_at=now,
            )
            newer = chat.excluded.last_message_at >= chats.c.last_message_at
            chat = chat.on_conflict_do_update(
                index_elements=[chats.c.device_id, chats.c.jid],
                set_={
                    # History can arrive out of order: only a newer message replaces the preview.
                    "last_message_at": case((newer, chat.excluded.last_message_at), else_=chats.c.last_message_at),
                    "last_message_text": case(
                        (newer, chat.excluded.last_message_text), else_=chats.c.last_message_text
                    ),
                    "unread_count": chats.c.unread_count + unread,
                    "name": case((chat.excluded.name.is_not(None), chat.excluded.name), else_=chats.c.name),
                },
            )
            await conn.execute(chat)
        return True

    async def store_sent(self, sends: Sequence[HistorySend]) -> None:
        """Sends of any devices, their rows committed `sent`, join the chat history, each message read from its
        outbox row (see `services/history.py`)."""
        if not sends:
            return
        if is_postgres(self._engine):
            params = {
                "ids": [s.sent.id for s in sends],
                "texts": [s.sent.edited_text for s in sends],
                "statuses": [s.status for s in sends],
                "order": list(STATUS_ORDER),
                "at_server": "@" + USER_SERVER,
                "preview_chars": PREVIEW_CHARS,
                "now": datetime.now(UTC),
            }
            async with driver_connection(self._engine) as pg:
                await pg.execute(HISTORY_FROM_OUTBOX_PG, params)
            return
        async with self._engine.begin() as conn:
            rows: dict[UUID, Any] = {}
            for start in range(0, len(sends), _ROWS_CHUNK):
                ids = [s.sent.id for s in sends[start : start + _ROWS_CHUNK]]
                found = await conn.execute(select(outbox).where(outbox.c.id.in_(ids)))
                rows.update((r.id, r) for r in found)
            await write_sent(conn, [_from_row(rows[s.sent.id], s) for s in sends if s.sent.id in rows])

    async def mark_status(self, keys: Sequence[tuple[UUID, str]], status: str) -> set[tuple[UUID, str]]:
        """Move our sent messages (device, message id) to `status` if that is later than theirs; returns the keys
        of the messages found (a receipt can arrive before its message is stored)."""
        if status not in STATUS_ORDER or not keys:
            return set()
        earlier = list(STATUS_ORDER[: STATUS_ORDER.index(status)])
        keys = sorted(keys, key=_key_order)  # the order the history statements lock rows in
        found: set[tuple[UUID, str]] = set()
        if is_postgres(self._engine):
            async with driver_connection(self._engine) as pg:
                for start in range(0, len(keys), RECEIPT_CHUNK_PG):
                    chunk = keys[start : start + RECEIPT_CHUNK_PG]
                    params = {
                        "devices": [k[0] for k in chunk],
                        "ids": [k[1] for k in chunk],
                        "status": status,
                        "earlier": earlier,
                    }
                    cursor = await pg.execute(_MARK_STATUS_PG, params)
                    found.update(chunk[n - 1] for (n,) in await cursor.fetchall())
            return found
        async with self._engine.begin() as conn:
            for start in range(0, len(keys), RECEIPT_CHUNK_SQLITE):
                stmt = (
                    update(messages)
                    .where(
                        tuple_(messages.c.device_id, messages.c.wa_message_id).in_(
                            keys[start : start + RECEIPT_CHUNK_SQLITE]
                        ),
                        messages.c.from_me,
                    )
                    .values(status=case((messages.c.status.in_(earlier), status), else_=messages.c.status))
                    .returning(messages.c.device_id, messages.c.wa_message_id)
                )
                found.update((r.device_id, r.wa_message_id) for r in await conn.execute(stmt))
        return found


def _status_rank(status: Any) -> Any:
    """A status's place in `STATUS_ORDER` (1 for sent…), 0 for none: receipts only move a message forward."""
    return case({name: rank for rank, name in enumerate(STATUS_ORDER, 1)}, value=status, else_=0)


def _key_order(key: tuple[UUID, str]) -> tuple[int, str]:
    """(device, message id or chat) as statements take rows: the same order everywhere, so they cannot deadlock
    (and cheaper to sort than by `UUID`, whose comparisons run in Python)."""
    return key[0].int, key[1]


def _distinct(sent: Sequence[tuple[UUID, InboundMessage]]) -> list[tuple[UUID, InboundMessage]]:
    """Each message once (an upsert may not touch a row twice), with the latest status it was given."""
    rank = {name: i for i, name in enumerate(STATUS_ORDER)}
    seen: dict[tuple[UUID, str], tuple[UUID, InboundMessage]] = {}
    for device_id, m in sent:
        before = seen.get((device_id, m.wa_id))
        if before is not None and rank.get(before[1].status or "sent", 0) > rank.get(m.status or "sent", 0):
            m = dataclasses.replace(m, status=before[1].status)
        seen[(device_id, m.wa_id)] = (device_id, m)
    return [seen[key] for key in sorted(seen, key=_key_order)]


def _latest_per_chat(sent: Sequence[tuple[UUID, InboundMessage]]) -> list[tuple[UUID, InboundMessage]]:
    """The newest message of each chat of each device: what its preview shows (one row per chat and statement)."""
    latest: dict[tuple[UUID, str], tuple[UUID, InboundMessage]] = {}
    for device_id, m in sent:
        key = (device_id, m.chat_jid)
        if key not in latest or m.timestamp >= latest[key][1].timestamp:
            latest[key] = (device_id, m)
    return [latest[key] for key in sorted(latest, key=_key_order)]


def _from_row(row: Any, send: HistorySend) -> tuple[UUID, InboundMessage]:
    """A send as its device's history message, from its outbox row."""
    text = row.text if send.sent.edited_text is None else send.sent.edited_text
    timestamp = row.server_ts or row.sent_at
    message = InboundMessage.own_send(
        row.wa_message_id, row.recipient, text, timestamp, row.media_id is not None, send.status
    )
    return row.device_id, message


def _preview(m: InboundMessage) -> str:
    return m.text[:PREVIEW_CHARS] or ("[image]" if m.media_type else "")


def sent_history_params(sent: Sequence[tuple[UUID, InboundMessage]]) -> dict[str, Any]:
    """The parameters of `SENT_HISTORY_CTES_PG` for sends as (device, message) pairs."""
    sent = _distinct(sent)
    latest = _latest_per_chat(sent)
    return {
        "h_now": datetime.now(UTC),
        "h_devices": [d for d, _ in sent],
        "h_chats": [m.chat_jid for _, m in sent],
        "h_wa_ids": [m.wa_id for _, m in sent],
        "h_senders": [m.sender_jid or None for _, m in sent],
        "h_texts": [m.text for _, m in sent],
        "h_media": [m.media_type for _, m in sent],
        "h_times": [m.timestamp for _, m in sent],
        "h_status": [m.status or "sent" for _, m in sent],
        "h_order": list(STATUS_ORDER),
        "c_devices": [d for d, _ in latest],
        "c_jids": [m.chat_jid for _, m in latest],
        "c_times": [m.timestamp for _, m in latest],
        "c_previews": [_preview(m) for _, m in latest],
    }


async def write_sent(conn: AsyncConnection, sent: Sequence[tuple[UUID, InboundMessage]]) -> None:
    """Our own sends (device, message) join the chat history, through SQLAlchemy (SQLite, or any dialect), inside
    the caller's transaction (one statement per table for the whole batch; Postgres uses `SENT_HISTORY_CTES_PG`)."""
    if not sent:
        return
    known = select(devices.c.id).where(devices.c.id.in_({device_id for device_id, _ in sent}))
    alive = set((await conn.execute(known)).scalars())
    sent = [pair for pair in _distinct(sent) if pair[0] in alive]  # not the sends of a device deleted meanwhile
    if not sent:
        return
    now = datetime.now(UTC)
    rows = [
        {
            "device_id": device_id,
            "chat_jid": m.chat_jid,
            "wa_message_id": m.wa_id,
            "from_me": True,
            "sender_jid": m.sender_jid or None,
            "text": m.text,
            "media_type": m.media_type,
            "status": m.status or "sent",
            "sent_at": m.timestamp,
            "created_at": now,
        }
        for device_id, m in sent
    ]
    stmt = insert_for(conn, messages)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[messages.c.device_id, messages.c.wa_message_id],
            set_={"status": stmt.excluded.status},
            where=_status_rank(stmt.excluded.status) > _status_rank(messages.c.status),
        ),
        rows,
    )
    chat_rows = [
        {
            "device_id": device_id,
            "jid": m.chat_jid,
            "is_group": False,
            "last_message_at": m.timestamp,
            "last_message_text": _preview(m),
            "unread_count": 0,
            "created_at": now,
        }
        for device_id, m in _latest_per_chat(sent)
    ]
    chat = insert_for(conn, chats)
    newer = chat.excluded.last_message_at >= chats.c.last_message_at
    await conn.execute(
        chat.on_conflict_do_update(
            index_elements=[chats.c.device_id, chats.c.jid],
            set_={
                "last_message_at": case((newer, chat.excluded.last_message_at), else_=chats.c.last_message_at),
                "last_message_text": case((newer, chat.excluded.last_message_text), else_=chats.c.last_message_text),
            },
        ),
        chat_rows,
    )
