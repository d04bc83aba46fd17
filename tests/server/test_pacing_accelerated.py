"""Pacing on the simulator with an accelerated clock (200 times real time): hourly and daily caps hold, gaps stay
within min..max, and nothing is sent during quiet hours."""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from tests.conftest import ServerFactory, eventually
from wamd_server.infra.db.tables import outbox
from wamd_server.services.clock import AcceleratedClock

KL = ZoneInfo("Asia/Kuala_Lumpur")
FACTOR = 200
MIN_GAP, MAX_GAP, HOURLY, DAILY = 30.0, 60.0, 10, 25
QUIET = ("10:00", "11:00")
LEADS_PER_DEVICE = 30
# Scheduling jitter: every real millisecond of event-loop or database delay is 0.2 s at this speed, so a gap may
# run over max by that much (never under min: pacing only ever waits longer). Stalls of the whole process (the
# machine busy with other work) are measured and allowed on top; see `LoopStalls`.
TOLERANCE = timedelta(seconds=30)


@pytest.fixture(autouse=True)
def no_long_collector_pauses() -> Iterator[None]:
    """Late in a test session a full collection of the garbage collector walks every object earlier tests left
    (0.2 s and more): minutes of this test's timeline. As `wamd-server` does with its start-up objects
    (`gc_tuning.freeze_startup_objects`), what exists before the test is kept out of the collector's walks."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


class LoopStalls:
    """When the event loop could not run on time, in the test's timeline. On a shared machine the process can be
    held up for a tenth of a second or more (20 s and more at this speed); a send due meanwhile goes out late by
    that much, which says nothing about pacing."""

    def __init__(self, clock: AcceleratedClock) -> None:
        self.clock = clock
        self.ends: list[datetime] = []  # when each stall ended
        self.lengths: list[timedelta] = []
        self.tick = 0.01  # real seconds between looks

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick)
            late = loop.time() - before - self.tick
            if late > 0.002:
                self.ends.append(self.clock.now())
                self.lengths.append(timedelta(seconds=late * FACTOR))

    def between(self, start: datetime, end: datetime) -> timedelta:
        """Time lost to stalls that ended after `start` and by `end` (or a tick after it: the watcher may see a
        stall's end just after the send that came out of it)."""
        lo = bisect.bisect_right(self.ends, start)
        hi = bisect.bisect_right(self.ends, end + timedelta(seconds=2 * self.tick * FACTOR))
        return sum(self.lengths[lo:hi], timedelta())


async def test_caps_gaps_and_quiet_hours_hold(make_server: ServerFactory, database_url: str) -> None:
    # Setting up (server start, pairing, leads) takes about a real second; 9 s (30 minutes at this speed) are left
    # for it before the launch.
    clock = AcceleratedClock(FACTOR, start=datetime(2026, 12, 1, 8, 0, tzinfo=KL).astimezone(UTC))
    stalls = LoopStalls(clock)
    watching = asyncio.create_task(stalls.watch())
    try:
        await _run_paced_campaign(make_server, database_url, clock, stalls)
    finally:
        watching.cancel()


async def _run_paced_campaign(
    make_server: ServerFactory, database_url: str, clock: AcceleratedClock, stalls: LoopStalls
) -> None:
    start = clock.now()
    launch = datetime(2026, 12, 1, 8, 30, tzinfo=KL)
    server = await make_server(database_url, clock=clock, WAMD_TIMEZONE="Asia/Kuala_Lumpur")
    ws = await server.ws()
    devices = []
    for n in range(2):
        device = await server.create_device(f"Paced {n}")
        await server.pair_by_qr(device["id"], f"6012310000{n}", ws)
        settings = {
            "min_delay_s": MIN_GAP,
            "max_delay_s": MAX_GAP,
            "hourly_cap": HOURLY,
            "daily_cap": DAILY,
            "quiet_start": QUIET[0],
            "quiet_end": QUIET[1],
            "typing": True,
        }
        devices.append(await server.ok("PATCH", f"/api/devices/{device['id']}", json=settings))
    for n in range(LEADS_PER_DEVICE * 2):
        lead = {"name": f"L{n}", "phone": f"+6019{n:07d}", "device_id": devices[n % 2]["id"], "niche": "x"}
        await server.ok("POST", "/api/leads", json=lead)
    assert clock.now() < launch, "setting up took too long for this test's timeline"
    campaign = {"title": "Paced", "message": "Hello {name}", "niche": "x", "scheduled_at": launch.isoformat()}
    await server.ok("POST", "/api/campaigns", json=campaign)

    engine = server.runtime.engine
    assert engine is not None
    # By then each device has sent 10 (hourly cap) from 08:30, 10 more from about 09:30, nothing in quiet hours,
    # and the last 5 of its daily cap from 11:00.
    end = datetime(2026, 12, 1, 11, 30, tzinfo=KL)

    async def past_end() -> bool:
        return clock.now() >= end

    await eventually(past_end, timeout=(end - start).total_seconds() / FACTOR + 30)

    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.device_id, outbox.c.sent_at, outbox.c.status))).all()
    for device in devices:
        mine = [r for r in rows if str(r.device_id) == device["id"]]
        sent = sorted(r.sent_at for r in mine if r.status == "sent")
        # The daily cap was reached and not exceeded; the rest waits for tomorrow.
        assert len(sent) == DAILY, [t.astimezone(KL).isoformat() for t in sent]
        assert sum(1 for r in mine if r.status == "queued") == LEADS_PER_DEVICE - DAILY
        for t in sent:
            local = t.astimezone(KL)
            assert local.hour != 10, f"sent during quiet hours at {local}"
            in_hour = bisect.bisect_right(sent, t) - bisect.bisect_right(sent, t - timedelta(hours=1))
            assert in_hour <= HOURLY, f"{in_hour} sends in the hour up to {local}"
        for earlier, later in itertools.pairwise(sent):
            gap = later - earlier
            assert gap >= timedelta(seconds=MIN_GAP), f"gap {gap} before {later.astimezone(KL)}"
            slack = TOLERANCE + stalls.between(earlier, later)
            if gap > timedelta(seconds=MAX_GAP) + slack:
                # A long gap is only allowed where a cap or quiet hours held the device back.
                hour_full = bisect.bisect_right(sent, earlier) - bisect.bisect_right(sent, earlier - timedelta(hours=1))
                quiet_end = later.astimezone(KL).replace(hour=11, minute=0, second=0, microsecond=0)
                assert hour_full >= HOURLY or timedelta() <= later - quiet_end <= slack, (
                    f"gap {gap} before {later.astimezone(KL)} without a cap or quiet hours"
                )
