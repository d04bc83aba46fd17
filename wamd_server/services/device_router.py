"""Routes device commands to the worker that owns the device: this process's worker when it is the owner,
else another process's worker through `WorkerCommands` (the bus). A device without an owner is first given to
the live worker with the most room."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from wamd_server.domain.errors import NotFound, Unavailable
from wamd_server.domain.ports import DeviceRepository, LeaseRepository, WorkerCommands
from wamd_server.services.worker import DeviceWorker, LeaseTiming, NotOwner

log = logging.getLogger(__name__)

ATTEMPTS = 3
COMMAND_TIMEOUT_S = 45.0  # refresh waits for the connect outcome; pairing by code for WhatsApp's answer


class DeviceRouter:
    def __init__(
        self,
        leases: LeaseRepository,
        devices: DeviceRepository,
        *,
        local: DeviceWorker | None = None,
        remote: WorkerCommands | None = None,
        timing: LeaseTiming | None = None,
    ) -> None:
        self._leases = leases
        self._devices = devices
        self._local = local
        self._remote = remote
        self._timing = timing or (local.timing if local else LeaseTiming())

    async def pair_qr(self, device_id: UUID) -> None:
        await self._route("pair_qr", device_id)

    async def pair_code(self, device_id: UUID, phone: str) -> str:
        return str(await self._route("pair_code", device_id, phone=phone))

    async def logout(self, device_id: UUID) -> None:
        await self._route("logout", device_id)

    async def refresh(self, device_id: UUID) -> str:
        return str(await self._route("refresh", device_id))

    async def remove(self, device_id: UUID) -> None:
        await self._route("remove", device_id)

    async def mark_read(self, device_id: UUID, chat_jid: str, items: list[tuple[str, str | None]]) -> None:
        """Send read receipts for messages of a chat (message id, sender JID), through the device's worker."""
        await self._route("read", device_id, chat=chat_jid, items=[list(i) for i in items])

    async def _route(self, op: str, device_id: UUID, **args: Any) -> Any:
        for _ in range(ATTEMPTS):
            owner = await self._leases.owner(device_id)
            if owner is None:
                target = await self._choose_worker()
                if target is None:
                    raise Unavailable("no device worker is running (start `wamd-server worker`)")
                owner = await self._leases.assign(device_id, target, self._timing.ttl_s)
                if owner is None:  # the device was deleted meanwhile
                    raise NotFound("device not found")
            try:
                if self._local is not None and owner == self._local.id:
                    return await self._local.execute(op, device_id, args)
                if self._remote is None:
                    raise Unavailable(f"device {device_id} is run by worker {owner}, which this process cannot reach")
                return await self._remote.call(owner, op, device_id, args, COMMAND_TIMEOUT_S)
            except NotOwner:
                log.info("device %s moved while routing %s; routing again", device_id, op)
        raise Unavailable("the device is moving between workers; try again in a few seconds")

    async def _choose_worker(self) -> str | None:
        if self._local is not None and len(self._local.held) < self._local.info.capacity:
            return self._local.id
        live = [w for w in await self._leases.live_workers(self._timing.ttl_s) if w.held < w.capacity]
        if not live:
            return None
        return min(live, key=lambda w: (w.held / max(1, w.capacity), w.id)).id
