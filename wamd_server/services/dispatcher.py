"""The dispatcher: sends the outbox rows of the devices this worker runs, one lane per online device.

A lane is the only sender of its device, so it keeps the device's send history in memory for the pacing rules.
It re-sends first whatever the device left in `sending` (a crash between claim and result) with the same
message ids, then claims due rows as pacing allows: one at a time when there is a gap between sends, in batches
when pacing is off (on Postgres as a locked batch: the rows held by row locks instead of written `sending`, see
`infra/db/locked_batch.py`; results go through `batch_results.py`; the chat history of those sends is written a
moment later, see `history.py`). Every attempt ends as `sent`, `failed` (with the reason), back in the queue for
a later try (transient errors, with backoff), or `cancelled` (opted out, vetoed by a plugin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar
from uuid import UUID
from zoneinfo import ZoneInfo

from wamd_server.domain.errors import NotConnected, RecipientNotOnWhatsApp, TransportError
from wamd_server.domain.ids import user_jid
from wamd_server.domain.models import (
    CampaignStatus,
    Device,
    DeviceStatus,
    InboundMessage,
    OutboundMessage,
    OutboxItem,
    SendResult,
    SourceKind,
)
from wamd_server.domain.ports import Clock, DeviceRepository, DeviceScope, Sent, Transport
from wamd_server.services.batch_results import ClaimedResults, LockedBatchSource, Results
from wamd_server.services.deadlines import Deadlines
from wamd_server.services.optout import OPTED_OUT_REASON
from wamd_server.services.pacing import PacingRules, SendAllowance, SendHistory, next_send_at
from wamd_server.services.queue import QueueControl
from wamd_server.services.templating import Greetings, regreet

T = TypeVar("T")

log = logging.getLogger(__name__)

EVERYTHING = DeviceScope.everything()
# How far back a starting lane looks for sends missing from the chat history (a crash before their delayed write).
HISTORY_REPAIR_WINDOW = timedelta(days=7)
# A lane that starts again looks back only to shortly before the previous look of this process (a device that
# reconnects often, times thousands of devices, read a week of sends at every start); the overlap covers batches
# that were still committing then.
HISTORY_REPAIR_OVERLAP = timedelta(minutes=10)


@dataclass(frozen=True)
class DispatchSettings:
    batch: int = 100  # rows claimed at once when pacing is off
    idle_poll_s: float = 60.0  # an idle lane looks again this often at most (new messages wake it at once)
    max_attempts: int = 5  # transient failures before a message fails for good
    retry_delays_s: tuple[float, ...] = (30.0, 120.0, 600.0, 1800.0)
    # Consecutive failed sends that pause the device's queue (a recipient not on WhatsApp is no fault of the
    # device: it is not counted, or a list of bad numbers would pause a healthy device).
    failures_to_pause: int = 5
    # Recipients in a row not on WhatsApp that pause it: messaging many numbers that are not on WhatsApp is a
    # sign of spam to WhatsApp (and a bad lead list is worth a look before it goes on).
    missing_to_pause: int = 20
    send_timeout_s: float = 30.0  # no server ack after this long: the device is suspect
    typing_chars_per_s: float = 15.0  # how long "typing…" shows: the text's length at this speed…
    typing_max_s: float = 6.0  # …but never longer than this, nor than the gap before the send
    # Lanes working through an unpaced batch (claim → sends → record) at once; the others wait their turn, in
    # order. Without a bound, thousands of lanes released together each held or awaited one of the few database
    # connections while the event loop was busy with all the others, and lanes failed on the pool's timeout.
    max_active: int = 64
    error_backoff_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)  # a failed lane starts over after this


class OutboxStore(Protocol):
    async def claim(self, device_id: UUID, now: datetime, limit: int) -> list[OutboxItem]: ...

    async def in_flight(self, device_id: UUID) -> list[OutboxItem]: ...

    async def next_due(self, device_id: UUID) -> datetime | None: ...

    async def record_sent(self, device_id: UUID, sent: list[Sent], history: list[InboundMessage]) -> None:
        """Mark rows sent and add them to the device's chat history, in one transaction."""
        ...

    async def mark_failed(self, item_id: UUID, error: str, now: datetime) -> None: ...

    async def mark_cancelled(self, item_id: UUID, reason: str, now: datetime) -> None: ...

    async def retry_later(self, item_id: UUID, at: datetime, error: str, now: datetime) -> None: ...

    async def release(self, item_ids: Any, now: datetime) -> None: ...

    async def sent_since(self, device_id: UUID, since: datetime) -> list[datetime]: ...

    async def opted_out_phones(self) -> set[str]: ...

    async def is_opted_out(self, phone: str) -> bool: ...

    async def campaign_status(self, campaign_id: UUID) -> CampaignStatus | None: ...

    async def sent_without_history(self, device_id: UUID, since: datetime) -> list[tuple[OutboxItem, Sent]]:
        """Rows the device sent since `since` whose message is missing from its chat history."""
        ...


