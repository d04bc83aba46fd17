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

from wamd_server.domain.errors import InvalidInput, NotFound
from wamd_server.domain.models import Device, User
from wamd_server.domain.ports import Clock, DeviceRepository, DeviceScope
from wamd_server.services.devices import scope_of
from wamd_server.services.pacing import HOUR, PacingRules, SendHistory, local_midnight, next_send_at

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

    async def sends_for_pacing(
        self, device_ids: Sequence[UUID], hour_start: datetime, day_start: datetime
    ) -> dict[UUID, tuple[list[datetime], int]]: ...


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
        next_send = await self._next_sends([d for d in devices if stats.get(d.id, {}).get("next_due")], stats, now)
        rows = []
        for device in devices:
            s = stats.get(device.id, {})
            rows.append(
                {
                    "device_id": str(device.id),
                    "name": device.name,
                    "status": device.status.value,
                    "queued": s.get("queued", 0),
                    "sending": s.get("sending", 0),
                    "sent_last_hour": s.get("sent_last_hour", 0),
                    "hourly_cap": device.hourly_cap,
                    "next_send_at": next_send.get(device.id),
                    "paused_reason": device.queue_paused_reason,
                    "pause_kind": device.queue_pause_kind,
                }
            )
        return rows

    async def _next_sends(
        self, devices: Sequence[Device], stats: dict[UUID, dict[str, Any]], now: datetime
    ) -> dict[UUID, datetime]:
        """When each device's next message may go, as its dispatcher works it out: the due time, then the caps,
        quiet hours and the device's shortest gap (a campaign's own gap may hold it longer). None while the
        queue is paused: it waits for a resume."""
        waiting = [d for d in devices if d.queue_paused_reason is None]
        midnight = local_midnight(now, self._tz)
        sends = await self._outbox.sends_for_pacing([d.id for d in waiting], now - HOUR, midnight)
        found = {}
        for device in waiting:
            start = max(stats[device.id]["next_due"], now)
            try:
                rules = PacingRules.for_device(device, self._tz)
            except InvalidInput:  # quiet hours stored unreadable (not through the API): the due time, as before
                found[device.id] = start
                continue
            last_hour, today = sends[device.id]
            if today >= rules.daily_cap_on(now):
                start = max(start, rules.next_local_midnight(now))
            # The sends of the last hour stand for the day's: the daily cap is checked above, for today; after
            # midnight only they count, in the rolling hour.
            found[device.id] = next_send_at(rules, SendHistory(last_hour), start, rules.min_delay_s)
        return found

    async def pause(self, user: User, device_id: UUID) -> None:
        await self._visible(user, device_id)
        await self._control.pause(device_id, "user", "paused by a user")

    async def resume(self, user: User, device_id: UUID) -> None:
        await self._visible(user, device_id)
        await self._control.resume(device_id)

    async def _visible(self, user: User, device_id: UUID) -> None:
        if await self._devices.get(device_id, scope_of(user)) is None:
            raise NotFound("device not found")
