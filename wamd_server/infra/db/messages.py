"""Chat history: messages and the chat list, written together so the list never disagrees with history."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import case, update
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

    async def mark_status(self, device_id: UUID, wa_ids: Sequence[str], status: str) -> int:
        if status not in STATUS_ORDER or not wa_ids:
            return 0
        earlier = STATUS_ORDER[: STATUS_ORDER.index(status)]
        stmt = (
            update(messages)
            .where(
                messages.c.device_id == device_id,
                messages.c.wa_message_id.in_(list(wa_ids)),
                messages.c.from_me,
                messages.c.status.in_(earlier),
            )
            .values(status=status)
        )
        async with self._engine.begin() as conn:
            return int((await conn.execute(stmt)).rowcount or 0)
