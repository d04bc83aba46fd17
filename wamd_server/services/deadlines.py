"""One time limit shared by many awaits, kept by a single timer.

`asyncio.timeout` arms a timer per await and cancels it after: for a broadcast that was two timer handles per
message sent (the dispatcher's limit and, then, the transport's), each pushed on the event loop's heap and left there,
cancelled, until the loop sweeps it, which was about a tenth of the sending process's CPU. Here every await of one
`Deadlines` has the same length, so their deadlines fall due in the order they began: a dict in insertion order
holds them, and one timer, armed for the oldest, cancels the awaits that overran. An overrun ends in `TimeoutError`,
as with `asyncio.timeout` (same cancel-and-uncancel handling, so a cancel from elsewhere is never swallowed).
"""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType

_EARLY_S = 0.001  # asyncio may run a timer this little early


class Deadlines:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[int, Limit] = {}  # oldest first: all have the same length
        self._keys = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # of the last limit entered

    def limit(self) -> Limit:
        """`with deadlines.limit(): await ...`: the block may run `seconds`, then `TimeoutError`."""
        return Limit(self)

    def _add(self, limit: Limit) -> int:
        key = next(self._keys)
        self._running[key] = limit
        if self._timer is None or self._timer_loop is not limit.loop:  # (a timer of a loop gone never fires)
            self._arm(limit)
        return key

    def _arm(self, limit: Limit) -> None:
        self._timer = limit.loop.call_at(limit.deadline, self._expire)
        self._timer_loop = limit.loop

    def _remove(self, key: int) -> None:
        # The timer stays armed: it fires for the oldest entry it knew and re-arms for the oldest left, so a
        # block that ends in time costs no timer work at all.
        self._running.pop(key, None)

    def _expire(self) -> None:
        self._timer = None
        running = self._running
        while running:
            key = next(iter(running))
            limit = running[key]
            if limit.loop.is_closed():  # left behind by a loop that ended: no task to cancel
                del running[key]
                continue
            if limit.deadline > limit.loop.time() + _EARLY_S:
                self._arm(limit)
                return
            del running[key]
            limit.expire()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Limit:
    __slots__ = ("_cancelling", "_key", "_owner", "_task", "deadline", "expired", "loop")

    def __init__(self, owner: Deadlines) -> None:
        self._owner = owner
        self.expired = False

    def __enter__(self) -> Limit:
        owner = self._owner
        # The loop of the last limit, if it is this one: asking for the running loop costs a system call.
        loop = owner.loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None or loop is None:
            loop = owner.loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("a time limit is only for code running in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.loop = loop
        self.deadline = loop.time() + owner.seconds
        self._key = self._owner._add(self)
        return self

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._remove(self._key)
        if self.expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
