"""Device use cases for API callers: visibility, validation, then the worker that owns the device acts."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from wamd_server.domain.errors import Conflict, Forbidden, InvalidInput, NotFound
from wamd_server.domain.models import Device, DevicePatch, DeviceStatus, User
from wamd_server.domain.ports import Clock, DeviceController, DeviceRepository, DeviceScope
from wamd_server.services.phones import normalise_phone

MAX_NAME = 100


def scope_of(user: User) -> DeviceScope:
    return DeviceScope.everything() if user.is_admin else DeviceScope(user.id)


def clean_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidInput(f"name must be 1 to {MAX_NAME} characters", {"field": "name"})
    return name


class DeviceService:
    def __init__(
        self, devices: DeviceRepository, controller: DeviceController, clock: Clock, *, phone_region: str = "MY"
    ) -> None:
        self._devices = devices
        self._controller = controller
        self._clock = clock
        self._region = phone_region

    async def list_page(self, user: User, limit: int, after: tuple[datetime, UUID] | None) -> list[Device]:
        return await self._devices.list_page(scope_of(user), limit, after)

    async def get(self, user: User, device_id: UUID) -> Device:
        # Devices a user may not see do not exist for them: 404, never 403.
        device = await self._devices.get(device_id, scope_of(user))
        if device is None:
            raise NotFound("device not found")
        return device

    async def create(self, user: User, name: str) -> Device:
        return await self._devices.add(clean_name(name), user.id, None if user.is_admin else user.id)

    async def update(self, user: User, device_id: UUID, patch: DevicePatch) -> Device:
        device = await self.get(user, device_id)
        if patch.name is not None:
            patch.name = clean_name(patch.name)
        low = patch.min_delay_s if patch.min_delay_s is not None else device.min_delay_s
        high = patch.max_delay_s if patch.max_delay_s is not None else device.max_delay_s
        if low > high:
            raise InvalidInput("min_delay_s must not exceed max_delay_s", {"field": "min_delay_s"})
        hourly = patch.hourly_cap if patch.hourly_cap is not None else device.hourly_cap
        daily = patch.daily_cap if patch.daily_cap is not None else device.daily_cap
        if hourly > daily:
            raise InvalidInput("hourly_cap must not exceed daily_cap", {"field": "hourly_cap"})
        quiet = {}
        if patch.quiet_start is not None or patch.quiet_end is not None:
            # Quiet hours come as a pair; "" for both removes them.
            start = patch.quiet_start if patch.quiet_start is not None else device.quiet_start
            end = patch.quiet_end if patch.quiet_end is not None else device.quiet_end
            if bool(start) != bool(end):
                raise InvalidInput(
                    'quiet_start and quiet_end go together ("" for both clears them)', {"field": "quiet_start"}
                )
            quiet = {"quiet_start": start or None, "quiet_end": end or None}
            patch.quiet_start = patch.quiet_end = None
        updated = await self._devices.patch(device_id, patch)
        if quiet:
            found = await self._devices.set_fields(device_id, **quiet)
            assert found is not None
            updated = found
        return updated

    async def delete(self, user: User, device_id: UUID) -> None:
        await self.get(user, device_id)
        if not user.is_admin:
            raise Forbidden("only an admin can delete a device")
        await self._controller.remove(device_id)
        await self._devices.delete(device_id)

    async def pair_qr(self, user: User, device_id: UUID) -> Device:
        await self.get(user, device_id)
        await self._controller.pair_qr(device_id)
        return await self.get(user, device_id)

    async def pair_code(self, user: User, device_id: UUID, phone: str) -> str:
        await self.get(user, device_id)
        return await self._controller.pair_code(device_id, normalise_phone(phone, self._region))

    async def current_qr(self, user: User, device_id: UUID) -> tuple[str, datetime]:
        device = await self.get(user, device_id)
        if device.status is not DeviceStatus.PAIRING:
            raise Conflict("the device is not pairing; start with POST /api/devices/{id}/pair")
        if not device.qr_code or not device.qr_expires_at or device.qr_expires_at <= self._clock.now():
            raise Conflict("no QR code yet; the next one arrives as a device.qr event", {"retry_after_s": 1})
        return device.qr_code, device.qr_expires_at

    async def logout(self, user: User, device_id: UUID) -> Device:
        await self.get(user, device_id)
        await self._controller.logout(device_id)
        return await self.get(user, device_id)

    async def refresh(self, user: User, device_id: UUID) -> str:
        await self.get(user, device_id)
        return await self._controller.refresh(device_id)
