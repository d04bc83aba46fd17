"""Where a dispatcher batch's results go: written as they come for rows claimed `sending`, or kept by a locked
batch (`infra/db/locked_batch.py`) and written when it ends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol
from uuid import UUID

from wamd_server.domain.models import Device, InboundMessage, OutboxItem
from wamd_server.domain.ports import Sent


class ResultStore(Protocol):
    """The outbox writes that settle claimed rows."""

    async def record_sent(self, device_id: UUID, sent: list[Sent], history: list[InboundMessage]) -> None: ...

    async def mark_failed(self, item_id: UUID, error: str, now: datetime) -> None: ...

    async def mark_cancelled(self, item_id: UUID, reason: str, now: datetime) -> None: ...

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None: ...

    async def release(self, item_ids: Iterable[UUID], now: datetime) -> None: ...


class Results(Protocol):
    """Where the results of a batch's attempts go: written at once (claimed rows) or when a locked batch ends."""

    # The chat history of the sends is stored a moment after they are recorded, from their outbox rows (see
    # `services/history.py`): `sent` takes no history messages.
    history_later: bool

    async def cancelled(self, item_id: UUID, reason: str, now: datetime) -> None: ...

    async def failed(self, item_id: UUID, error: str, now: datetime) -> None: ...

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None: ...

    async def release(self, item_ids: Iterable[UUID], now: datetime) -> None: ...

    async def sent(self, sent: Sequence[Sent], history: Sequence[InboundMessage]) -> None: ...

    def expired(self) -> bool:
        """The batch has been open long enough: leave its remaining rows to the next one."""
        ...


class LockedRows(Results, Protocol):
    items: list[OutboxItem]
    device: Device | None  # as read when the batch began; None: the device is gone
    next_due: datetime | None  # set when the batch has ended


class LockedBatchSource(Protocol):
    def batch(self, device_id: UUID, now: datetime, limit: int) -> AbstractAsyncContextManager[LockedRows]: ...


class ClaimedResults:
    """Results of rows claimed `sending`, written as they come."""

    history_later = False

    def __init__(self, outbox: ResultStore, device_id: UUID) -> None:
        self._outbox = outbox
        self._device_id = device_id

    async def cancelled(self, item_id: UUID, reason: str, now: datetime) -> None:
        await self._outbox.mark_cancelled(item_id, reason, now)

    async def failed(self, item_id: UUID, error: str, now: datetime) -> None:
        await self._outbox.mark_failed(item_id, error, now)

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None:
        await self._outbox.retry_later(item_id, at, error, now)

    async def release(self, item_ids: Iterable[UUID], now: datetime) -> None:
        await self._outbox.release(item_ids, now)

    async def sent(self, sent: Sequence[Sent], history: Sequence[InboundMessage]) -> None:
        if sent:
            await self._outbox.record_sent(self._device_id, list(sent), list(history))

    def expired(self) -> bool:
        return False