MediaLoader = Callable[[UUID], Awaitable[tuple[bytes, str] | None]]
Veto = Callable[[OutboxItem], Awaitable[str | None]]
Suspect = Callable[[UUID], Awaitable[None]]


@dataclass
class SendOutcome:
    sent: Sent | None = None
    stop: bool = False  # the lane must stop (device gone)
    failed: bool = False
    paused: bool = False  # the failure paused the device's queue: the rest of the batch waits


@dataclass
class Round:
    """What one claim-and-send round of a lane came to."""

    stop: bool = False  # the lane must stop (device gone or offline)
    more: bool = False  # more rows may be due at once: go on without waiting
    device: Device | None = None  # the device as read at the start of a locked batch
    next_due: datetime | None = None  # when the next queued row is due, if the round found out (`due_known`)
    due_known: bool = False


def _pace_of(device: Device) -> tuple[Any, ...]:
    """What decides whether and how a device sends: a locked batch goes ahead only if none of it changed."""
    return (
        device.status,
        device.queue_paused_reason,
        device.min_delay_s,
        device.max_delay_s,
        device.hourly_cap,
        device.daily_cap,
        device.quiet_start,
        device.quiet_end,
        device.warmup_days,
        device.linked_at,
        device.typing,
    )


class OptedOut:
    """Phones that opted out, kept in memory: checked before every send without a query. Reloaded now and then
    (an opt-out taken back elsewhere ends with the reload); a change is applied at once (`add`, `discard`, from
    the bus) wherever it happened."""

    def __init__(self, outbox: OutboxStore, max_age_s: float = 30.0) -> None:
        self._outbox = outbox
        self._max_age_s = max_age_s
        self._phones: set[str] = set()
        self._loaded_at = -math.inf
        self._lock = asyncio.Lock()
        self._changed: dict[str, tuple[bool, float]] = {}  # phone -> (opted out, when), since the last reload

    async def phones(self) -> set[str]:
        if time.monotonic() - self._loaded_at > self._max_age_s:
            async with self._lock:
                if time.monotonic() - self._loaded_at > self._max_age_s:
                    started = time.monotonic()
                    loaded = await self._outbox.opted_out_phones()
                    # A change that came while the reload read may be missing from what it read: it stands.
                    self._changed = {p: c for p, c in self._changed.items() if c[1] >= started}
                    for phone, (out, _) in self._changed.items():
                        (loaded.add if out else loaded.discard)(phone)
                    self._phones = loaded
                    self._loaded_at = started
        return self._phones

    def add(self, phone: str) -> None:
        self._phones.add(phone)
        self._changed[phone] = (True, time.monotonic())

    async def holds(self, phone: str) -> bool:
        """Whether messages to `phone` must not go out: it is in the set (as it is now, not as a batch found it),
        and the database, which the set may trail (an opt-out taken back a moment ago, its news not here yet),
        agrees. A stale entry is dropped, unless news about the phone came while the database was asked."""
        if phone not in self._phones:
            return False
        asked = time.monotonic()
        if await self._outbox.is_opted_out(phone):
            return True
        if self._changed.get(phone, (False, -math.inf))[1] < asked:
            self.discard(phone)
        return False

    def discard(self, phone: str) -> None:
        self._phones.discard(phone)
        self._changed[phone] = (False, time.monotonic())


