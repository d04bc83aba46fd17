"""Reading chat history: the chat list of a device and the messages of a chat (newest first)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.infra.db.tables import chats, messages


class SqlChatRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def chats(
        self, device_id: UUID, search: str | None, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]:
        query = (
            select(chats)
            .where(chats.c.device_id == device_id, chats.c.last_message_at.is_not(None))
            .order_by(chats.c.last_message_at.desc(), chats.c.jid)
            .limit(limit)
        )
        if before is not None:
            query = query.where(chats.c.last_message_at < before)
        if search:
            pattern = f"%{search.lower()}%"
            query = query.where(
                or_(
                    func.lower(chats.c.name).like(pattern),
                    chats.c.jid.like(pattern),
                    func.lower(chats.c.last_message_text).like(pattern),
                )
            )
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def messages(
        self, device_id: UUID, chat_jid: str, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]:
        query = (
            select(messages)
            .where(messages.c.device_id == device_id, messages.c.chat_jid == chat_jid)
            .order_by(messages.c.sent_at.desc(), messages.c.wa_message_id)
            .limit(limit)
        )
        if before is not None:
            query = query.where(messages.c.sent_at < before)
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def unread_ids(self, device_id: UUID, chat_jid: str, limit: int = 500) -> list[tuple[str, str | None]]:
        """Incoming messages of the chat not yet read here, newest first: (message id, sender JID)."""
        query = (
            select(messages.c.wa_message_id, messages.c.sender_jid)
            .where(
                messages.c.device_id == device_id,
                messages.c.chat_jid == chat_jid,
                messages.c.from_me.is_(False),
                messages.c.status.is_(None),
            )
            .order_by(messages.c.sent_at.desc())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [(r.wa_message_id, r.sender_jid) for r in await conn.execute(query)]

    async def mark_read(self, device_id: UUID, chat_jid: str, wa_ids: list[str]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(chats).where(chats.c.device_id == device_id, chats.c.jid == chat_jid).values(unread_count=0)
            )
            if wa_ids:
                await conn.execute(
                    update(messages)
                    .where(
                        messages.c.device_id == device_id,
                        messages.c.wa_message_id.in_(wa_ids),
                        messages.c.from_me.is_(False),
                    )
                    .values(status="read")
                )
