"""`wamd-server --workers K`: runs K `wamd-server worker` processes beside the API and restarts any that dies.

Workers are separate processes so that one crash of the WhatsApp native library costs only that worker's
devices a reconnect (another worker takes them over when their leases expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

log = logging.getLogger(__name__)

RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a worker that ran this long starts its restart backoff over
STOP_TIMEOUT_S = 20.0


class WorkerSupervisor:
    def __init__(self, count: int, capacity: int) -> None:
        self.count = count
        self.capacity = capacity
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for slot in range(self.count):
            await self._spawn(slot)
            self._watchers.append(asyncio.create_task(self._watch(slot), name=f"supervise-worker-{slot}"))

    async def _spawn(self, slot: int) -> None:
        self.processes[slot] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wamd_server", "worker", "--capacity", str(self.capacity)
        )
        log.info("started worker %d (pid %d)", slot, self.processes[slot].pid)

    async def _watch(self, slot: int) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            code = await self.processes[slot].wait()
            if self.stopping():
                return
            failures = 0 if time.monotonic() - started > STABLE_AFTER_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.0f s", slot, self.processes[slot].pid, code, delay
            )
            await asyncio.sleep(delay)
            if self.stopping():
                return
            await self._spawn(slot)
            self.restarts += 1

    def stopping(self) -> bool:
        return self._stopping

    async def stop(self) -> None:
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for proc in self.processes.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.processes.values():
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