class Dispatcher:
    def __init__(
        self,
        *,
        outbox: OutboxStore,
        devices: DeviceRepository,
        transport: Transport,
        clock: Clock,
        tz: ZoneInfo,
        veto: Veto,
        suspect: Suspect,
        load_media: MediaLoader,
        queue: QueueControl,
        settings: DispatchSettings | None = None,
        rng: random.Random | None = None,
        locked: LockedBatchSource | None = None,
        repair_history: bool = False,
        greetings: Greetings | None = None,
    ) -> None:
        self.outbox = outbox
        self.locked = locked  # None: unpaced batches are claimed `sending` too (SQLite)
        # Locked batches store their sends' chat history a moment later (`services/history.py`): a lane that
        # starts adds what a crash kept from being stored.
        self.repair_history = repair_history
        self.history_checked_at: dict[UUID, datetime] = {}  # per device: when a lane last looked for missing history
        self.devices = devices
        self.transport = transport
        self.clock = clock
        self.tz = tz
        self.greetings = greetings  # `{greeting}` texts (None: the defaults)
        self.veto = veto
        self.suspect = suspect
        self.load_media = load_media
        self.settings = settings or DispatchSettings()
        self.queue = queue
        self.opted_out = OptedOut(outbox)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rng = rng or random.Random()
        self.lanes: dict[UUID, Lane] = {}
        self.active = asyncio.Semaphore(self.settings.max_active)
        self.send_limits = Deadlines(self.settings.send_timeout_s)

    def device_status(self, device_id: UUID, status: DeviceStatus) -> None:
        """Pool listener: a lane runs exactly while its device is online; bans and logouts pause the queue
        (within the same event), and being online again lifts those pauses."""
        if status is DeviceStatus.ONLINE:
            self._spawn(self._online(device_id))
            return
        self.stop(device_id)
        if status is DeviceStatus.BANNED:
            self._spawn(self.queue.pause(device_id, "ban", "the device is temporarily banned by WhatsApp"))
        elif status is DeviceStatus.LOGGED_OUT:
            self._spawn(self.queue.pause(device_id, "logout", "the device was logged out; pair it again"))

    async def _online(self, device_id: UUID) -> None:
        await self.queue.lift_if_self_lifting(device_id)
        self.start(device_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, device_id: UUID) -> None:
        lane = self.lanes.get(device_id)
        if lane is not None and not lane.done:
            lane.wake.set()
            return
        lane = self.lanes[device_id] = Lane(self, device_id)
        lane.start()

    def stop(self, device_id: UUID) -> None:
        lane = self.lanes.pop(device_id, None)
        if lane is not None:
            lane.cancel()

    def wake(self, device_ids: Any = None) -> None:
        """New rows were queued (or a queue was resumed): lanes look now instead of at their next poll."""
        targets = self.lanes.values() if device_ids is None else [self.lanes[d] for d in device_ids if d in self.lanes]
        for lane in targets:
            lane.wake.set()

    async def close(self) -> None:
        lanes, self.lanes = list(self.lanes.values()), {}
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*(lane.wait_closed() for lane in lanes), *self._tasks, return_exceptions=True)
        self.send_limits.close()


