"""Bus events about devices and messages, built from domain objects with the protocol's payload models."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from wamd_server.domain.events import Receipt
from wamd_server.domain.models import Device, InboundMessage
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import events as ev


def status_event(device: Device, at: datetime) -> BusEvent:
    payload = ev.DeviceStatusEvent(
        device_id=str(device.id),
        status=device.status.value,
        reason=device.status_reason,
        phone=device.phone,
        jid=device.jid,
        last_seen_at=device.last_seen_at,
    )
    return BusEvent(ev.DEVICE_STATUS, payload.model_dump(mode="json"), device_id=device.id, at=at)


def qr_event(device_id: UUID, code: str, expires_at: datetime, at: datetime) -> BusEvent:
    payload = ev.DeviceQrEvent(device_id=str(device_id), code=code, expires_at=expires_at)
    return BusEvent(ev.DEVICE_QR, payload.model_dump(mode="json"), device_id=device_id, at=at)


def paired_event(device_id: UUID, phone: str, jid: str, at: datetime) -> BusEvent:
    payload = ev.DevicePairedEvent(device_id=str(device_id), phone=phone, jid=jid)
    return BusEvent(ev.DEVICE_PAIRED, payload.model_dump(mode="json"), device_id=device_id, at=at)


def logged_out_event(device: Device, reason: str, at: datetime) -> BusEvent:
    payload = ev.DeviceLoggedOutEvent(device_id=str(device.id), reason=reason, phone=device.phone, jid=device.jid)
    return BusEvent(ev.DEVICE_LOGGED_OUT, payload.model_dump(mode="json"), device_id=device.id, at=at)


def message_events(device_id: UUID, message: InboundMessage, at: datetime) -> list[BusEvent]:
    out = ev.MessageOut(
        wa_id=message.wa_id,
        chat_jid=message.chat_jid,
        from_me=message.from_me,
        sender_jid=message.sender_jid,
        sender_phone=message.sender_phone,
        push_name=message.push_name,
        text=message.text,
        media_type=message.media_type,
        is_group=message.is_group,
        timestamp=message.timestamp,
    )
    new = ev.MessageNewEvent(device_id=str(device_id), chat_jid=message.chat_jid, message=out)
    return [
        BusEvent(ev.MESSAGE_NEW, new.model_dump(mode="json"), device_id=device_id, at=at),
        chat_updated_event(device_id, message.chat_jid, at),
    ]


def chat_updated_event(device_id: UUID, chat_jid: str, at: datetime) -> BusEvent:
    chat = ev.ChatUpdatedEvent(device_id=str(device_id), chat_jid=chat_jid)
    return BusEvent(ev.CHAT_UPDATED, chat.model_dump(mode="json"), device_id=device_id, at=at)


def message_status_event(receipt: Receipt, at: datetime) -> BusEvent:
    payload = ev.MessageStatusEvent(
        device_id=str(receipt.device_id),
        chat_jid=receipt.chat_jid,
        wa_ids=list(receipt.message_ids),
        status=receipt.type.value,
    )
    return BusEvent(ev.MESSAGE_STATUS, payload.model_dump(mode="json"), device_id=receipt.device_id, at=at)
