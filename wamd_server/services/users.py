"""User administration: creating users, roles, deactivation and device grants."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from uuid import UUID

from wamd_server.domain.errors import Conflict, InvalidInput, NotFound
from wamd_server.domain.models import Role, User
from wamd_server.domain.ports import DeviceRepository, UserRepository
from wamd_server.services.passwords import MAX_PASSWORD, MIN_PASSWORD, hash_password

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not EMAIL.match(email):
        raise InvalidInput(f"not a valid email address: {email!r}", {"field": "email"})
    return email


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidInput(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters", {"field": "password"})


class UserService:
    def __init__(self, users: UserRepository, devices: DeviceRepository) -> None:
        self._users = users
        self._devices = devices
        # SQLite has no row locks: within one process, admin-count checks and changes take turns here.
        self._admin_changes = asyncio.Lock()

    async def create(self, email: str, password: str, role: Role = Role.STAFF, name: str = "") -> User:
        email = normalise_email(email)
        check_password(password)
        return await self._users.add(email, await hash_password(password), role, name.strip())

    async def ensure_admin(self, email: str, password: str) -> bool:
        """Create the first admin from configuration unless that account exists; True when created."""
        email = normalise_email(email)
        if await self._users.by_email(email) is not None:
            return False
        try:
            await self.create(email, password, Role.ADMIN, "Administrator")
        except Conflict:  # another process created it at the same moment
            return False
        return True

    async def get(self, user_id: UUID) -> User:
        user = await self._users.get(user_id)
        if user is None:
            raise NotFound("user not found")
        return user

    async def list_page(self, limit: int, after: UUID | None) -> list[User]:
        return await self._users.list_page(limit, after)

    async def update(
        self,
        actor: User,
        user_id: UUID,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
        password: str | None = None,
    ) -> User:
        target = await self.get(user_id)
        # Only an active admin counts: demoting or deactivating an inactive one leaves the active admins as they are.
        demoting = target.is_admin and target.is_active and (role is Role.STAFF or is_active is False)
        if password is not None:
            check_password(password)
        password_hash = await hash_password(password) if password is not None else None
        async with self._admin_changes:
            updated = await self._users.update(
                user_id,
                name=name.strip() if name is not None else None,
                role=role,
                is_active=is_active,
                password_hash=password_hash,
                keep_an_admin=demoting,
            )
        if updated is None:
            raise NotFound("user not found")
        return updated

    async def delete(self, actor: User, user_id: UUID) -> None:
        target = await self.get(user_id)
        if target.id == actor.id:
            raise Conflict("you cannot delete your own account")
        async with self._admin_changes:
            await self._users.delete(user_id, keep_an_admin=target.is_admin and target.is_active)

    async def grants(self, user_id: UUID) -> set[UUID]:
        await self.get(user_id)
        return await self._users.granted_device_ids(user_id)

    async def set_grants(self, user_id: UUID, device_ids: Sequence[UUID]) -> set[UUID]:
        await self.get(user_id)
        unknown = set(device_ids) - await self._devices.exists(device_ids)
        if unknown:
            raise InvalidInput("unknown device ids", {"device_ids": sorted(str(d) for d in unknown)})
        await self._users.set_grants(user_id, device_ids)
        return set(device_ids)
