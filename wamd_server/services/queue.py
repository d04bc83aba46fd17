"""Pausing and resuming a device's send queue.

Three things pause a queue on their own: a run of failed sends (`failures`), a temporary ban (`ban`) and a
logout (`logout`); a user can pause it too (`user`). Ban and logout pauses lift themselves when the device is
online again; the others need a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID
from zoneinfo import ZoneInfo

from wamd_server.domain.errors import NotFound
from wamd_server.domain.models import User
from wamd_server.domain.ports import Clock, DeviceRepository, DeviceScope
from wamd_server.services.devices import scope_of
from wamd_server.services.pacing import DAY, HOUR, PacingRules, SendHistory, next_send_at

SELF_LIFTING = frozenset({"ban", "logout"})


class QueueControl:
    def __init__(self, devices: DeviceRepository, clock: Clock) -> None:
        self._devices = devices
        self._clock = clock

    async def pause(self, device_id: UUID, kind: str, reason: str) -> None:
        await self._devices.set_fields(
            device_id, queue_paused_reason=reason, queue_pause_kind=kind, queue_paused_at=self._clock.now()
        )

    async def resume(self, device_id: UUID) -> None:
        await self._devices.set_fields(device_id, queue_paused_reason=None, queue_pause_kind=None, queue_paused_at=None)

    async def lift_if_self_lifting(self, device_id: UUID) -> bool:
        device = await self._devices.get(device_id, DeviceScope.everything())
        if device is not None and device.queue_pause_kind in SELF_LIFTING:
            await self.resume(device_id)
            return True
        return False


class QueueOverview(Protocol):
    async def queue_overview(self, device_ids: Sequence[UUID] | None, now: datetime) -> dict[UUID, dict[str, Any]]: ...

    async def sent_since_many(self, device_ids: Sequence[UUID], since: datetime) -> dict[UUID, list[datetime]]: ...


class QueueService:
    """`GET /api/queue`: per device the caller may see, what waits, what went out lately, and why it is paused."""

    def __init__(
        self, devices: DeviceRepository, outbox: QueueOverview, control: QueueControl, clock: Clock, tz: ZoneInfo
    ) -> None:
        self._devices = devices
        self._outbox = outbox
        self._control = control
        self._clock = clock
        self._tz = tz

    async def overview(self, user: User) -> list[dict[str, Any]]:
        devices = await self._devices.list_page(scope_of(user), 100_000, None)
        now = self._clock.now()
        stats = await self._outbox.queue_overview([d.id for d in devices], now)
        waiting = [d.id for d in devices if stats.get(d.id, {}).get("next_due") is not None]
        # The sends pacing counts: the rolling hour and the local day (at most 25 hours when clocks go back).
        sends = await self._outbox.sent_since_many(waiting, now - DAY - 2 * HOUR)
        rows = []
        for device in devices:
            s = stats.get(device.id, {})
            next_due = s.get("next_due")
            if next_due is not None:
                # What the device's dispatcher waits for: the due time, then caps, quiet hours and the shortest gap.
                rules = PacingRules.for_device(device, self._tz)
                next_due = next_send_at(rules, SendHistory(sends[device.id]), max(next_due, now), rules.min_delay_s)
            rows.append(
                {
                    "device_id": str(device.id),
                    "name": device.name,
                    "status": device.status.value,
                    "queued": s.get("queued", 0),
                    "sending": s.get("sending", 0),
                    "sent_last_hour": s.get("sent_last_hour", 0),
                    "hourly_cap": device.hourly_cap,
                    "next_send_at": next_due,
                    "paused_reason": device.queue_paused_reason,
                    "pause_kind": device.queue_pause_kind,
                }
            )
        return rows

    async def pause(self, user: User, device_id: UUID) -> None:
        await self._visible(user, device_id)
        await self._control.pause(device_id, "user", "paused by a user")

    async def resume(self, user: User, device_id: UUID) -> None:
        await self._visible(user, device_id)
        await self._control.resume(device_id)

    async def _visible(self, user: User, device_id: UUID) -> None:
        if await self._devices.get(device_id, scope_of(user)) is None:
            raise NotFound("device not found")
