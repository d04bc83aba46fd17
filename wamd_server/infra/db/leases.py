"""Device leases: which worker runs which device's WhatsApp session.

A lease is a row with an expiry. Its worker renews it every tick; a worker that dies stops renewing and, once the
lease has expired, another worker takes the device over. On Postgres every expiry is computed from the
database's clock (`now()`), so workers on hosts with skewed clocks still agree; claims use
`FOR UPDATE SKIP LOCKED` so concurrent workers never pick the same device.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wamd_server.domain.models import RECONNECTABLE, DeviceStatus
from wamd_server.domain.ports import LiveWorker, WorkerInfo
from wamd_server.infra.db.tables import device_leases, devices, workers
from wamd_server.infra.db.upsert import insert_for

NEEDS_SESSION = [s.value for s in RECONNECTABLE]


class SqlLeaseRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _now(self, conn: AsyncConnection) -> datetime:
        if conn.dialect.name == "postgresql":
            value: datetime = (await conn.execute(text("SELECT now()"))).scalar_one()
            return value.astimezone(UTC)
        return datetime.now(UTC)

    async def register(self, worker: WorkerInfo) -> None:
        async with self._engine.begin() as conn:
            now = await self._now(conn)
            stmt = insert_for(conn, workers).values(
                id=worker.id,
                host=worker.host,
                pid=worker.pid,
                capacity=worker.capacity,
                started_at=now,
                heartbeat_at=now,
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[workers.c.id], set_={"heartbeat_at": now, "capacity": worker.capacity}
                )
            )

    async def heartbeat(self, worker_id: str, ttl_s: float) -> set[UUID]:
        """Renew this worker and all its leases; returns the devices it holds."""
        async with self._engine.begin() as conn:
            now = await self._now(conn)
            await conn.execute(update(workers).where(workers.c.id == worker_id).values(heartbeat_at=now))
            await conn.execute(
                update(device_leases)
                .where(device_leases.c.worker_id == worker_id)
                .values(expires_at=now + timedelta(seconds=ttl_s))
            )
            held = await conn.execute(select(device_leases.c.device_id).where(device_leases.c.worker_id == worker_id))
            return set(held.scalars())

    async def claim(self, worker_id: str, limit: int, ttl_s: float) -> list[UUID]:
        """Take up to `limit` linked devices that have no live lease (never a device another worker holds)."""
        if limit <= 0:
            return []
        async with self._engine.begin() as conn:
            now = await self._now(conn)
            candidates = (
                select(devices.c.id)
                .outerjoin(device_leases, device_leases.c.device_id == devices.c.id)
                .where(
                    devices.c.jid.is_not(None),
                    devices.c.status.in_(NEEDS_SESSION),
                    or_(device_leases.c.device_id.is_(None), device_leases.c.expires_at < now),
                )
                .order_by(devices.c.created_at, devices.c.id)
                .limit(limit)
                .with_for_update(of=devices, skip_locked=True)
            )
            ids = list((await conn.execute(candidates)).scalars())
            return await self._take(conn, ids, worker_id, now, ttl_s)

    async def assign(self, device_id: UUID, worker_id: str, ttl_s: float) -> str | None:
        """Give `device_id` to `worker_id` unless another worker holds a live lease; returns the owner."""
        async with self._engine.begin() as conn:
            now = await self._now(conn)
            await self._take(conn, [device_id], worker_id, now, ttl_s)
            query = select(device_leases.c.worker_id).where(device_leases.c.device_id == device_id)
            return (await conn.execute(query)).scalar_one_or_none()

    async def _take(
        self, conn: AsyncConnection, ids: list[UUID], worker_id: str, now: datetime, ttl_s: float
    ) -> list[UUID]:
        if not ids:
            return []
        expires = now + timedelta(seconds=ttl_s)
        stmt = insert_for(conn, device_leases).values(
            [{"device_id": d, "worker_id": worker_id, "acquired_at": now, "expires_at": expires} for d in ids]
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[device_leases.c.device_id],
            set_={"worker_id": worker_id, "acquired_at": now, "expires_at": expires},
            # Only an expired lease changes hands; a live one stays with its worker.
            where=device_leases.c.expires_at < now,
        ).returning(device_leases.c.device_id, device_leases.c.worker_id)
        rows = (await conn.execute(stmt)).all()
        return [device_id for device_id, owner in rows if owner == worker_id]

    async def owner(self, device_id: UUID) -> str | None:
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            query = select(device_leases.c.worker_id).where(
                device_leases.c.device_id == device_id, device_leases.c.expires_at > now
            )
            return (await conn.execute(query)).scalar_one_or_none()

    async def release(self, worker_id: str, device_ids: Iterable[UUID] | None = None) -> None:
        stmt = delete(device_leases).where(device_leases.c.worker_id == worker_id)
        if device_ids is not None:
            ids = list(device_ids)
            if not ids:
                return
            stmt = stmt.where(device_leases.c.device_id.in_(ids))
        async with self._engine.begin() as conn:
            await conn.execute(stmt)

    async def live_workers(self, ttl_s: float) -> list[LiveWorker]:
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            held = (
                select(device_leases.c.worker_id, func.count().label("held"))
                .where(device_leases.c.expires_at > now)
                .group_by(device_leases.c.worker_id)
                .subquery()
            )
            query = (
                select(workers.c.id, workers.c.capacity, func.coalesce(held.c.held, 0))
                .outerjoin(held, held.c.worker_id == workers.c.id)
                .where(workers.c.heartbeat_at > now - timedelta(seconds=ttl_s))
                .order_by(workers.c.id)
            )
            return [LiveWorker(id=r[0], capacity=int(r[1]), held=int(r[2])) for r in await conn.execute(query)]

    async def needing_sessions(self) -> int:
        query = (
            select(func.count())
            .select_from(devices)
            .where(devices.c.jid.is_not(None), devices.c.status.in_(NEEDS_SESSION))
        )
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def idle_leases(self, worker_id: str, older_than_s: float) -> list[UUID]:
        """Leases of this worker on devices that need no session (unpaired, logged out) for a while."""
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            query = (
                select(device_leases.c.device_id)
                .join(devices, devices.c.id == device_leases.c.device_id)
                .where(
                    device_leases.c.worker_id == worker_id,
                    device_leases.c.acquired_at < now - timedelta(seconds=older_than_s),
                    or_(devices.c.jid.is_(None), devices.c.status.not_in(NEEDS_SESSION)),
                    devices.c.status != DeviceStatus.PAIRING.value,
                )
            )
            return list((await conn.execute(query)).scalars())

    async def orphaned_pairings(self) -> list[UUID]:
        """Devices shown as pairing whose worker is gone (no live lease): their QR session died with it."""
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            live = select(device_leases.c.device_id).where(device_leases.c.expires_at > now)
            query = select(devices.c.id).where(
                devices.c.status == DeviceStatus.PAIRING.value, devices.c.id.not_in(live)
            )
            return list((await conn.execute(query)).scalars())

    async def forget_worker(self, worker_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(device_leases).where(device_leases.c.worker_id == worker_id))
            await conn.execute(delete(workers).where(workers.c.id == worker_id))

    async def prune_workers(self, older_than_s: float) -> int:
        """Drop rows of workers silent for a long time (their leases expired long ago)."""
        async with self._engine.begin() as conn:
            now = await self._now(conn)
            cutoff = now - timedelta(seconds=older_than_s)
            stale = select(workers.c.id).where(workers.c.heartbeat_at < cutoff)
            await conn.execute(
                delete(device_leases).where(
                    and_(device_leases.c.worker_id.in_(stale), device_leases.c.expires_at < now)
                )
            )
            result = await conn.execute(delete(workers).where(workers.c.heartbeat_at < cutoff))
            return int(result.rowcount or 0)
