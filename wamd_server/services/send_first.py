"""Messages that go before the device's waiting ones: a reply typed in a chat (and a plugin's unpaced reply)
must not wait behind a broadcast's hundreds of due messages. The claim takes due rows in (due time, enqueue
order), so such a message is made due a moment before the device's first waiting campaign or sequence message,
and not before the messages typed earlier that still wait (they keep their order)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID

_MOMENT = timedelta(microseconds=1)


class SendFirstBounds(Protocol):
    async def send_first_bounds(self, device_id: UUID, now: datetime) -> tuple[datetime | None, datetime | None]: ...


async def due_first(outbox: SendFirstBounds, device_id: UUID, now: datetime) -> datetime:
    """`now`, or just before the device's earliest due campaign or sequence message, but not before a message
    to send first that waits already (a tie keeps the enqueue order)."""
    first_bulk, last_first = await outbox.send_first_bounds(device_id, now)
    at = now if first_bulk is None else min(now, first_bulk - _MOMENT)
    return at if last_first is None else max(at, last_first)
