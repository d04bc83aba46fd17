"""Delivery and read receipts, stored in batches.

WhatsApp sends one receipt per message; a broadcast means thousands per minute. They are collected for a moment
and stored with one statement per status. A receipt can overtake the storing of its message (sends are recorded
after their batch; unpaced sends' chat history a moment later, see `history.py`): the history writer takes those
(`take`) and stores the status with the message, which spares the message a second write; the others wait and
are tried again for a while. Each flush announces the chats whose messages moved (`message.status`), at most
`ANNOUNCE_PER_DEVICE` per device and `ANNOUNCE_PER_FLUSH` in all: a broadcast's receipts (a chat each, thousands a
second over all devices) are stored, not announced chat by chat to every client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

from wamd_server.domain.events import Receipt, ReceiptType

log = logging.getLogger(__name__)

Key = tuple[UUID, str]  # device, message id
ANNOUNCE_PER_DEVICE = 20
ANNOUNCE_PER_FLUSH = 200


@dataclass
class Taken:
    """Receipts taken to be stored with their messages (see `ReceiptBatcher.take`)."""

    statuses: dict[Key, str] = field(default_factory=dict)  # the latest status of each message
    receipts: dict[ReceiptType, dict[Key, tuple[str, float]]] = field(default_factory=dict)


class StatusStore(Protocol):
    async def mark_status(self, keys: list[Key], status: str) -> set[Key]: ...


Announce = Callable[[list[Receipt]], Awaitable[None]]
# Delivered before read before played, so a message's status only moves forward.
KINDS = (ReceiptType.DELIVERED, ReceiptType.READ, ReceiptType.PLAYED)


class _Announcements:
    """The chats one flush announces, within its budgets (see the module's docstring)."""

    def __init__(self, per_flush: int, per_device: int) -> None:
        self.by_chat: dict[tuple[UUID, str], list[str]] = {}
        self._left = per_flush
        self._per_device = per_device
        self._devices: dict[UUID, int] = {}

    def add(self, device_id: UUID, chat: str, wa_id: str) -> bool:
        """Announce this message's chat if the budgets allow; False once the flush's budget is spent."""
        ids = self.by_chat.get((device_id, chat))
        if ids is not None:
            ids.append(wa_id)
            return True
        if self._left <= 0:
            return False
        chats = self._devices.get(device_id, 0)
        if chats < self._per_device:
            self._devices[device_id] = chats + 1
            self._left -= 1
            self.by_chat[(device_id, chat)] = [wa_id]
        return True

    def receipts(self, kind: ReceiptType) -> list[Receipt]:
        at = datetime.now(UTC)
        receipts = [Receipt(device, chat, tuple(ids), kind, at) for (device, chat), ids in self.by_chat.items()]
        self.by_chat = {}
        return receipts


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
        # Taken and stored with their messages: announced with the next flush.
        self._taken: dict[ReceiptType, dict[Key, tuple[str, float]]] = {}
        # Messages about to be stored by someone who will take their receipts, and the receipts that came for
        # them meanwhile (status -> key -> …): those are not looked up, the taker stores them.
        self._held: set[Key] = set()
        self._parked: dict[ReceiptType, dict[Key, tuple[str, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, receipt: Receipt) -> None:
        bucket = self._pending.setdefault(receipt.type, {})
        parked = self._parked.setdefault(receipt.type, {}) if self._held else bucket
        now = time.monotonic()
        for wa_id in receipt.message_ids:
            key = (receipt.device_id, wa_id)
            (parked if key in self._held else bucket).setdefault(key, (receipt.chat_jid, now))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="receipt-batcher")

    def hold(self, keys: Iterable[Key]) -> None:
        """These messages are about to be stored by the caller, who will `take` their receipts: their receipts
        wait for that instead of being looked up in vain meanwhile. (Receipts that come before `hold`, for the
        first sends of a batch, are looked up as usual until taken.)"""
        self._held.update(keys)

    def release(self, keys: Iterable[Key]) -> None:
        """Held messages that will not be stored after all (their batch failed): their receipts are looked up as
        usual again."""
        released = set(keys) & self._held
        if not released:
            return
        self._held -= released
        for kind, parked in self._parked.items():
            for key in released & parked.keys():
                self._pending.setdefault(kind, {}).setdefault(key, parked.pop(key))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="receipt-batcher")

    def take(self, keys: Iterable[Key]) -> Taken:
        """The receipts of these messages that came before the message was stored, no longer waiting here (nor
        held): the caller stores each message with its latest status, then hands them back (`stored`)."""
        taken = Taken()
        wanted = list(keys)
        self._held.difference_update(wanted)
        for kind in KINDS:
            for bucket in (self._parked.get(kind), self._pending.get(kind)):
                if not bucket:
                    continue
                for key in wanted:
                    entry = bucket.pop(key, None)
                    if entry is not None:
                        taken.statuses[key] = kind.value  # a later kind comes later in KINDS and wins
                        taken.receipts.setdefault(kind, {}).setdefault(key, entry)
        return taken

    def stored(self, taken: Taken) -> None:
        """Taken receipts whose messages are now stored with their status: announced with the next flush."""
        for kind, entries in taken.receipts.items():
            for key, entry in entries.items():
                self._taken.setdefault(kind, {}).setdefault(key, entry)
        if self._taken and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="receipt-batcher")

    async def _run(self) -> None:
        while self._pending or self._taken:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("storing receipts failed; trying again")

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        taken, self._taken = self._taken, {}
        now = time.monotonic()
        announced: list[Receipt] = []
        announce = _Announcements(ANNOUNCE_PER_FLUSH, ANNOUNCE_PER_DEVICE)
        for i, kind in enumerate(KINDS):
            bucket = pending.get(kind, {})
            for key, (chat, _) in taken.get(kind, {}).items():
                if not announce.add(key[0], chat, key[1]):
                    break  # stored with their messages already; only their announcement is spared
            try:
                found = await self._store.mark_status(list(bucket), kind.value) if bucket else set()
            except BaseException:
                # Not stored: this bucket and the ones after it wait for the next flush (with what arrived
                # meanwhile), instead of being dropped; so do the announcements of all taken receipts (stored).
                for kind_ in KINDS:
                    for key, value in taken.get(kind_, {}).items():
                        self._taken.setdefault(kind_, {}).setdefault(key, value)
                for later in KINDS[i:]:
                    for key, value in pending.get(later, {}).items():
                        self._pending.setdefault(later, {}).setdefault(key, value)
                raise
            announcing = True
            for key, (chat, seen) in bucket.items():
                if key in found:
                    if announcing:
                        announcing = announce.add(key[0], chat, key[1])
                elif now - seen < self._keep_s:
                    self._pending.setdefault(kind, {})[key] = (chat, seen)
            announced += announce.receipts(kind)
        if announced:
            await self._announce(announced)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
