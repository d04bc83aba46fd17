"""Delivery and read receipts, stored in batches.

WhatsApp sends one receipt per message; a broadcast means thousands per minute. They are collected for a moment
and stored with one statement per status. A receipt can overtake the storing of its message (sends are recorded
after their batch): those wait and are tried again for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

from wamd_server.domain.events import Receipt, ReceiptType

log = logging.getLogger(__name__)

Key = tuple[UUID, str]  # device, message id


class StatusStore(Protocol):
    async def mark_status(self, keys: list[Key], status: str) -> set[Key]: ...


Announce = Callable[[list[Receipt]], Awaitable[None]]


class ReceiptBatcher:
    def __init__(
        self, store: StatusStore, announce: Announce, *, flush_s: float = 0.25, keep_unmatched_s: float = 30.0
    ) -> None:
        self._store = store
        self._announce = announce
        self._flush_s = flush_s
        self._keep_s = keep_unmatched_s
        # status -> key -> (chat, first seen); a later status of the same message replaces nothing: both apply.
        self._pending: dict[ReceiptType, dict[Key, tuple[str, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, receipt: Receipt) -> None:
        bucket = self._pending.setdefault(receipt.type, {})
        now = time.monotonic()
        for wa_id in receipt.message_ids:
            bucket.setdefault((receipt.device_id, wa_id), (receipt.chat_jid, now))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="receipt-batcher")

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("storing receipts failed; trying again")

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        announced: list[Receipt] = []
        # Delivered before read before played, so a message's status only moves forward.
        kinds = (ReceiptType.DELIVERED, ReceiptType.READ, ReceiptType.PLAYED)
        for i, kind in enumerate(kinds):
            bucket = pending.get(kind)
            if not bucket:
                continue
            try:
                found = await self._store.mark_status(list(bucket), kind.value)
            except BaseException:
                # Not stored: this bucket and the ones after it wait for the next flush (with what arrived
                # meanwhile), instead of being dropped.
                for later in kinds[i:]:
                    for key, value in pending.get(later, {}).items():
                        self._pending.setdefault(later, {}).setdefault(key, value)
                raise
            by_chat: dict[tuple[UUID, str], list[str]] = {}
            for key, (chat, seen) in bucket.items():
                if key in found:
                    by_chat.setdefault((key[0], chat), []).append(key[1])
                elif now - seen < self._keep_s:
                    self._pending.setdefault(kind, {})[key] = (chat, seen)
            at = datetime.now(UTC)
            announced += [Receipt(device, chat, tuple(ids), kind, at) for (device, chat), ids in by_chat.items()]
        if announced:
            await self._announce(announced)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
