"""Shared time limits (`services/deadlines.py`): each block overrunning its limit ends in TimeoutError, in time,
and nothing else is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from wamd_server.services.deadlines import Deadlines


async def test_a_block_that_overruns_ends_in_timeout_and_one_in_time_does_not() -> None:
    limits = Deadlines(0.2)
    loop = asyncio.get_running_loop()
    with limits.limit():
        await asyncio.sleep(0.01)
    started = loop.time()
    with pytest.raises(TimeoutError), limits.limit():
        await asyncio.sleep(10)
    assert 0.2 <= loop.time() - started < 2.0
    await asyncio.sleep(0.01)  # the task is not left cancelled
    limits.close()


async def test_each_of_many_blocks_ends_at_its_own_deadline() -> None:
    limits = Deadlines(0.3)
    loop = asyncio.get_running_loop()
    ended: dict[int, tuple[str, float]] = {}

    async def block(n: int, run_s: float) -> None:
        started = loop.time()
        try:
            with limits.limit():
                await asyncio.sleep(run_s)
            ended[n] = ("done", loop.time() - started)
        except TimeoutError:
            ended[n] = ("timeout", loop.time() - started)

    # Blocks begin one after another, some ending in time: a timer armed for the first must still end the
    # later ones at their own deadlines, not earlier and not much later.
    tasks = []
    for n, run_s in enumerate([0.05, 10, 0.1, 10, 10]):
        tasks.append(asyncio.create_task(block(n, run_s)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    assert [ended[n][0] for n in range(5)] == ["done", "timeout", "done", "timeout", "timeout"]
    for n in (1, 3, 4):
        assert 0.3 <= ended[n][1] < 1.5
    limits.close()


async def test_a_cancel_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    limits = Deadlines(5.0)

    async def waiting() -> None:
        with limits.limit():
            await asyncio.sleep(10)

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limits.close()


async def test_an_exception_in_the_block_passes_through() -> None:
    limits = Deadlines(5.0)
    with pytest.raises(KeyError), limits.limit():
        await asyncio.sleep(0)
        raise KeyError("x")
    limits.close()


def test_limits_keep_working_when_a_new_event_loop_runs() -> None:
    """A server stopped and started again in one process (as the tests do) runs on a new loop: the timer and loop
    of the old one must not be reused."""
    limits = Deadlines(0.1)

    async def overrun() -> bool:
        try:
            with limits.limit():
                await asyncio.sleep(5)
        except TimeoutError:
            return True
        return False

    assert asyncio.run(overrun())
    assert asyncio.run(overrun())
