"""Messages that go before the device's waiting ones: a reply typed in a chat (and a plugin's unpaced reply)
must not wait behind a broadcast's hundreds of due messages. The claim takes due rows in (due time, enqueue
order), so such a message is made due a moment before the device's first waiting message."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID

_MOMENT = timedelta(microseconds=1)


class NextDue(Protocol):
    async def next_due(self, device_id: UUID) -> datetime | None: ...


async def due_first(outbox: NextDue, device_id: UUID, now: datetime) -> datetime:
    """`now`, or just before the device's earliest queued message when that is due already."""
    first = await outbox.next_due(device_id)
    return now if first is None or first > now else first - _MOMENT
