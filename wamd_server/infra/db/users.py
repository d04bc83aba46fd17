"""Users, their API tokens and their device grants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wamd_server.domain.errors import Conflict
from wamd_server.domain.models import Role, User
from wamd_server.domain.ports import Credentials
from wamd_server.infra.db.tables import api_tokens, device_grants, users

USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.role,
    users.c.name,
    users.c.is_active,
    users.c.created_at,
    users.c.last_login_at,
)


def _user(row: RowMapping) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        role=Role(row["role"]),
        name=row["name"],
        is_active=row["is_active"],
        created_at=row["created_at"],
        last_login_at=row["last_login_at"],
    )


class SqlUserRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, email: str, password_hash: str, role: Role, name: str) -> User:
        now = datetime.now(UTC)
        user_id = uuid.uuid4()
        values = {
            "id": user_id,
            "email": email,
            "password_hash": password_hash,
            "role": role.value,
            "name": name,
            "is_active": True,
            "created_at": now,
            "updated_at": now,
        }
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(users).values(values))
        except IntegrityError:
            raise Conflict(f"a user with email {email} already exists") from None
        return User(id=user_id, email=email, role=role, name=name, is_active=True, created_at=now)

    async def get(self, user_id: UUID) -> User | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(*USER_COLUMNS).where(users.c.id == user_id))).mappings().first()
        return _user(row) if row else None

    async def by_email(self, email: str) -> Credentials | None:
        query = select(*USER_COLUMNS, users.c.password_hash).where(users.c.email == email)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return Credentials(_user(row), row["password_hash"]) if row else None

    async def list_page(self, limit: int, after: UUID | None) -> list[User]:
        query = select(*USER_COLUMNS).order_by(users.c.id).limit(limit)
        if after is not None:
            query = query.where(users.c.id > after)
        async with self._engine.connect() as conn:
            return [_user(r) for r in (await conn.execute(query)).mappings()]

    async def update(
        self,
        user_id: UUID,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
        password_hash: str | None = None,
        keep_an_admin: bool = False,
    ) -> User | None:
        values: dict[str, Any] = {"updated_at": datetime.now(UTC)}
        if name is not None:
            values["name"] = name
        if role is not None:
            values["role"] = role.value
        if is_active is not None:
            values["is_active"] = is_active
        if password_hash is not None:
            values["password_hash"] = password_hash
        async with self._engine.begin() as conn:
            if keep_an_admin:
                await self._ensure_another_admin(conn, user_id)
            await conn.execute(update(users).where(users.c.id == user_id).values(values))
            if is_active is False or password_hash is not None:
                # Deactivation and password changes end every open session of that user.
                await conn.execute(delete(api_tokens).where(api_tokens.c.user_id == user_id))
        return await self.get(user_id)

    async def delete(self, user_id: UUID, *, keep_an_admin: bool = False) -> bool:
        async with self._engine.begin() as conn:
            if keep_an_admin:
                await self._ensure_another_admin(conn, user_id)
            result = await conn.execute(delete(users).where(users.c.id == user_id))
        return bool(result.rowcount)

    @staticmethod
    async def _ensure_another_admin(conn: AsyncConnection, user_id: UUID) -> None:
        """Raise unless an active admin other than `user_id` remains. Locks every active admin row, in id order
        so concurrent callers queue instead of deadlocking; the loser then sees the winner's change."""
        admins = (
            select(users.c.id)
            .where(users.c.role == Role.ADMIN.value, users.c.is_active)
            .order_by(users.c.id)
            .with_for_update()
        )
        if not [a for a in (await conn.execute(admins)).scalars() if a != user_id]:
            raise Conflict("the last active admin cannot be demoted, deactivated or deleted")

    async def touch_login(self, user_id: UUID, at: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(update(users).where(users.c.id == user_id).values(last_login_at=at))

    async def granted_device_ids(self, user_id: UUID) -> set[UUID]:
        query = select(device_grants.c.device_id).where(device_grants.c.user_id == user_id)
        async with self._engine.connect() as conn:
            return set((await conn.execute(query)).scalars())

    async def set_grants(self, user_id: UUID, device_ids: Sequence[UUID]) -> None:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await conn.execute(delete(device_grants).where(device_grants.c.user_id == user_id))
            if device_ids:
                rows = [{"user_id": user_id, "device_id": d, "created_at": now} for d in dict.fromkeys(device_ids)]
                await conn.execute(insert(device_grants), rows)


class SqlTokenRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, user_id: UUID, token_hash: str, expires_at: datetime) -> None:
        values = {
            "id": uuid.uuid4(),
            "user_id": user_id,
            "token_hash": token_hash,
            "created_at": datetime.now(UTC),
            "expires_at": expires_at,
        }
        async with self._engine.begin() as conn:
            await conn.execute(insert(api_tokens).values(values))

    async def user_for(self, token_hash: str, now: datetime) -> User | None:
        query = (
            select(*USER_COLUMNS)
            .join(api_tokens, api_tokens.c.user_id == users.c.id)
            .where(api_tokens.c.token_hash == token_hash, api_tokens.c.expires_at > now, users.c.is_active)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return _user(row) if row else None

    async def delete(self, token_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(api_tokens).where(api_tokens.c.token_hash == token_hash))

    async def delete_for_user(self, user_id: UUID) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(api_tokens).where(api_tokens.c.user_id == user_id))

    async def purge_expired(self, now: datetime) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(api_tokens).where(api_tokens.c.expires_at <= now))
        return int(result.rowcount or 0)
