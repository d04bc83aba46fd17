"""Chat history: messages and the chat list, written together so the list never disagrees with history."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import case, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.domain.models import InboundMessage
from wamd_server.infra.db.tables import chats, messages
from wamd_server.infra.db.upsert import insert_for

PREVIEW_CHARS = 200
# Receipts only move a message forward; a late "delivered" never overwrites "read".
STATUS_ORDER = ("sent", "delivered", "read", "played")


class SqlMessageRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def store_inbound(self, device_id: UUID, message: InboundMessage) -> bool:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            stmt = (
                insert_for(conn, messages)
                .values(
                    id=uuid.uuid4(),
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
                .returning(messages.c.id)
            )
            # A row comes back only when the message is new (rowcount is not reliable for this on every driver).
            if (await conn.execute(stmt)).first() is None:
                return False
            unread = 0 if message.from_me else 1
            preview = message.text[:PREVIEW_CHARS] or (f"[{message.media_type}]" if message.media_type else "")
            chat = insert_for(conn, chats).values(
                id=uuid.uuid4(),
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

    async def mark_status(self, keys: Sequence[tuple[UUID, str]], status: str) -> set[tuple[UUID, str]]:
        """Move our sent messages (device, message id) to `status` if that is later than theirs; returns the keys
        of the messages found (a receipt can arrive before its message is stored)."""
        if status not in STATUS_ORDER or not keys:
            return set()
        earlier = STATUS_ORDER[: STATUS_ORDER.index(status)]
        stmt = (
            update(messages)
            .where(tuple_(messages.c.device_id, messages.c.wa_message_id).in_(list(keys)), messages.c.from_me)
            .values(status=case((messages.c.status.in_(earlier), status), else_=messages.c.status))
            .returning(messages.c.device_id, messages.c.wa_message_id)
        )
        async with self._engine.begin() as conn:
            return {(r.device_id, r.wa_message_id) for r in await conn.execute(stmt)}

    async def store_sent(self, device_id: UUID, sent: list[InboundMessage]) -> None:
        """Our own sends join the chat history (one statement per table for the whole batch)."""
        if not sent:
            return
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            rows = [
                {
                    "id": uuid.uuid4(),
                    "device_id": device_id,
                    "chat_jid": m.chat_jid,
                    "wa_message_id": m.wa_id,
                    "from_me": True,
                    "sender_jid": m.sender_jid or None,
                    "text": m.text,
                    "media_type": m.media_type,
                    "status": "sent",
                    "sent_at": m.timestamp,
                    "created_at": now,
                }
                for m in sent
            ]
            await conn.execute(
                insert_for(conn, messages).on_conflict_do_nothing(
                    index_elements=[messages.c.device_id, messages.c.wa_message_id]
                ),
                rows,
            )
            latest: dict[str, InboundMessage] = {}
            for m in sent:
                if m.chat_jid not in latest or m.timestamp >= latest[m.chat_jid].timestamp:
                    latest[m.chat_jid] = m
            chat_rows = [
                {
                    "id": uuid.uuid4(),
                    "device_id": device_id,
                    "jid": m.chat_jid,
                    "is_group": False,
                    "last_message_at": m.timestamp,
                    "last_message_text": (m.text[:PREVIEW_CHARS] or ("[image]" if m.media_type else "")),
                    "unread_count": 0,
                    "created_at": now,
                }
                for m in latest.values()
            ]
            chat = insert_for(conn, chats)
            newer = chat.excluded.last_message_at >= chats.c.last_message_at
            await conn.execute(
                chat.on_conflict_do_update(
                    index_elements=[chats.c.device_id, chats.c.jid],
                    set_={
                        "last_message_at": case((newer, chat.excluded.last_message_at), else_=chats.c.last_message_at),
                        "last_message_text": case(
                            (newer, chat.excluded.last_message_text), else_=chats.c.last_message_text
                        ),
                    },
                ),
                chat_rows,
            )