class Lane:
    def __init__(self, dispatcher: Dispatcher, device_id: UUID) -> None:
        self.d = dispatcher
        self.device_id = device_id
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.history = SendHistory()
        self.failures = 0  # failed sends in a row (the device's fault)
        self.missing = 0  # recipients in a row not on WhatsApp
        self.errors = 0  # lane failures in a row (database unreachable…), for the backoff
        # The rows ahead carry a gap of their own (a campaign's min..max) on a device without one: they are taken
        # one at a time, as on a paced device, until a row without a gap comes.
        self.rows_paced = False
        self.held_until: datetime | None = None  # a cap or quiet hours hold the next row back until then
        self.holding = False  # holds one of the dispatcher's active slots
        # Rows marked `sending` and not yet settled, by id (a dict: settling one is O(1), where removing from a
        # list compared whole dataclasses, O(n) each).
        self.claimed: dict[UUID, OutboxItem] = {}
        self.claimed_results = ClaimedResults(dispatcher.outbox, device_id)
        self.results: Results = self.claimed_results  # of the batch being sent

    @property
    def done(self) -> bool:
        return self.task is None or self.task.done()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"lane-{self.device_id}")

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def wait_closed(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        """Serve the device until it is gone or offline. A failure (the database unreachable, a pool timeout)
        does not end the lane: it starts over after a growing pause, and rows it left `sending` are re-sent with
        the same message ids, as after a crash."""
        backoff = self.d.settings.error_backoff_s
        try:
            while True:
                try:
                    await self._serve()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    delay = backoff[min(self.errors, len(backoff) - 1)]
                    self.errors += 1
                    log.exception("device %s: dispatcher lane failed; starting over in %.0f s", self.device_id, delay)
                    self._release_slot()
                    await self._settle_on_exit()
                    await self.d.clock.sleep(delay)
        finally:
            self._release_slot()
            await self._settle_on_exit()

    async def _serve(self) -> None:
        d = self.d
        now = d.clock.now()
        self.history = SendHistory(await d.outbox.sent_since(self.device_id, now - timedelta(days=2)))
        recovered = await d.outbox.in_flight(self.device_id)
        if recovered:
            log.info("device %s: re-sending %d messages left in flight", self.device_id, len(recovered))
        if d.repair_history:
            await self._restore_history(now)
        snapshot: Device | None = None  # the device as the last locked batch read it, when no wait came since
        known: Device | None = None  # the device as last read, however long ago
        while True:
            if snapshot is None:
                # A wake from here on (rows queued, queue resumed) is kept until the lane next waits, so the lane
                # never sleeps through one that arrived while it was busy. Not cleared when going by a locked
                # batch's reading: a wake that came after that reading (a resume) must not be lost.
                self.wake.clear()
                # A locked batch reads the device again before it sends anything and hands back what changed:
                # no read of its own per wake (thousands when a broadcast starts).
                device = known if self._batch_reads_device(known, recovered) else None
                device = device or await d.devices.get(self.device_id, EVERYTHING)
            else:
                device = snapshot
            snapshot = None
            known = device
            if device is None or device.status is not DeviceStatus.ONLINE:
                return
            if device.queue_paused_reason:
                await self._idle(d.settings.idle_poll_s)
                continue
            rules = PacingRules.for_device(device, d.tz)
            # Caps and quiet hours do not depend on the message: wait them out before claiming anything.
            if not recovered and not await self._paced(rules, 0.0):
                continue
            paced = rules.max_delay_s > 0 or device.typing or self.rows_paced
            limit = 1 if paced else d.settings.batch
            if not paced:
                await self._take_slot()
            try:
                if not paced and not recovered and d.locked is not None:
                    done = await self._locked_round(d.locked, device, rules, limit)
                else:
                    done = await self._claimed_round(device, rules, limit, recovered)
                    recovered = []
            finally:
                self._release_slot()
            if done.stop:
                return
            self.errors = 0
            known = done.device or known
            if done.more:
                snapshot = done.device
                continue
            # Nothing due, or the claim took every due row: look again when the next one is due (or when woken),
            # not at once with a claim that would come back empty.
            due = done.next_due if done.due_known else await d.outbox.next_due(self.device_id)
            await self._idle(self._idle_time(due))

    def _batch_reads_device(self, known: Device | None, recovered: list[OutboxItem]) -> bool:
        """Whether the lane may go by `known`: it was online, not paused, unpaced and free to send now, so the
        next step is a locked batch, which reads the device in its own transaction and goes no further if any of
        that changed. (A lane that would wait for a cap or quiet hours reads the device first: its settings may
        have changed since.)"""
        if known is None or recovered or self.d.locked is None or self.rows_paced:
            return False
        if known.status is not DeviceStatus.ONLINE or known.queue_paused_reason or known.typing:
            return False
        rules = PacingRules.for_device(known, self.d.tz)
        now = self.d.clock.now()
        return rules.max_delay_s <= 0 and next_send_at(rules, self.history, now, 0.0) <= now

    async def _claimed_round(
        self, device: Device, rules: PacingRules, limit: int, recovered: list[OutboxItem]
    ) -> Round:
        """Rows claimed `sending` (or left so by a crash), sent, each result written as it comes."""
        batch = recovered or await self.d.outbox.claim(self.device_id, self.d.clock.now(), limit)
        if batch and not await self._send_batch(device, rules, batch, self.claimed_results, limit == 1):
            return Round(stop=True)
        if self.held_until is not None:
            held, self.held_until = self.held_until, None
            return Round(next_due=held, due_known=True)
        return Round(more=bool(recovered) or (bool(batch) and len(batch) == limit))

    async def _locked_round(self, source: LockedBatchSource, device: Device, rules: PacingRules, limit: int) -> Round:
        """A locked batch (unpaced, Postgres). It reads the device again in its own transaction: if the queue was
        paused or pacing turned on since the lane looked, nothing is sent and the lane starts over with what the
        batch read; else that reading saves the next round a query of its own."""
        await self.d.opted_out.phones()  # (re)loaded, if due, before the batch holds a connection
        async with source.batch(self.device_id, self.d.clock.now(), limit) as locked:
            fresh = locked.device
            if fresh is None:
                return Round(stop=True)
            if _pace_of(fresh) != _pace_of(device):
                return Round(more=True, device=fresh)
            batch = locked.items
            if batch and not await self._send_batch(fresh, rules, batch, locked, False):
                return Round(stop=True)
            self.held_until = None  # (no gap here: the caps are waited out before the next claim)
            more = bool(batch) and (locked.expired() or len(batch) == limit)
        return Round(more=more, device=fresh, next_due=locked.next_due, due_known=True)

    async def _take_slot(self) -> None:
        await self.d.active.acquire()
        self.holding = True

    def _release_slot(self) -> None:
        if self.holding:
            self.holding = False
            self.d.active.release()

    async def _wait_unslotted(self, waiting: Awaitable[T]) -> T:
        """A pause in a batch (a gap, typing): other lanes may use the slot meanwhile."""
        if not self.holding:
            return await waiting
        self._release_slot()
        result = await waiting
        await self._take_slot()
        return result

    async def _gap_passed(self, seconds: float, item: OutboxItem) -> bool:
        """Wait out a paced send's gap; False when, woken meanwhile, the lane finds the device's queue paused or
        the device gone, or the message's campaign paused or ended (a gap can last up to an hour: a pause must
        not let the claimed message go out after)."""
        d = self.d
        until = d.clock.now() + timedelta(seconds=seconds)
        while (left := (until - d.clock.now()).total_seconds()) > 0:
            self.wake.clear()
            if await self._wait_unslotted(d.clock.wait(self.wake, left)):
                device = await d.devices.get(self.device_id, EVERYTHING)
                if device is None or device.status is not DeviceStatus.ONLINE or device.queue_paused_reason:
                    return False
                if not await self._campaign_goes_on(item):
                    return False
        return True

    async def _campaign_goes_on(self, item: OutboxItem) -> bool:
        """Whether the message's campaign (if any) still runs. A message of an ended campaign is cancelled here
        (it was `sending` when the campaign's messages were cancelled); one of a paused campaign goes back to the
        queue with the rest of the batch."""
        if item.source_kind is not SourceKind.CAMPAIGN or item.source_id is None:
            return True
        status = await self.d.outbox.campaign_status(item.source_id)
        if status in (None, CampaignStatus.CANCELLED):
            reason = "campaign cancelled" if status else "campaign deleted"
            await self.results.cancelled(item.id, reason, self.d.clock.now())
            del self.claimed[item.id]
            return False
        return status is not CampaignStatus.PAUSED

    async def _paced(self, rules: PacingRules, gap_s: float) -> bool:
        """Wait until pacing allows the next send; False when woken early (look again)."""
        now = self.d.clock.now()
        at = next_send_at(rules, self.history, now, gap_s)
        if at <= now:
            return True
        self.wake.clear()
        woken = await self.d.clock.wait(self.wake, (at - now).total_seconds())
        return not woken and self.d.clock.now() >= at

    def _idle_time(self, due: datetime | None) -> float:
        """Until the next queued message is due (a retry, a scheduled send), at most the idle poll."""
        poll = self.d.settings.idle_poll_s
        if due is None:
            return poll
        return min(poll, max((due - self.d.clock.now()).total_seconds(), 0.05))

    async def _idle(self, seconds: float) -> None:
        """Wait `seconds`, or less if woken (since the start of this round of the lane's loop)."""
        await self.d.clock.wait(self.wake, seconds)

    async def _send_batch(
        self, device: Device, rules: PacingRules, batch: list[OutboxItem], results: Results, paced: bool
    ) -> bool:
        """Send claimed rows in order, each after its gap (`paced`: rows taken one at a time, so they may wait
        for theirs); False when the lane must stop."""
        d = self.d
        self.claimed = {item.id: item for item in batch}
        self.results = results
        sent: list[Sent] = []
        allowance = SendAllowance(rules, self.history)  # sends without a gap: counted down, not worked out each
        try:
            await d.opted_out.phones()  # (re)loaded, if due
            for item in batch:
                if sent and results.expired():
                    break  # the rest goes to the next batch
                # The gap is the campaign's own min..max for its messages, else the device's; "typing…" is
                # shown during the end of the gap, so typing never stretches it.
                gap = rules.gap(d.rng, item.min_delay_s, item.max_delay_s)
                if not paced and gap > 0:
                    # A batch taken without gaps would wait out this row's gap, and each after it, with its rows
                    # locked or `sending` (a campaign paused or cancelled meanwhile still sent, its report
                    # behind): the rest goes back, to be taken one at a time.
                    self.rows_paced = True
                    break
                if paced:
                    self.rows_paced = gap > 0
                # Checks and loading come before the gap, so the send follows the gap at once.
                loaded_text = item.text  # a plugin may change it (`wamd_before_send`)
                message = await self._prepare(item, await d.opted_out.holds(item.recipient))
                if message is None:
                    del self.claimed[item.id]
                    continue
                now = d.clock.now()
                if gap <= 0 and allowance.take(now):
                    wait = 0.0
                else:
                    allowance.spend_all()
                    wait = (next_send_at(rules, self.history, now, gap) - now).total_seconds()
                if wait > max(gap, 0.0) + 1.0:
                    # A cap or quiet hours hold this row back (its gap ends in them): the rest goes back to the
                    # queue, and the lane waits instead of claiming the same row again at once.
                    self.held_until = now + timedelta(seconds=wait)
                    break
                typing_s = self._typing_time(item, max(wait, 0.0)) if device.typing else 0.0
                if wait - typing_s > 0 and not await self._gap_passed(wait - typing_s, item):
                    break  # the queue or campaign was paused (or the device left) during the gap: the rest goes back
                if device.typing:
                    await self._wait_unslotted(self._show_typing(item, typing_s))
                if wait > 0 or device.typing:  # the gap can last minutes: is the message still wanted?
                    if await d.opted_out.holds(item.recipient):
                        await self.results.cancelled(item.id, OPTED_OUT_REASON, d.clock.now())
                        del self.claimed[item.id]
                        continue
                    if not await self._campaign_goes_on(item):
                        if item.id in self.claimed:
                            break  # paused: it goes back to the queue with the rest, to wait for the resume
                        continue  # cancelled
                if item.greeting is not None:  # the greeting of now, not of when the message was queued
                    message.text = item.text = regreet(item.text, item.greeting, d.clock.now(), d.tz, d.greetings)
                outcome = await self._send(item, message, loaded_text)
                del self.claimed[item.id]
                if outcome.sent is not None:
                    sent.append(outcome.sent)
                if outcome.stop:
                    return False
                if outcome.paused:
                    break
        finally:
            await asyncio.shield(self._record(batch, sent))
        await self._settle_on_exit()
        # Not kept until the lane's next batch: a lane per device, each holding its last batch's rows, kept about
        # as many objects alive as a broadcast has messages (and the collector walked them all).
        self.results = self.claimed_results
        return True

    async def _record(self, batch: list[OutboxItem], sent: list[Sent]) -> None:
        if not sent:
            return
        if self.results.history_later:
            await self.results.sent(sent, [])
            return
        by_id = {item.id: item for item in batch}
        await self.results.sent(sent, [self._as_message(by_id[s.id], s) for s in sent if s.id in by_id])

    async def _restore_history(self, now: datetime) -> None:
        """Sends whose history a crash kept from being stored (see `services/history.py`) are stored now."""
        since = now - HISTORY_REPAIR_WINDOW
        checked = self.d.history_checked_at.get(self.device_id)
        if checked is not None:
            since = max(since, checked - HISTORY_REPAIR_OVERLAP)
        missing = await self.d.outbox.sent_without_history(self.device_id, since)
        if missing:
            log.info("device %s: adding %d sent messages to the chat history", self.device_id, len(missing))
            history = [self._as_message(item, s) for item, s in missing]
            await self.d.outbox.record_sent(self.device_id, [], history)
        self.d.history_checked_at[self.device_id] = now

    @staticmethod
    def _as_message(item: OutboxItem, sent: Sent) -> InboundMessage:
        return InboundMessage.own_send(
            item.wa_message_id, item.recipient, item.text, sent.server_ts, bool(item.media_id)
        )

    async def _prepare(self, item: OutboxItem, opted_out: bool) -> OutboundMessage | None:
        """The message to send, or None when the row was settled instead (opted out, vetoed, image gone)."""
        d = self.d
        if opted_out:
            await self.results.cancelled(item.id, OPTED_OUT_REASON, d.clock.now())
            return None
        reason = await d.veto(item)
        if reason:
            await self.results.cancelled(item.id, f"vetoed by a plugin: {reason}", d.clock.now())
            return None
        message = OutboundMessage(wa_id=item.wa_message_id, to=item.recipient, text=item.text)
        if item.media_id is not None:
            media = await d.load_media(item.media_id)
            if media is None:
                await self.results.failed(item.id, "the image of this message was deleted", d.clock.now())
                return None
            message.image, message.image_mime = media
        return message

    async def _send(self, item: OutboxItem, message: OutboundMessage, loaded_text: str) -> SendOutcome:
        d = self.d
        try:
            with d.send_limits.limit():
                result: SendResult = await d.transport.send(self.device_id, message)
        except TimeoutError:
            # No ack: keep the message (same id) for the next attempt and have the device checked.
            await self.results.release([item.id], d.clock.now())
            await d.suspect(self.device_id)
            return SendOutcome(stop=True)
        except NotConnected:
            await self.results.release([item.id], d.clock.now())
            return SendOutcome(stop=True)
        except TransportError as exc:
            return SendOutcome(failed=True, paused=await self._failed(item, exc))
        self.failures = self.missing = 0
        sent_at = d.clock.now()
        self.history.add(sent_at)
        edited = None if message.text is loaded_text else message.text
        return SendOutcome(sent=Sent(item.id, sent_at, result.server_timestamp, item.wa_message_id, edited))

    def _typing_time(self, item: OutboxItem, room_s: float) -> float:
        s = self.d.settings
        return min(len(item.text) / s.typing_chars_per_s, s.typing_max_s, room_s)

    async def _show_typing(self, item: OutboxItem, seconds: float) -> None:
        with contextlib.suppress(TransportError):
            await self.d.transport.set_typing(self.device_id, user_jid(item.recipient), True)
            await self.d.clock.sleep(seconds)

    async def _failed(self, item: OutboxItem, exc: TransportError) -> bool:
        """Settle a failed attempt; True when the failures in a row paused the device's queue."""
        d = self.d
        now = d.clock.now()
        device_fault = not isinstance(exc, RecipientNotOnWhatsApp)
        if device_fault:
            self.failures += 1
        else:
            self.missing += 1
        if not exc.retryable:
            await self.results.failed(item.id, exc.message, now)
        elif item.attempts >= d.settings.max_attempts:
            await self.results.failed(item.id, f"gave up after {item.attempts} attempts: {exc.message}", now)
        else:
            delays = d.settings.retry_delays_s
            at = now + timedelta(seconds=delays[min(item.attempts - 1, len(delays) - 1)])
            await self.results.retry_later(item.id, at, exc.message, now)
        if not device_fault:
            if self.missing < d.settings.missing_to_pause:
                return False
            reason = f"{self.missing} recipients in a row are not on WhatsApp; check the lead list"
            await d.queue.pause(self.device_id, "failures", reason)
            self.missing = 0  # counted afresh once the queue is resumed
            return True
        if self.failures < d.settings.failures_to_pause:
            return False
        await d.queue.pause(self.device_id, "failures", f"{self.failures} sends in a row failed; last: {exc.message}")
        self.failures = 0  # counted afresh once the queue is resumed
        return True

    async def _settle_on_exit(self) -> None:
        """Rows claimed but not attempted go back to the queue (same ids, attempt not counted)."""
        if self.claimed:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.results.release(list(self.claimed), self.d.clock.now()))
            self.claimed = {}
