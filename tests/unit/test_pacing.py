"""Pacing rules: gaps, rolling hourly cap, daily cap per local day, warm-up, quiet hours (pure, no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from wamd_server.domain.errors import InvalidInput
from wamd_server.services.pacing import (
    PacingRules,
    SendAllowance,
    SendHistory,
    next_send_at,
    parse_clock_time,
)

KL = ZoneInfo("Asia/Kuala_Lumpur")


def rules(**overrides: object) -> PacingRules:
    values: dict[str, object] = {"min_delay_s": 10, "max_delay_s": 30, "hourly_cap": 5, "daily_cap": 8, "tz": KL}
    values.update(overrides)
    return PacingRules(**values)  # type: ignore[arg-type]


def local(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=KL).astimezone(UTC)


def test_the_gap_follows_the_last_send() -> None:
    history = SendHistory([local(1, 10)])
    assert next_send_at(rules(), history, local(1, 10) + timedelta(seconds=3), 20) == local(1, 10) + timedelta(
        seconds=20
    )
    assert next_send_at(rules(), history, local(1, 11), 20) == local(1, 11)


def test_gaps_are_drawn_within_min_and_max() -> None:
    rng = random.Random(7)
    gaps = [rules().gap(rng) for _ in range(1000)]
    assert min(gaps) >= 10 and max(gaps) <= 30
    assert rules().gap(rng, 2.0, 2.0) == 2.0  # a campaign's own fixed delay wins over the device's


def test_rolling_hourly_cap_waits_for_the_oldest_send_to_leave_the_hour() -> None:
    sends = [local(1, 10, m) for m in (0, 10, 20, 30, 40)]
    at = next_send_at(rules(), SendHistory(sends), local(1, 10, 45), 0)
    assert at > local(1, 11, 0) and at - local(1, 11, 0) < timedelta(seconds=1)


def test_daily_cap_counts_per_local_day_and_resumes_at_local_midnight() -> None:
    # 8 sends spread so the hourly cap never bites: the 9th waits for midnight in Kuala Lumpur, not UTC.
    sends = [local(1, h) for h in range(9, 17)]
    at = next_send_at(rules(hourly_cap=100), SendHistory(sends), local(1, 18), 0)
    assert at == local(2, 0)


def test_warm_up_ramps_the_daily_cap() -> None:
    ramp = rules(daily_cap=100, warmup_days=4, linked_at=local(1, 9))
    assert [ramp.daily_cap_on(local(d, 12)) for d in (1, 2, 3, 4, 5, 30)] == [25, 50, 75, 100, 100, 100]
    assert rules(daily_cap=100).daily_cap_on(local(1, 12)) == 100


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (local(1, 22, 30), local(2, 8)),  # evening part of a window crossing midnight
        (local(2, 7, 59), local(2, 8)),  # morning part
        (local(2, 8, 0), None),
        (local(1, 21, 59), None),
    ],
)
def test_quiet_hours_crossing_midnight(now: datetime, expected: datetime | None) -> None:
    quiet = rules(quiet_start=time(22), quiet_end=time(8))
    assert quiet.quiet_until(now) == expected
    assert next_send_at(quiet, SendHistory(), now, 0) == (expected or now)


def test_quiet_hours_within_a_day() -> None:
    lunch = rules(quiet_start=time(12), quiet_end=time(14))
    assert lunch.quiet_until(local(1, 13)) == local(1, 14)
    assert lunch.quiet_until(local(1, 15)) is None


def test_rules_combine_a_cap_that_ends_inside_quiet_hours() -> None:
    r = rules(hourly_cap=2, quiet_start=time(22), quiet_end=time(8))
    history = SendHistory([local(1, 21, 30), local(1, 21, 40)])
    assert next_send_at(r, history, local(1, 21, 50), 0) == local(2, 8)


def test_clock_times_are_validated() -> None:
    assert parse_clock_time("07:30", "quiet_start") == time(7, 30)
    with pytest.raises(InvalidInput):
        parse_clock_time("7h", "quiet_start")


def sends_allowed(r: PacingRules, history: SendHistory, start: datetime, step: timedelta, most: int) -> int:
    """Back-to-back sends (one every `step`) the allowance lets through from `start`, recording each."""
    allowance = SendAllowance(r, history)
    now, count = start, 0
    while count < most and allowance.take(now):
        history.add(now)
        count += 1
        now += step
    return count


def test_an_allowance_of_back_to_back_sends_stops_where_a_cap_would() -> None:
    history = SendHistory([local(1, 10, m) for m in (0, 10, 20)])
    # Hourly cap 5, three sends in the last hour: two more now; each one is what `next_send_at` allows too.
    start = local(1, 10, 30)
    assert sends_allowed(rules(min_delay_s=0, max_delay_s=0), history, start, timedelta(seconds=1), 10) == 2
    assert next_send_at(rules(), history, start + timedelta(seconds=2), 0) > start + timedelta(minutes=29)
    # Daily cap 8 with no hourly cap: what is left of the local day.
    day = SendHistory([local(1, h) for h in range(9, 15)])
    assert sends_allowed(rules(hourly_cap=0), day, local(1, 16), timedelta(seconds=1), 10) == 2


def test_an_allowance_ends_when_quiet_hours_or_a_new_day_begin() -> None:
    quiet = rules(hourly_cap=0, daily_cap=1000, quiet_start=time(22), quiet_end=time(8))
    allowance = SendAllowance(quiet, SendHistory())
    allowance.renew(local(1, 21, 59))
    assert allowance.until == local(1, 22)
    assert allowance.take(local(1, 21, 59, 59)) and not allowance.take(local(1, 22))
    assert not allowance.take(local(2, 7, 59))  # inside quiet hours: nothing
    assert allowance.take(local(2, 8))  # after them: worked out afresh
    plain = SendAllowance(rules(hourly_cap=0, daily_cap=1000), SendHistory())
    plain.renew(local(1, 23))
    assert plain.until == local(2, 0)  # the next day counts afresh
    # A warm-up cap is the day's: 25 on the first day of four.
    ramp = SendAllowance(rules(hourly_cap=0, daily_cap=100, warmup_days=4, linked_at=local(1, 9)), SendHistory())
    ramp.renew(local(1, 12))
    assert ramp.left == 25


NEW_YORK = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("tz", "day"),
    [
        (KL, datetime(2026, 12, 2, tzinfo=KL)),
        (NEW_YORK, datetime(2026, 3, 8, tzinfo=NEW_YORK)),  # clocks go forward at 02:00
        (NEW_YORK, datetime(2026, 11, 1, tzinfo=NEW_YORK)),  # clocks go back at 02:00
    ],
)
def test_every_send_an_allowance_lets_through_is_one_next_send_at_allows_then(tz: ZoneInfo, day: datetime) -> None:
    rng = random.Random(11)
    for _ in range(300):
        r = rules(
            tz=tz,
            min_delay_s=0,
            max_delay_s=0,
            hourly_cap=rng.choice([0, 3, 10]),
            daily_cap=rng.choice([5, 20]),
            quiet_start=rng.choice([None, time(22), time(12), time(2, 30), time(1, 30)]),
            quiet_end=rng.choice([None, time(8), time(14), time(2, 15)]),
            warmup_days=rng.choice([0, 3]),
            linked_at=(day - timedelta(days=1)).astimezone(UTC),
        )
        start = (day + timedelta(minutes=rng.randrange(-120, 24 * 60))).astimezone(UTC)
        history = SendHistory(start - timedelta(minutes=rng.randrange(1, 1500)) for _ in range(rng.randrange(25)))
        allowance = SendAllowance(r, history)
        now = start
        for _ in range(40):
            if not allowance.take(now):
                break
            assert next_send_at(r, history, now, 0) == now, (r, now)
            history.add(now)
            now += timedelta(seconds=rng.choice([1, 60, 900]))


def test_an_allowance_ends_when_the_clock_is_set_back() -> None:
    # Five sends late on the 1st reach its daily cap; an allowance renewed early on the 2nd must not let a send
    # through once the clock reads the 1st again.
    r = rules(hourly_cap=0, daily_cap=5)
    history = SendHistory([local(1, 23, m) for m in range(5)])
    allowance = SendAllowance(r, history)
    assert allowance.take(local(2, 0, 5))
    assert not allowance.take(local(1, 23, 50))
    assert next_send_at(r, history, local(1, 23, 50), 0) == local(2, 0)


def test_quiet_hours_starting_in_a_skipped_hour_end_an_allowance_no_later_than_they_begin() -> None:
    # New York skips 02:00-03:00 on 8 March 2026: quiet hours from 02:30 begin when the clocks jump (03:00 EDT).
    ny = ZoneInfo("America/New_York")
    r = rules(hourly_cap=0, daily_cap=1000, tz=ny, quiet_start=time(2, 30), quiet_end=time(6))
    allowance = SendAllowance(r, SendHistory())
    allowance.renew(datetime(2026, 3, 8, 1, 50, tzinfo=ny).astimezone(UTC))
    jump = datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    assert allowance.until <= jump
    assert r.quiet_until(jump) is not None  # quiet from the jump on, as `next_send_at` sees it
    assert not allowance.take(jump + timedelta(minutes=10))
