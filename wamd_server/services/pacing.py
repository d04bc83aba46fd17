"""Pacing rules of one device: when may it send next?

A device sends like a person: a random gap between messages (min..max seconds), at most `hourly_cap` messages in
any rolling hour and `daily_cap` per local day (ramped up over `warmup_days` after the device was linked), and
nothing during its quiet hours. Days and quiet hours are computed in the configured time zone; storage and
arithmetic stay in UTC.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from wamd_server.domain.errors import InvalidInput
from wamd_server.domain.models import Device

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
_KEPT = 2 * DAY  # how far back a device's send history goes


def parse_clock_time(value: str, field: str) -> time:
    """'22:00' → time(22, 0); a clear error otherwise."""
    try:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise InvalidInput(f"{field} must be a time of day like 22:00, got {value!r}", {"field": field}) from None


@dataclass(frozen=True)
class PacingRules:
    min_delay_s: float
    max_delay_s: float
    hourly_cap: int
    daily_cap: int
    tz: ZoneInfo
    quiet_start: time | None = None
    quiet_end: time | None = None
    warmup_days: int = 0
    linked_at: datetime | None = None

    @staticmethod
    def for_device(device: Device, tz: ZoneInfo) -> PacingRules:
        quiet = device.quiet_start and device.quiet_end
        return PacingRules(
            min_delay_s=device.min_delay_s,
            max_delay_s=device.max_delay_s,
            hourly_cap=device.hourly_cap,
            daily_cap=device.daily_cap,
            tz=tz,
            quiet_start=parse_clock_time(device.quiet_start, "quiet_start") if quiet and device.quiet_start else None,
            quiet_end=parse_clock_time(device.quiet_end, "quiet_end") if quiet and device.quiet_end else None,
            warmup_days=device.warmup_days,
            linked_at=device.linked_at,
        )

    def gap(self, rng: random.Random, min_s: float | None = None, max_s: float | None = None) -> float:
        """The pause before the next send: a campaign's own min..max when it has one, else the device's."""
        low = self.min_delay_s if min_s is None else min_s
        high = self.max_delay_s if max_s is None else max_s
        low, high = min(low, high), max(low, high)
        return rng.uniform(low, high) if high > low else low

    def daily_cap_on(self, when: datetime) -> int:
        """Today's cap: during warm-up it grows linearly from 1/warmup_days of the cap to the full cap."""
        if self.warmup_days <= 0 or self.linked_at is None:
            return self.daily_cap
        day = (when.astimezone(self.tz).date() - self.linked_at.astimezone(self.tz).date()).days
        share = min(1.0, max(day + 1, 1) / self.warmup_days)
        return max(1, math.floor(self.daily_cap * share))

    def quiet_until(self, when: datetime) -> datetime | None:
        """If `when` falls in the quiet hours, the moment they end; else None."""
        if self.quiet_start is None or self.quiet_end is None or self.quiet_start == self.quiet_end:
            return None
        local = when.astimezone(self.tz)
        now_t = local.time()
        start, end = self.quiet_start, self.quiet_end
        if start < end:
            quiet, end_day = start <= now_t < end, local.date()
        else:  # crosses midnight, e.g. 22:00-08:00
            quiet = now_t >= start or now_t < end
            end_day = local.date() + timedelta(days=1) if now_t >= start else local.date()
        if not quiet:
            return None
        return datetime.combine(end_day, end, tzinfo=self.tz).astimezone(when.tzinfo)

    def next_quiet_start(self, when: datetime) -> datetime | None:
        """When quiet hours next begin (never later than that; earlier, even before `when`, if the clocks jump
        over their start), or None without quiet hours."""
        if self.quiet_start is None or self.quiet_end is None or self.quiet_start == self.quiet_end:
            return None
        local = when.astimezone(self.tz)
        day = local.date() if local.time() < self.quiet_start else local.date() + DAY
        return _first_instant(day, self.quiet_start, self.tz).astimezone(when.tzinfo)

    def next_local_midnight(self, when: datetime) -> datetime:
        return _local_day(self.tz, when)[1].astimezone(when.tzinfo)

    def local_midnight(self, when: datetime) -> datetime:
        return local_midnight(when, self.tz)


def local_midnight(when: datetime, tz: ZoneInfo) -> datetime:
    """Where the local day of `when` began, in `tz`."""
    return _local_day(tz, when)[0].astimezone(when.tzinfo)


