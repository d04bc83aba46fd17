"""`wamd-server --workers K`: the API process runs K worker processes and starts a new one when one dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.conftest import libpq_url
from tests.e2e.processes import start_stack, wamd_server


def live_worker_pids(pg_url: str) -> set[int]:
    dsn = libpq_url(pg_url)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT pid FROM workers WHERE heartbeat_at > now() - interval '5 s'").fetchall()
    return {int(r[0]) for r in rows}


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_killed_worker_process_is_started_again(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    stack = await start_stack(tmp_path, pg_url, redis_url, "sup")
    env, sim, port = stack.env, stack.sim, stack.api_port
    server = wamd_server(env, tmp_path, "--workers", "2")
    server.start()
    try:
        await server.wait_http(f"http://127.0.0.1:{port}/api/health")
        await wait_for(lambda: len(live_worker_pids(pg_url)) == 2, 30, "two workers did not start")
        first = live_worker_pids(pg_url)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await wait_for(
            lambda: len(live_worker_pids(pg_url) - first) == 1 and victim not in live_worker_pids(pg_url),
            40,
            "the killed worker was not replaced",
        )
        assert "restarting" in server.text()
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.text()
        sim.stop()
    # Stopping the API stops its workers too.
    await wait_for(lambda: not live_worker_pids(pg_url), 15, "workers outlived the API process")
