"""A device worker: holds leases on up to `capacity` devices and runs their sessions through a device pool.

Every tick it renews its leases, lets go of devices whose lease it lost, takes its fair share of linked devices
that nobody holds (a dead worker's devices once their leases expire), and hands back devices that need no
session. A worker that cannot renew its leases stops all its sessions before they could expire (fencing), so
a device is never connected by two workers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from wamd_server.domain.errors import DomainError, InvalidInput
from wamd_server.domain.ports import LeaseRepository, WorkerInfo
from wamd_server.services.device_pool import DevicePool
from wamd_server.services.watchdog import HealthWatchdog, WatchdogSettings

log = logging.getLogger(__name__)

OPS = ("pair_qr", "pair_code", "logout", "refresh", "remove", "read")


class NotOwner(DomainError):
    """The device's lease belongs to another worker (or to none): route the command again."""

    code = "not_owner"


@dataclass(frozen=True)
class LeaseTiming:
    ttl_s: float = 10.0  # a lease lives this long without renewal
    tick_s: float = 2.0  # renew, claim and rebalance this often
    fence_margin_s: float = 3.0  # stop sessions this long before unrenewed leases could expire
    idle_after_s: float = 60.0  # hand back a lease on a device that needs no session after this long
    shed_per_tick: int = 25  # most devices handed to other workers per tick when over the fair share

    @staticmethod
    def for_ttl(ttl_s: float) -> LeaseTiming:
        return LeaseTiming(ttl_s=ttl_s, tick_s=ttl_s / 5, fence_margin_s=ttl_s * 0.3)


class DeviceWorker:
    def __init__(
        self,
        info: WorkerInfo,
        pool: DevicePool,
        leases: LeaseRepository,
        timing: LeaseTiming | None = None,
        *,
        held: set[UUID] | None = None,
        watchdog: WatchdogSettings | None = None,
    ) -> None:
        self.info = info
        self.pool = pool
        self.watchdog = HealthWatchdog(pool, watchdog)
        self._leases = leases
        self.timing = timing or LeaseTiming()
        # Shared with the pool, which drops late events of devices no longer held here. Updated in place.
        self.held: set[UUID] = held if held is not None else set()
        self._renewed_at = 0.0  # monotonic time of the last successful renewal (taken before it was sent)
        self._fenced = False
        self._stopping = False
        self._loop: asyncio.Task[None] | None = None
        self._ticks = 0

    @property
    def id(self) -> str:
        return self.info.id

    async def start(self) -> None:
        await self._leases.register(self.info)
        await self.pool.start()
        await self.tick()
        self._loop = asyncio.create_task(self._run(), name=f"worker-{self.id}")
        self.watchdog.start()

    async def stop(self) -> None:
        await self.watchdog.stop()
        # Keep renewing the leases (but take nothing new) until every session is closed: closing many real
        # WhatsApp clients can outlast a lease, and another worker must not connect a device still open here.
        self._stopping = True
        await self.pool.stop()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        # Hand the devices over at once rather than after the leases expire.
        with contextlib.suppress(Exception):
            await self._leases.forget_worker(self.id)
        self.held.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.timing.tick_s)
            try:
                await self.tick()
            except Exception:
                log.exception("worker %s: tick failed", self.id)

    async def tick(self) -> None:
        started = time.monotonic()
        try:
            held = await self._leases.heartbeat(self.id, self.timing.ttl_s)
        except Exception:
            if started - self._renewed_at > self.timing.ttl_s - self.timing.fence_margin_s and not self._fenced:
                log.error("worker %s: cannot renew leases; stopping all sessions until it can", self.id)
                self._fenced = True
                await self.pool.release_all()
                self.held.clear()
            raise
        self._renewed_at = started
        if self._fenced:
            # Our leases may have gone to other workers meanwhile; start over from what we still hold.
            self._fenced = False
            for device_id in held:
                self.pool.adopt(device_id)
        lost = self.held - held
        self.held.clear()
        self.held.update(held)
        for device_id in lost:
            log.warning("worker %s: lost the lease of device %s; stopping its session", self.id, device_id)
            await self.pool.release(device_id)
        if self._stopping:
            return
        await self._balance()
        self._ticks += 1
        if self._ticks % 5 == 1:
            await self._housekeeping()

    async def _balance(self) -> None:
        live = await self._leases.live_workers(self.timing.ttl_s)
        needing = await self._leases.needing_sessions()
        fair = math.ceil(needing / max(1, len(live)))
        slack = max(1, fair // 20)  # tolerance before handing devices over, so workers do not trade back and forth
        # Devices nobody runs that the other workers have no room for (their capacity is below the even share)
        # are ours to take too, up to our own capacity.
        others = [w for w in live if w.id != self.id]
        others_room = sum(max(0, min(w.capacity, fair + slack) - w.held) for w in others)
        unowned = max(0, needing - len(self.held) - sum(w.held for w in others))
        target = min(self.info.capacity, max(fair + slack, len(self.held) + unowned - others_room))
        if len(self.held) < target:
            for device_id in await self._leases.claim(self.id, target - len(self.held), self.timing.ttl_s):
                self.held.add(device_id)
                self.pool.adopt(device_id)
            return
        others_have_room = any(w.id != self.id and w.held < min(w.capacity, fair) for w in live)
        excess = len(self.held) - (fair + slack)
        if excess > 0 and others_have_room:
            shed = sorted(self.held, key=str)[: min(excess, self.timing.shed_per_tick)]
            log.info("worker %s: handing %d devices to other workers", self.id, len(shed))
            for device_id in shed:
                await self.pool.release(device_id, moving=True)
            await self._leases.release(self.id, shed)
            self.held.difference_update(shed)

    async def _housekeeping(self) -> None:
        idle = [
            d for d in await self._leases.idle_leases(self.id, self.timing.idle_after_s) if not self.pool.is_live(d)
        ]
        if idle:
            await self._leases.release(self.id, idle)
            self.held.difference_update(idle)
        for device_id in await self._leases.orphaned_pairings():
            await self.pool.reset_interrupted_pairing(device_id)
        await self._leases.prune_workers(older_than_s=3600)

    async def execute(self, op: str, device_id: UUID, args: dict[str, Any]) -> Any:
        """Run a device command here if this worker owns the device (raises `NotOwner` otherwise)."""
        if op not in OPS:
            raise InvalidInput(f"unknown device command {op!r}")
        if device_id not in self.held:
            if self._fenced or await self._leases.owner(device_id) != self.id:
                raise NotOwner(f"device {device_id} is not run by worker {self.id}")
            self.held.add(device_id)
        if op == "pair_qr":
            await self.pool.pair_qr(device_id)
            return None
        if op == "pair_code":
            return await self.pool.pair_code(device_id, str(args["phone"]))
        if op == "logout":
            await self.pool.logout(device_id)
            return None
        if op == "refresh":
            return await self.pool.refresh(device_id)
        if op == "read":
            await self.pool.mark_read(device_id, str(args["chat"]), [(str(i), s) for i, s in args["items"]])
            return None
        await self.pool.remove(device_id)
        await self._leases.release(self.id, [device_id])
        self.held.discard(device_id)
        return None