def _first_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The earliest UTC instant the wall clock of `tz` reads `at` on `day`: of a time repeated when clocks go back,
    the first; of one skipped when they go forward, the earlier of its two readings (before the jump)."""
    return min(datetime.combine(day, at.replace(fold=fold), tzinfo=tz).astimezone(UTC) for fold in (0, 1))


# The last local day asked for, per zone, as UTC instants [midnight, next midnight): pacing asks for the same day
# twice per message sent, and the zone arithmetic was 4 % of a broadcast's CPU.
_DAYS: dict[ZoneInfo, tuple[datetime, datetime]] = {}


def _local_day(tz: ZoneInfo, when: datetime) -> tuple[datetime, datetime]:
    day = _DAYS.get(tz)
    if day is None or not day[0] <= when < day[1]:
        date = when.astimezone(tz).date()
        start = datetime.combine(date, time(0), tzinfo=tz).astimezone(UTC)
        day = _DAYS[tz] = (start, datetime.combine(date + DAY, time(0), tzinfo=tz).astimezone(UTC))
    return day


class SendHistory:
    """When one device sent, over the last day. The device's dispatcher lane is its only sender, so the history
    it loaded at start and extends after each send is complete."""

    def __init__(self, times: Iterable[datetime] = ()) -> None:
        self.times: list[datetime] = sorted(times)

    def add(self, when: datetime) -> None:
        bisect.insort(self.times, when)
        cutoff = when - _KEPT
        if self.times and self.times[0] < cutoff:
            del self.times[: bisect.bisect_left(self.times, cutoff)]

    @property
    def last(self) -> datetime | None:
        return self.times[-1] if self.times else None

    def count_between(self, start: datetime, end: datetime) -> int:
        """Sends in (start, end]."""
        return bisect.bisect_right(self.times, end) - bisect.bisect_right(self.times, start)

    def nth_latest_before(self, end: datetime, n: int) -> datetime:
        """The n-th most recent send at or before `end` (n ≥ 1)."""
        return self.times[bisect.bisect_right(self.times, end) - n]


class SendAllowance:
    """Sends a device may make back to back without a cap or its quiet hours holding one back: a batch sent
    without pauses counts them down instead of working out every send's time (`next_send_at`). Worked out again
    when spent; sound meanwhile, since more sends only add to both counts and time only takes sends out of the
    rolling hour; it ends where the local day or the quiet hours begin, and when the clock is set back."""

    def __init__(self, rules: PacingRules, history: SendHistory) -> None:
        self.rules = rules
        self.history = history
        self.left = 0
        self.since = self.until = datetime.min.replace(tzinfo=UTC)

    def take(self, now: datetime) -> bool:
        """Whether a send may go at `now` without a wait; counts it if so. Every send the device makes must
        go through here while the allowance is used (else `spend_all`)."""
        if not (self.left > 0 and self.since <= now < self.until):
            self.renew(now)
        if self.left > 0 and self.since <= now < self.until:
            self.left -= 1
            return True
        return False

    def spend_all(self) -> None:
        """A send went out by other rules (with a gap): work the allowance out afresh before the next."""
        self.left = 0

    def renew(self, now: datetime) -> None:
        rules, history = self.rules, self.history
        self.left, self.since, self.until = 0, now, now  # a clock set back ends it too
        if next_send_at(rules, history, now, 0.0) > now or (history.last is not None and history.last > now):
            return
        today = history.count_between(rules.local_midnight(now) - timedelta(microseconds=1), now)
        left = rules.daily_cap_on(now) - today
        if rules.hourly_cap > 0:
            left = min(left, rules.hourly_cap - history.count_between(now - HOUR, now))
        until = rules.next_local_midnight(now)
        quiet = rules.next_quiet_start(now)
        self.left, self.until = max(left, 0), until if quiet is None else min(until, quiet)


def next_send_at(rules: PacingRules, history: SendHistory, now: datetime, gap_s: float) -> datetime:
    """The earliest moment ≥ now at which the device may send again, `gap_s` after its last send."""
    at = now
    if history.last is not None:
        at = max(at, history.last + timedelta(seconds=gap_s))
    for _ in range(16):  # each rule may push `at` later; a few rounds settle it
        moved = False
        if rules.hourly_cap > 0 and history.count_between(at - HOUR, at) >= rules.hourly_cap:
            # Wait until the oldest send that counts towards the cap leaves the rolling hour.
            at = history.nth_latest_before(at, rules.hourly_cap) + HOUR + timedelta(microseconds=1)
            moved = True
        day_start = rules.local_midnight(at)
        if history.count_between(day_start - timedelta(microseconds=1), at) >= rules.daily_cap_on(at):
            at = rules.next_local_midnight(at)
            moved = True
        quiet_end = rules.quiet_until(at)
        if quiet_end is not None:
            at = quiet_end
            moved = True
        if not moved:
            return at
    return at
