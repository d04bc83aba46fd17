"""Unpaced sends join the chat history a moment after they went out, with the receipts that came meanwhile.

A locked batch (unpaced sends on Postgres, see `infra/db/locked_batch.py`) hands its sends here once it has
committed their rows `sent`; every `flush_s` they are stored for all devices at once, each message read from its
outbox row by the database (recipient, text, time: only the row's id travels, and the text when a plugin changed
it before the send). Most delivery receipts of those messages have arrived by then: the writer takes them from the
receipt batcher and stores each message with its status, one write instead of two (the insert, then the receipt's
update) and fewer lookups of receipts that overtook their message. A crash loses at most the last interval's sends
from the history (never from the outbox): a lane first adds the history of its device's recent sent rows that lack
it (`Lane._serve`). The sends of a device deleted meanwhile are gone with its rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol
from uuid import UUID

from wamd_server.domain.ports import HistorySend, Sent
from wamd_server.services.receipts import KINDS, Taken

log = logging.getLogger(__name__)

CHUNK = 10_000  # messages per statement
CLOSE_WAIT_S = 30.0  # how long closing waits for a write under way (then it is cancelled, written again)
GIVE_UP_AFTER = 5  # failed writes of one device's sends, alone, before they are left to the lane's repair
_RANK = {"sent": 0, **{kind.value: rank for rank, kind in enumerate(KINDS, 1)}}


def _later(a: str | None, b: str) -> str:
    """The later of two statuses of our message (None: sent)."""
    return b if _RANK[b] >= _RANK[a or "sent"] else a or "sent"


class SentHistoryStore(Protocol):
    async def store_sent(self, sends: Sequence[HistorySend]) -> None: ...


class ReceiptTaker(Protocol):
    def hold(self, keys: Iterable[tuple[UUID, str]]) -> None: ...

    def release(self, keys: Iterable[tuple[UUID, str]]) -> None: ...

    def take(self, keys: Iterable[tuple[UUID, str]]) -> Taken: ...

    def stored(self, taken: Taken) -> None: ...


class HistoryWriter:
    def __init__(self, store: SentHistoryStore, receipts: ReceiptTaker | None, *, flush_s: float = 0.5) -> None:
        self._store = store
        self._receipts = receipts
        self._flush_s = flush_s
        self._pending: list[HistorySend] = []
        self._unannounced: list[Taken] = []  # taken receipts, announced once a flush has stored their messages
        # After a failed write, devices are written one by one, so one device's trouble (deleted meanwhile, bad
        # data) holds up no other; a device whose sends fail `GIVE_UP_AFTER` times alone is left to the repair
        # a lane makes when it starts (`Lane._restore_history`).
        self._one_by_one = False
        self._failures: dict[UUID, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._writing = False  # the task is in a flush (not between two)
        self._closing = False

    def hold(self, device_id: UUID, sent: Sequence[Sent]) -> None:
        """These sends will be handed over (`add`) once their batch commits: their receipts wait for the writer
        meanwhile instead of being looked up in vain (a batch's first receipts come before its commit)."""
        if self._receipts is not None:
            self._receipts.hold((device_id, s.wa_id) for s in sent)

    def release(self, device_id: UUID, sent: Sequence[Sent]) -> None:
        """Held sends whose batch did not commit: not coming (their rows are sent again later)."""
        if self._receipts is not None:
            self._receipts.release((device_id, s.wa_id) for s in sent)

    def add(self, device_id: UUID, sent: Sequence[Sent]) -> None:
        """Store these sends (rows committed `sent`) with the next flush."""
        self._pending.extend(HistorySend(device_id, s) for s in sent)
        if self._receipts is not None:
            self._receipts.hold((device_id, s.wa_id) for s in sent)
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="history-writer")

    async def _run(self) -> None:
        while self._pending and not self._closing:
            await asyncio.sleep(self._flush_s)
            self._writing = True
            try:
                await self.flush()
            except Exception:
                log.exception("storing the chat history of sent messages failed; trying again")
            finally:
                self._writing = False

    async def flush(self) -> None:
        """Store what waits; what fails waits for the next flush (with what came meanwhile)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        batch = self._with_receipts(batch)
        if self._one_by_one:
            await self._write_one_by_one(batch)
        else:
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                self._put_back(batch)  # not the data's fault: written whole next time
                raise
            except BaseException:
                self._put_back(batch)
                self._one_by_one = True
                raise
        if self._receipts is not None:
            for taken in self._unannounced:
                self._receipts.stored(taken)
        self._unannounced = []

    async def _write_one_by_one(self, batch: list[HistorySend]) -> None:
        by_device: dict[UUID, list[HistorySend]] = {}
        for send in batch:
            by_device.setdefault(send.device_id, []).append(send)
        groups = list(by_device.items())
        for i, (device_id, sends) in enumerate(groups):
            try:
                await self._write(sends)
                self._failures.pop(device_id, None)
            except asyncio.CancelledError:
                for _, rest in groups[i:]:
                    self._put_back(rest)
                raise
            except Exception:
                tries = self._failures[device_id] = self._failures.get(device_id, 0) + 1
                if tries < GIVE_UP_AFTER:
                    self._put_back(sends)
                    continue
                del self._failures[device_id]
                log.exception(
                    "device %s: %d sent messages could not join the chat history; they are added when the "
                    "device next starts sending",
                    device_id,
                    len(sends),
                )
        self._one_by_one = bool(self._failures)

    def _with_receipts(self, batch: list[HistorySend]) -> list[HistorySend]:
        """The sends with the latest status their receipts brought (taken from the batcher); a status given on
        an earlier try is kept if it is later."""
        if self._receipts is None:
            return batch
        keys = [(send.device_id, send.sent.wa_id) for send in batch]
        taken = self._receipts.take(keys)
        if not taken.receipts:
            return batch
        self._unannounced.append(taken)
        statuses = taken.statuses
        for key, send in zip(keys, batch, strict=True):
            status = statuses.get(key)
            if status is not None:
                send.status = _later(send.status, status)
        return batch

    async def _write(self, sends: list[HistorySend]) -> None:
        for start in range(0, len(sends), CHUNK):
            await self._store.store_sent(sends[start : start + CHUNK])

    def _put_back(self, sends: list[HistorySend]) -> None:
        """Failed sends wait for the next flush, their receipts held again meanwhile."""
        self._pending = sends + self._pending
        if self._receipts is not None:
            self._receipts.hold((send.device_id, send.sent.wa_id) for send in sends)

    async def close(self) -> None:
        """Stop, storing what waits. A write under way is let finish: cancelled, it would be written again (a
        broadcast's backlog, at shutdown)."""
        if self._task is not None:
            self._closing = True
            if self._writing:
                await asyncio.wait([self._task], timeout=CLOSE_WAIT_S)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            self._closing = False  # sends added from now on are written as before
        try:
            await self.flush()
        except Exception:
            log.exception("storing the chat history of the last sent messages failed (added again at next start)")
