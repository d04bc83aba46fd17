"""Unpaced sends join the chat history a moment after they went out, with the receipts that came meanwhile.

A locked batch (unpaced sends on Postgres, see `infra/db/locked_batch.py`) marks its rows sent and hands their
chat-history messages here; every `flush_s` they are stored for all devices at once. Most delivery receipts of
those messages have arrived by then: the writer takes them from the receipt batcher and stores each message with
its status, one write instead of two (the insert, then the receipt's update) and no lookups for receipts that
overtook their message. A crash loses at most the last interval's sends from the history (never from the outbox):
a lane first adds the history of its device's recent sent rows that lack it (`Lane._serve`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol
from uuid import UUID

from wamd_server.domain.models import InboundMessage
from wamd_server.services.receipts import Taken

log = logging.getLogger(__name__)

CHUNK = 10_000  # messages per statement


class SentHistoryStore(Protocol):
    async def store_sent(self, sent: Sequence[tuple[UUID, InboundMessage]]) -> None: ...


class ReceiptTaker(Protocol):
    def hold(self, keys: Iterable[tuple[UUID, str]]) -> None: ...

    def take(self, keys: Iterable[tuple[UUID, str]]) -> Taken: ...

    def stored(self, taken: Taken) -> None: ...


class HistoryWriter:
    def __init__(self, store: SentHistoryStore, receipts: ReceiptTaker | None, *, flush_s: float = 0.5) -> None:
        self._store = store
        self._receipts = receipts
        self._flush_s = flush_s
        self._pending: list[tuple[UUID, InboundMessage]] = []
        self._unannounced: list[Taken] = []  # receipts taken for messages whose storing failed
        self._task: asyncio.Task[None] | None = None

    def add(self, device_id: UUID, sent: Sequence[InboundMessage]) -> None:
        self._pending.extend((device_id, m) for m in sent)
        if self._receipts is not None:
            self._receipts.hold((device_id, m.wa_id) for m in sent)
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="history-writer")

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("storing the chat history of sent messages failed; trying again")

    async def flush(self) -> None:
        """Store what waits; on failure it waits for the next flush (with what came meanwhile)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        taken = self._receipts.take((d, m.wa_id) for d, m in batch) if self._receipts is not None else Taken()
        if taken.statuses:
            statuses = taken.statuses
            batch = [
                (d, dataclasses.replace(m, status=statuses[(d, m.wa_id)]) if (d, m.wa_id) in statuses else m)
                for d, m in batch
            ]
        stored = 0
        try:
            for start in range(0, len(batch), CHUNK):
                await self._store.store_sent(batch[start : start + CHUNK])
                stored = start + CHUNK
        except BaseException:
            # The statuses travel with the messages; their receipts are announced once they are stored.
            self._pending = batch[stored:] + self._pending
            self._unannounced.append(taken)
            raise
        if self._receipts is not None:
            for done in [*self._unannounced, taken]:
                self._receipts.stored(done)
            self._unannounced = []

    async def close(self) -> None:
        """Stop, storing what waits."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("storing the chat history of the last sent messages failed (added again at next start)")
