"""Devices, scoped by who may see them."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Select, and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.domain.models import RECONNECTABLE, Device, DevicePatch, DeviceStatus
from wamd_server.domain.ports import DeviceScope
from wamd_server.infra.db.engine import driver_connection, is_postgres
from wamd_server.infra.db.tables import chats, device_grants, devices, messages, outbox_failed, outbox_sent
from wamd_server.infra.db.types import UtcDateTime

DEVICE_FIELDS = frozenset(
    {
        "name",
        "phone",
        "jid",
        "status",
        "status_reason",
        "last_seen_at",
        "min_delay_s",
        "max_delay_s",
        "hourly_cap",
        "daily_cap",
        "qr_code",
        "qr_expires_at",
        "banned_until",
        "linked_at",
        "quiet_start",
        "quiet_end",
        "warmup_days",
        "typing",
        "queue_paused_reason",
        "queue_pause_kind",
        "queue_paused_at",
    }
)


def device_from_row(row: RowMapping | Mapping[str, Any]) -> Device:
    return Device(
        id=row["id"],
        name=row["name"],
        status=DeviceStatus(row["status"]),
        created_at=row["created_at"],
        phone=row["phone"],
        jid=row["jid"],
        status_reason=row["status_reason"],
        last_seen_at=row["last_seen_at"],
        min_delay_s=row["min_delay_s"],
        max_delay_s=row["max_delay_s"],
        hourly_cap=row["hourly_cap"],
        daily_cap=row["daily_cap"],
        created_by=row["created_by"],
        qr_code=row["qr_code"],
        qr_expires_at=row["qr_expires_at"],
        banned_until=row["banned_until"],
        linked_at=row["linked_at"],
        quiet_start=row["quiet_start"],
        quiet_end=row["quiet_end"],
        warmup_days=row["warmup_days"],
        typing=row["typing"],
        queue_paused_reason=row["queue_paused_reason"],
        queue_pause_kind=row["queue_pause_kind"],
        queue_paused_at=row["queue_paused_at"],
    )


# One device by id as plain SQL, for the send path on Postgres: read in a locked batch's own transaction
# (`locked_batch.py`), with no pool checkout and no SQLAlchemy statement of its own (880 µs of CPU against about
# 100), and by `SqlDeviceRepository.get` for unscoped reads (340 µs with the checkout).
DEVICE_COLUMNS = tuple(c.name for c in devices.c)
_PG_DIALECT = postgresql_psycopg.dialect()  # type: ignore[no-untyped-call]
DEVICE_BY_ID_PG = str(select(devices).where(devices.c.id == bindparam("device")).compile(dialect=_PG_DIALECT))
_TIMES = tuple(c.name for c in devices.c if isinstance(c.type, UtcDateTime))


def device_from_tuple(row: Sequence[Any]) -> Device:
    """A `Device` from a row of `DEVICE_BY_ID_PG` as psycopg returns it (times in the session's zone)."""
    values = dict(zip(DEVICE_COLUMNS, row, strict=True))
    for name in _TIMES:
        if values[name] is not None:
            values[name] = values[name].astimezone(UTC)
    return device_from_row(values)


def scoped(query: Select[Any], scope: DeviceScope) -> Select[Any]:
    """Restrict a devices query to what the scope may see: staff only through a grant."""
    if scope.user_id is None:
        return query
    granted = select(device_grants.c.device_id).where(device_grants.c.user_id == scope.user_id)
    return query.where(devices.c.id.in_(granted))


class SqlDeviceRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, name: str, created_by: UUID | None, grant_to: UUID | None) -> Device:
        now = datetime.now(UTC)
        device_id = uuid.uuid4()
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(devices).values(
                    id=device_id,
                    name=name,
                    status=DeviceStatus.UNPAIRED.value,
                    created_by=created_by,
                    created_at=now,
                    updated_at=now,
                )
            )
            if grant_to is not None:
                await conn.execute(insert(device_grants).values(user_id=grant_to, device_id=device_id, created_at=now))
            row = (await conn.execute(select(devices).where(devices.c.id == device_id))).mappings().one()
        return device_from_row(row)

    async def get(self, device_id: UUID, scope: DeviceScope) -> Device | None:
        if scope.user_id is None and is_postgres(self._engine):
            # The system's reads (a dispatcher lane before each round, the device pool on every event) as plain
            # SQL: a third of the CPU of the same read through SQLAlchemy.
            async with driver_connection(self._engine) as pg:
                found = await (await pg.execute(DEVICE_BY_ID_PG, {"device": device_id})).fetchone()
            return device_from_tuple(found) if found else None
        async with self._engine.connect() as conn:
            query = scoped(select(devices).where(devices.c.id == device_id), scope)
            row = (await conn.execute(query)).mappings().first()
        return device_from_row(row) if row else None

    async def list_page(self, scope: DeviceScope, limit: int, after: tuple[datetime, UUID] | None) -> list[Device]:
        query = scoped(select(devices), scope).order_by(devices.c.created_at, devices.c.id).limit(limit)
        if after is not None:
            at, last_id = after
            query = query.where(
                or_(devices.c.created_at > at, and_(devices.c.created_at == at, devices.c.id > last_id))
            )
        async with self._engine.connect() as conn:
            return [device_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def patch(self, device_id: UUID, patch: DevicePatch) -> Device:
        values = {k: v for k, v in vars(patch).items() if v is not None}
        device = await self.set_fields(device_id, **values)
        if device is None:
            raise LookupError(device_id)
        return device

    async def set_fields(self, device_id: UUID, **values: Any) -> Device | None:
        unknown = set(values) - DEVICE_FIELDS
        if unknown:
            raise ValueError(f"unknown device fields: {sorted(unknown)}")
        if "status" in values and isinstance(values["status"], DeviceStatus):
            values["status"] = values["status"].value
        values["updated_at"] = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await conn.execute(update(devices).where(devices.c.id == device_id).values(values))
            row = (await conn.execute(select(devices).where(devices.c.id == device_id))).mappings().first()
        return device_from_row(row) if row else None

    async def set_status_where(
        self, device_ids: Iterable[UUID], current: Iterable[DeviceStatus], status: DeviceStatus, reason: str
    ) -> list[Device]:
        ids = list(device_ids)
        if not ids:
            return []
        stmt = (
            update(devices)
            .where(devices.c.id.in_(ids), devices.c.status.in_([s.value for s in current]))
            .values(status=status.value, status_reason=reason, updated_at=datetime.now(UTC))
            .returning(*devices.c)
        )
        async with self._engine.begin() as conn:
            return [device_from_row(r) for r in (await conn.execute(stmt)).mappings()]

    async def delete(self, device_id: UUID) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(devices).where(devices.c.id == device_id))
            # Its chat history and the logs of its sends and failures have no foreign key (see `tables.py`). After
            # the device's row: its cascade waited for any batch still writing the device's results, whose rows
            # these statements then see.
            for owned in (messages, chats, outbox_sent, outbox_failed):
                await conn.execute(delete(owned).where(owned.c.device_id == device_id))
        return bool(result.rowcount)

    async def to_reconnect(self) -> list[Device]:
        query = (
            select(devices)
            .where(devices.c.jid.is_not(None), devices.c.status.in_([s.value for s in RECONNECTABLE]))
            .order_by(devices.c.created_at, devices.c.id)
        )
        async with self._engine.connect() as conn:
            return [device_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def exists(self, device_ids: Sequence[UUID]) -> set[UUID]:
        if not device_ids:
            return set()
        async with self._engine.connect() as conn:
            query = select(devices.c.id).where(devices.c.id.in_(list(device_ids)))
            return set((await conn.execute(query)).scalars())
