"""Health watchdog: finds devices whose WhatsApp link stopped answering and has them reconnected.

A device counts as unhealthy when its session fails `failures_to_act` probes in a row, or when a send got no
server ack in time (the dispatcher reports that). The pool then marks it and reconnects it with backoff,
unless a user logged it out or WhatsApp banned it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from uuid import UUID

from wamd_server.services.device_pool import DevicePool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchdogSettings:
    interval_s: float = 30.0  # between probe rounds
    probe_timeout_s: float = 10.0
    failures_to_act: int = 2  # failed probes in a row before the device is reconnected
    send_ack_timeout_s: float = 30.0  # a send without a server ack after this long makes the device suspect
    concurrency: int = 50  # probes in flight at once


class HealthWatchdog:
    def __init__(self, pool: DevicePool, settings: WatchdogSettings | None = None) -> None:
        self.pool = pool
        self.settings = settings or WatchdogSettings()
        self._failures: dict[UUID, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await self.check_once()
            except Exception:
                log.exception("health check round failed")

    async def check_once(self) -> list[UUID]:
        """Probe every online device once; returns the devices sent to reconnect."""
        online = self.pool.online_devices()
        answers: dict[UUID, bool] = {}
        turns = iter(online)

        async def prober() -> None:
            # A few probers take the devices in turn: a task per device meant thousands of tasks every round.
            for device_id in turns:
                try:
                    answers[device_id] = await self.pool.transport.probe(device_id, self.settings.probe_timeout_s)
                except Exception:  # one device's trouble must not end the round for the others
                    log.exception("device %s: probe failed", device_id)
                    answers[device_id] = False

        await asyncio.gather(*(prober() for _ in range(min(self.settings.concurrency, len(online)))))
        acted = []
        for device_id in online:
            if answers[device_id]:
                self._failures.pop(device_id, None)
                continue
            failures = self._failures[device_id] = self._failures.get(device_id, 0) + 1
            if failures >= self.settings.failures_to_act:
                self._failures.pop(device_id, None)
                log.warning("device %s: link not answering (%d probes); reconnecting", device_id, failures)
                await self.pool.suspect(device_id, "WhatsApp link not answering")
                acted.append(device_id)
        for device_id in set(self._failures) - set(online):
            self._failures.pop(device_id, None)
        return acted

    async def send_unacked(self, device_id: UUID) -> None:
        """A send got no server ack within `send_ack_timeout_s`."""
        await self.pool.suspect(device_id, f"a send got no server ack within {self.settings.send_ack_timeout_s:.0f} s")
