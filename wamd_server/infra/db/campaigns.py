"""Campaigns, and the leads a campaign targets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.domain.models import Campaign, CampaignStatus, Lead, OutboxStatus, TargetStatus
from wamd_server.infra.db.leads import lead_from_row
from wamd_server.infra.db.tables import campaigns, leads, outbox, outbox_due

CAMPAIGN_FIELDS = frozenset(
    {
        "title",
        "message",
        "image_media_id",
        "niche",
        "target_status",
        "device_ids",
        "scheduled_at",
        "min_delay_s",
        "max_delay_s",
        "status",
        "status_reason",
        "options",
        "started_at",
        "finished_at",
        "leads_waiting",
    }
)


def campaign_from_row(row: RowMapping) -> Campaign:
    return Campaign(
        id=row["id"],
        user_id=row["user_id"],
        type=row["type"],
        title=row["title"],
        message=row["message"],
        scheduled_at=row["scheduled_at"],
        status=CampaignStatus(row["status"]),
        image_media_id=row["image_media_id"],
        niche=row["niche"],
        target_status=row["target_status"],
        device_ids=[UUID(d) for d in row["device_ids"] or []],
        min_delay_s=row["min_delay_s"],
        max_delay_s=row["max_delay_s"],
        options=dict(row["options"] or {}),
        status_reason=row["status_reason"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        leads_waiting=row["leads_waiting"],
    )


def _values(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - CAMPAIGN_FIELDS
    if unknown:
        raise ValueError(f"unknown campaign fields: {sorted(unknown)}")
    out = dict(values)
    if "status" in out and isinstance(out["status"], CampaignStatus):
        out["status"] = out["status"].value
    if "device_ids" in out:
        out["device_ids"] = [str(d) for d in out["device_ids"]]
    return out


class SqlCampaignRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, campaign: Campaign, now: datetime) -> Campaign:
        values = _values(
            {
                "title": campaign.title,
                "message": campaign.message,
                "image_media_id": campaign.image_media_id,
                "niche": campaign.niche,
                "target_status": campaign.target_status,
                "device_ids": campaign.device_ids,
                "scheduled_at": campaign.scheduled_at,
                "min_delay_s": campaign.min_delay_s,
                "max_delay_s": campaign.max_delay_s,
                "status": campaign.status,
                "options": campaign.options,
            }
        )
        campaign_id = uuid.uuid4()
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(campaigns).values(
                    id=campaign_id,
                    user_id=campaign.user_id,
                    type=campaign.type,
                    created_at=now,
                    updated_at=now,
                    **values,
                )
            )
        found = await self.get(campaign_id, None)
        assert found is not None
        return found

    async def get(self, campaign_id: UUID, owner: UUID | None) -> Campaign | None:
        """`owner` None: any campaign (admins, planners); else only that user's."""
        query = select(campaigns).where(campaigns.c.id == campaign_id)
        if owner is not None:
            query = query.where(campaigns.c.user_id == owner)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return campaign_from_row(row) if row else None

    async def list_page(
        self,
        owner: UUID | None,
        limit: int,
        after: tuple[datetime, UUID] | None,
        *,
        scheduled_from: datetime | None = None,
        scheduled_to: datetime | None = None,
        status: str | None = None,
    ) -> list[Campaign]:
        query = select(campaigns).order_by(campaigns.c.created_at, campaigns.c.id).limit(limit)
        if owner is not None:
            query = query.where(campaigns.c.user_id == owner)
        if scheduled_from is not None:
            query = query.where(campaigns.c.scheduled_at >= scheduled_from)
        if scheduled_to is not None:
            query = query.where(campaigns.c.scheduled_at < scheduled_to)
        if status is not None:
            query = query.where(campaigns.c.status == status)
        if after is not None:
            at, last = after
            query = query.where(
                or_(campaigns.c.created_at > at, and_(campaigns.c.created_at == at, campaigns.c.id > last))
            )
        async with self._engine.connect() as conn:
            return [campaign_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def update(self, campaign_id: UUID, now: datetime, **values: Any) -> Campaign | None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(campaigns).where(campaigns.c.id == campaign_id).values(updated_at=now, **_values(values))
            )
        return await self.get(campaign_id, None)

    async def transition(
        self, campaign_id: UUID, from_statuses: Sequence[CampaignStatus], now: datetime, **values: Any
    ) -> bool:
        """Change a campaign only if it is still in one of `from_statuses` (two planners or users racing)."""
        stmt = (
            update(campaigns)
            .where(campaigns.c.id == campaign_id, campaigns.c.status.in_([s.value for s in from_statuses]))
            .values(updated_at=now, **_values(values))
        )
        async with self._engine.begin() as conn:
            return bool((await conn.execute(stmt)).rowcount)

    async def delete(self, campaign_id: UUID) -> bool:
        async with self._engine.begin() as conn:
            return bool((await conn.execute(delete(campaigns).where(campaigns.c.id == campaign_id))).rowcount)

    async def with_status(self, statuses: Sequence[CampaignStatus], due_by: datetime | None = None) -> list[Campaign]:
        query = select(campaigns).where(campaigns.c.status.in_([s.value for s in statuses]))
        if due_by is not None:
            query = query.where(campaigns.c.scheduled_at <= due_by)
        async with self._engine.connect() as conn:
            return [
                campaign_from_row(r) for r in (await conn.execute(query.order_by(campaigns.c.scheduled_at))).mappings()
            ]

    async def count_by_status(self, owner: UUID | None, start: datetime | None, end: datetime | None) -> dict[str, int]:
        query = select(campaigns.c.status, func.count()).group_by(campaigns.c.status)
        if owner is not None:
            query = query.where(campaigns.c.user_id == owner)
        if start is not None:
            query = query.where(campaigns.c.scheduled_at >= start)
        if end is not None:
            query = query.where(campaigns.c.scheduled_at < end)
        async with self._engine.connect() as conn:
            return {status: int(n) for status, n in await conn.execute(query)}

    async def target_leads(
        self, campaign: Campaign, limit: int, after: UUID | None, created_by: datetime | None = None
    ) -> list[Lead]:
        """The campaign owner's leads that match its niche and target status, not opted out, by id (and, with
        `created_by`, created by then)."""
        query = (
            select(leads)
            .where(leads.c.user_id == campaign.user_id, leads.c.opted_out_at.is_(None))
            .order_by(leads.c.id)
            .limit(limit)
        )
        if campaign.niche:
            query = query.where(func.lower(leads.c.niche) == campaign.niche.lower())
        if campaign.target_status in (TargetStatus.PROSPECT.value, TargetStatus.CUSTOMER.value):
            query = query.where(leads.c.target_status == campaign.target_status)
        if campaign.device_ids:
            # Leads owned by one of the campaign's devices, and leads without an owner (distributed).
            query = query.where(or_(leads.c.device_id.in_(campaign.device_ids), leads.c.device_id.is_(None)))
        if after is not None:
            query = query.where(leads.c.id > after)
        if created_by is not None:
            query = query.where(leads.c.created_at <= created_by)
        async with self._engine.connect() as conn:
            return [lead_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def stranded_rows(
        self, campaign_id: UUID, stuck_devices: Sequence[UUID], limit: int
    ) -> list[tuple[UUID, Lead]]:
        """Queued messages of a campaign to leads without an owner device, waiting on devices that cannot send:
        (row id, lead)."""
        if not stuck_devices:
            return []
        query = (
            select(outbox.c.id.label("row_id"), leads)
            .join(outbox_due, outbox_due.c.id == outbox.c.id)
            .join(leads, leads.c.id == outbox.c.lead_id)
            .where(
                outbox_due.c.source_id == campaign_id,
                outbox_due.c.device_id.in_(list(stuck_devices)),
                outbox.c.status == OutboxStatus.QUEUED.value,
                leads.c.device_id.is_(None),
            )
            .order_by(outbox_due.c.seq)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [(r["row_id"], lead_from_row(r)) for r in (await conn.execute(query)).mappings()]

    async def move_rows(self, moves: dict[UUID, UUID], now: datetime) -> int:
        """Give queued rows another device (`{row_id: device_id}`); rows claimed meanwhile stay where they are."""
        if not moves:
            return 0
        stmt = (
            update(outbox)
            .where(outbox.c.id == bindparam("b_id"), outbox.c.status == OutboxStatus.QUEUED.value)
            .values(device_id=bindparam("b_device"), updated_at=now)
        )
        # The due row follows its outbox row (whether it moved or not).
        follow = (
            update(outbox_due)
            .where(outbox_due.c.id == bindparam("b_id"))
            .values(device_id=select(outbox.c.device_id).where(outbox.c.id == outbox_due.c.id).scalar_subquery())
        )
        params = [{"b_id": row, "b_device": device} for row, device in moves.items()]
        async with self._engine.begin() as conn:
            result = await conn.execute(stmt, params)
            await conn.execute(follow, [{"b_id": p["b_id"]} for p in params])
        return int(result.rowcount or 0)
