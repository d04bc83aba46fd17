"""Chats of a device, WhatsApp-Web style: the chat list, a chat's messages, manual sends and reading.

A manual send is one more producer of the outbox (source `manual`): it goes out through the same dispatcher,
right away (no gap of its own) but within the device's caps, and a repeated request with the same `client_id`
never sends twice.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.errors import InvalidInput, NotFound
from wamd_server.domain.ids import USER_SERVER, phone_of
from wamd_server.domain.models import Device, SourceKind, User
from wamd_server.domain.ports import BusEvent, Clock, DeviceRepository, EventBus
from wamd_server.protocol.events import OUTBOX_QUEUED
from wamd_server.services.devices import scope_of
from wamd_server.services.send_first import SendFirstBounds, due_first

MAX_TEXT = 4096


class ChatStore(Protocol):
    async def chats(
        self, device_id: UUID, search: str | None, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]: ...

    async def messages(
        self, device_id: UUID, chat_jid: str, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]: ...

    async def unread_ids(self, device_id: UUID, chat_jid: str, limit: int = 500) -> list[tuple[str, str | None]]: ...

    async def mark_read(self, device_id: UUID, chat_jid: str, wa_ids: list[str]) -> None: ...


class ManualOutbox(SendFirstBounds, Protocol):
    async def enqueue(self, messages: Any, now: datetime) -> int: ...

    async def by_source_key(self, source_key: str) -> Any: ...


class ReadCommand(Protocol):
    async def mark_read(self, device_id: UUID, chat_jid: str, items: list[tuple[str, str | None]]) -> None: ...


def user_chat(chat_jid: str) -> str:
    """A one-to-one chat JID (`<phone>@s.whatsapp.net`), from a JID or a bare phone number."""
    jid = chat_jid.strip()
    if "@" not in jid:
        jid = f"{jid.lstrip('+')}@{USER_SERVER}"
    user, _, server = jid.partition("@")
    if server != USER_SERVER or not user.isdigit() or not 6 <= len(user) <= 20:
        raise InvalidInput("messages go to a person's chat: <phone>@s.whatsapp.net", {"field": "jid"})
    return jid


class ChatService:
    def __init__(
        self,
        devices: DeviceRepository,
        chats: ChatStore,
        outbox: ManualOutbox,
        new_message: Any,
        reader: ReadCommand,
        bus: EventBus,
        clock: Clock,
    ) -> None:
        self._devices = devices
        self._chats = chats
        self._outbox = outbox
        self._new_message = new_message
        self._reader = reader
        self._bus = bus
        self._clock = clock

    async def _device(self, user: User, device_id: UUID) -> Device:
        device = await self._devices.get(device_id, scope_of(user))
        if device is None:
            raise NotFound("device not found")
        return device

    async def chats(
        self, user: User, device_id: UUID, search: str | None, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]:
        await self._device(user, device_id)
        return await self._chats.chats(device_id, search, limit, before)

    async def messages(
        self, user: User, device_id: UUID, chat_jid: str, limit: int, before: datetime | None
    ) -> list[dict[str, Any]]:
        await self._device(user, device_id)
        return await self._chats.messages(device_id, chat_jid, limit, before)

    async def send(
        self,
        user: User,
        device_id: UUID,
        chat_jid: str,
        text: str,
        client_id: str | None,
        media_id: UUID | None = None,
    ) -> dict[str, Any]:
        device = await self._device(user, device_id)
        jid = user_chat(chat_jid)
        if not text.strip() and media_id is None:
            raise InvalidInput("a message needs text or an image", {"field": "text"})
        if len(text) > MAX_TEXT:
            raise InvalidInput(f"text is limited to {MAX_TEXT} characters", {"field": "text"})
        key = f"manual:{device.id}:{client_id or uuid.uuid4().hex}"
        now = self._clock.now()
        message = self._new_message(
            device_id=device.id,
            recipient=phone_of(jid),
            text=text,
            source_kind=SourceKind.MANUAL,
            source_key=key,
            scheduled_at=await due_first(self._outbox, device.id, now),  # before the broadcast messages waiting
            user_id=user.id,
            media_id=media_id,
            min_delay_s=0.0,
            max_delay_s=0.0,
        )
        await self._outbox.enqueue([message], now)
        item = await self._outbox.by_source_key(key)
        await self._bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": [str(device.id)]}))
        return {"id": str(item.id), "wa_message_id": item.wa_message_id, "status": item.status.value}

    async def read(self, user: User, device_id: UUID, chat_jid: str) -> int:
        """Mark a chat read here and send read receipts for its unread messages."""
        await self._device(user, device_id)
        unread = await self._chats.unread_ids(device_id, chat_jid)
        if unread:
            await self._reader.mark_read(device_id, chat_jid, unread)
        await self._chats.mark_read(device_id, chat_jid, [wa_id for wa_id, _ in unread])
        return len(unread)
