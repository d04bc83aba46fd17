"""The real clock (tests of pacing substitute an accelerated one through the `Clock` port)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), max(seconds, 0.0))
        except TimeoutError:
            return event.is_set()
        return True


class AcceleratedClock(SystemClock):
    """Time running `factor` times faster than the wall clock, from `start` (for pacing tests and demos)."""

    def __init__(self, factor: float, start: datetime | None = None) -> None:
        self.factor = factor
        self._origin = start or datetime.now(UTC)
        self._t0 = time.monotonic()

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=(time.monotonic() - self._t0) * self.factor)

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds / self.factor)

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        return await super().wait(event, seconds / self.factor)
