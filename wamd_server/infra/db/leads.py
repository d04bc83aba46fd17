"""Leads, unique per owner and phone. Bulk imports upsert with `INSERT … ON CONFLICT DO UPDATE` (never
check-then-insert), so concurrent imports and repeated phones cannot create duplicates."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Select,
    Text,
    Uuid,
    and_,
    bindparam,
    cast,
    column,
    delete,
    false,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wamd_server.domain.errors import Conflict
from wamd_server.domain.leads import LeadDraft, LeadQuery, UpsertCounts
from wamd_server.domain.models import Lead, TargetStatus
from wamd_server.infra.db.tables import leads
from wamd_server.infra.db.types import UtcDateTime
from wamd_server.infra.db.upsert import insert_for

LEAD_COLUMNS = frozenset(
    {"name", "phone", "niche", "target_status", "triggers", "device_id", "notes", "fields", "opted_out_at"}
)
DRAFT_COLUMNS = ("name", "niche", "target_status", "triggers", "device_id", "notes", "fields", "opted_out_at")
ROWS_PER_STATEMENT = 1000  # 14 parameters a row: well under SQLite's 32,766 and Postgres' 65,535
MAX_FIELD_KEYS = 1000
# Postgres bulk upserts pass one array per column (JSON as text, cast in the statement).
PG_ARRAY_TYPES: dict[str, ARRAY[Any]] = {
    "id": ARRAY(Uuid),
    "phone": ARRAY(Text),
    "name": ARRAY(Text),
    "niche": ARRAY(Text),
    "target_status": ARRAY(Text),
    "triggers": ARRAY(Text),
    "device_id": ARRAY(Uuid),
    "notes": ARRAY(Text),
    "fields": ARRAY(Text),
    "opted_out_at": ARRAY(DateTime(timezone=True)),
}


def lead_from_row(row: RowMapping) -> Lead:
    return Lead(
        id=row["id"],
        user_id=row["user_id"],
        phone=row["phone"],
        name=row["name"],
        niche=row["niche"],
        target_status=TargetStatus(row["target_status"]),
        triggers=list(row["triggers"] or []),
        device_id=row["device_id"],
        notes=row["notes"],
        fields=dict(row["fields"] or {}),
        opted_out_at=row["opted_out_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _merge(earlier: LeadDraft, later: LeadDraft) -> LeadDraft:
    """Two drafts of one phone applied in order: what the later one gives wins; fields merge; the first
    opt-out stays."""
    merged = replace(earlier)
    for name in DRAFT_COLUMNS:
        value = getattr(later, name)
        if value is None:
            continue
        if name == "fields" and merged.fields is not None:
            value = {**merged.fields, **value}
        if name == "opted_out_at" and merged.opted_out_at is not None:
            continue
        setattr(merged, name, value)
    return merged


class SqlLeadRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def _dialect(self) -> str:
        return self._engine.dialect.name

    # --- single leads ------------------------------------------------------------------------------------

    async def add(self, lead: Lead) -> Lead | None:
        values = {
            "id": lead.id,
            "user_id": lead.user_id,
            "name": lead.name,
            "phone": lead.phone,
            "niche": lead.niche,
            "target_status": lead.target_status.value,
            "triggers": list(lead.triggers),
            "device_id": lead.device_id,
            "notes": lead.notes,
            "fields": dict(lead.fields),
            "opted_out_at": lead.opted_out_at,
            "created_at": lead.created_at,
            "updated_at": lead.updated_at or lead.created_at,
        }
        async with self._engine.begin() as conn:
            stmt = insert_for(conn, leads).values(values).on_conflict_do_nothing(index_elements=["user_id", "phone"])
            row = (await conn.execute(stmt.returning(*leads.c))).mappings().first()
        return lead_from_row(row) if row else None

    async def get(self, lead_id: UUID, owner_id: UUID | None = None) -> Lead | None:
        query = select(leads).where(leads.c.id == lead_id)
        if owner_id is not None:
            query = query.where(leads.c.user_id == owner_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return lead_from_row(row) if row else None

    async def by_phone(self, owner_id: UUID, phone: str) -> Lead | None:
        query = select(leads).where(leads.c.user_id == owner_id, leads.c.phone == phone)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return lead_from_row(row) if row else None

    async def update(self, lead_id: UUID, values: Mapping[str, Any]) -> Lead | None:
        unknown = set(values) - LEAD_COLUMNS - {"updated_at"}
        if unknown:
            raise ValueError(f"unknown lead fields: {sorted(unknown)}")
        changes = dict(values)
        if isinstance(changes.get("target_status"), TargetStatus):
            changes["target_status"] = changes["target_status"].value
        try:
            async with self._engine.begin() as conn:
                await conn.execute(update(leads).where(leads.c.id == lead_id).values(changes))
                row = (await conn.execute(select(leads).where(leads.c.id == lead_id))).mappings().first()
        except IntegrityError as exc:
            if "phone" in changes:
                raise Conflict(
                    f"another lead of this owner already has the phone {changes['phone']}", {"field": "phone"}
                ) from exc
            raise
        return lead_from_row(row) if row else None

    async def delete(self, lead_id: UUID) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(leads).where(leads.c.id == lead_id))
        return bool(result.rowcount)

    # --- queries -----------------------------------------------------------------------------------------

    def _conditions(self, query: LeadQuery) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if query.owner_id is not None:
            where.append(leads.c.user_id == query.owner_id)
        if query.niche is not None:
            where.append(func.lower(leads.c.niche) == query.niche.lower())
        if query.target_status is not None:
            where.append(leads.c.target_status == query.target_status.value)
        if query.device_id is not None:
            where.append(leads.c.device_id == query.device_id)
        if query.device_ids is not None:
            where.append(leads.c.device_id.in_(query.device_ids) if query.device_ids else false())
        if query.opted_out is not None:
            where.append(leads.c.opted_out_at.is_not(None) if query.opted_out else leads.c.opted_out_at.is_(None))
        if query.trigger is not None:
            where.append(self._has_trigger(query.trigger))
        if query.search:
            text = query.search.strip()
            matches = [leads.c.name.icontains(text, autoescape=True)]
            digits = "".join(ch for ch in text if ch.isdigit())
            if digits:
                matches.append(leads.c.phone.contains(digits, autoescape=True))
            where.append(or_(*matches))
        return where

    def _has_trigger(self, trigger: str) -> ColumnElement[bool]:
        if self._dialect == "postgresql":
            wanted = literal(json.dumps([trigger])).cast(JSONB)
            return leads.c.triggers.op("@>")(wanted).is_(true())
        each = func.json_each(leads.c.triggers).table_valued("value")
        return select(literal(1)).select_from(each).where(each.c.value == trigger).exists()

    def _select(self, query: LeadQuery) -> Select[Any]:
        return select(leads).where(*self._conditions(query)).order_by(leads.c.created_at, leads.c.id)

    async def list_page(self, query: LeadQuery, limit: int, after: tuple[datetime, UUID] | None) -> list[Lead]:
        stmt = self._select(query).limit(limit)
        if after is not None:
            at, last_id = after
            stmt = stmt.where(or_(leads.c.created_at > at, and_(leads.c.created_at == at, leads.c.id > last_id)))
        async with self._engine.connect() as conn:
            return [lead_from_row(r) for r in (await conn.execute(stmt)).mappings()]

    async def iterate(self, query: LeadQuery, chunk: int = 1000) -> AsyncIterator[Lead]:
        # Keyset pages, each on a short-lived connection: no transaction stays open while the consumer works.
        after: tuple[datetime, UUID] | None = None
        while True:
            batch = await self.list_page(query, chunk, after)
            for lead in batch:
                yield lead
            if len(batch) < chunk:
                return
            last = batch[-1]
            assert last.created_at is not None
            after = (last.created_at, last.id)

    async def count(self, query: LeadQuery) -> int:
        async with self._engine.connect() as conn:
            stmt = select(func.count()).select_from(leads).where(*self._conditions(query))
            return int((await conn.execute(stmt)).scalar_one())

    async def field_keys(self, query: LeadQuery, limit: int = MAX_FIELD_KEYS) -> list[str]:
        """The custom field names used by the matching leads, sorted (at most `limit`)."""
        if self._dialect == "postgresql":
            inner = select(func.jsonb_object_keys(leads.c.fields).label("key")).where(*self._conditions(query))
            keys = inner.subquery()
            stmt = select(keys.c.key).distinct().order_by(keys.c.key).limit(limit)
        else:
            each = func.json_each(leads.c.fields).table_valued("key")
            stmt = (
                select(each.c.key)
                .select_from(leads.join(each, true()))
                .where(*self._conditions(query))
                .distinct()
                .order_by(each.c.key)
                .limit(limit)
            )
        async with self._engine.connect() as conn:
            return [str(k) for k in (await conn.execute(stmt)).scalars()]

    # --- bulk ----------------------------------------------------------------------------------------------

    async def upsert_many(self, owner_id: UUID, drafts: Sequence[LeadDraft], now: datetime) -> UpsertCounts:
        merged: dict[str, LeadDraft] = {}
        for draft in drafts:
            earlier = merged.get(draft.phone)
            merged[draft.phone] = replace(draft) if earlier is None else _merge(earlier, draft)
        # One statement per set of given columns: an update writes only what the draft gives.
        groups: dict[tuple[str, ...], list[LeadDraft]] = {}
        for draft in sorted(merged.values(), key=lambda d: d.phone):  # one lock order: concurrent imports
            given = tuple(c for c in DRAFT_COLUMNS if getattr(draft, c) is not None)
            groups.setdefault(given, []).append(draft)
        created = 0
        async with self._engine.begin() as conn:
            for given, group in groups.items():
                for start in range(0, len(group), ROWS_PER_STATEMENT):
                    created += await self._upsert(conn, owner_id, given, group[start : start + ROWS_PER_STATEMENT], now)
        return UpsertCounts(created=created, updated=len(drafts) - created)

    async def _upsert(
        self, conn: AsyncConnection, owner_id: UUID, given: tuple[str, ...], drafts: Sequence[LeadDraft], now: datetime
    ) -> int:
        ids = [uuid.uuid4() for _ in drafts]
        columns: dict[str, list[Any]] = {
            "id": ids,
            "phone": [d.phone for d in drafts],
            "name": [d.name or "" for d in drafts],
            "niche": [d.niche or "" for d in drafts],
            "target_status": [(d.target_status or TargetStatus.PROSPECT).value for d in drafts],
            "triggers": [d.triggers or [] for d in drafts],
            "device_id": [d.device_id for d in drafts],
            "notes": [d.notes or "" for d in drafts],
            "fields": [d.fields or {} for d in drafts],
            "opted_out_at": [d.opted_out_at for d in drafts],
        }
        postgres = conn.dialect.name == "postgresql"
        stmt = insert_for(conn, leads)
        if postgres:
            # One short statement with a column of values per parameter (unnest), whatever the batch size.
            arrays = (bindparam(name, type_=PG_ARRAY_TYPES[name]) for name in columns)
            names = (column(name, PG_ARRAY_TYPES[name].item_type) for name in columns)
            source = func.unnest(*arrays).table_valued(*names).render_derived("src")
            selected = [
                cast(source.c[name], JSONB) if name in ("triggers", "fields") else source.c[name] for name in columns
            ]
            stmt = stmt.from_select(
                [*columns, "user_id", "created_at", "updated_at"],
                select(*selected, literal(owner_id, Uuid), literal(now, UtcDateTime), literal(now, UtcDateTime)),
            )
        excluded = stmt.excluded
        changes: dict[str, Any] = {"updated_at": excluded.updated_at}
        for name in given:
            if name == "fields":
                if postgres:
                    changes["fields"] = leads.c.fields.op("||")(excluded.fields)
                else:
                    changes["fields"] = func.json_patch(leads.c.fields, excluded.fields)
            elif name == "opted_out_at":
                changes["opted_out_at"] = func.coalesce(leads.c.opted_out_at, excluded.opted_out_at)
            else:
                changes[name] = excluded[name]
        stmt = stmt.on_conflict_do_update(index_elements=["user_id", "phone"], set_=changes).returning(leads.c.id)
        if postgres:
            params = {
                **columns,
                "triggers": [json.dumps(t) for t in columns["triggers"]],
                "fields": [json.dumps(f) for f in columns["fields"]],
            }
            result = await conn.execute(stmt, params)
        else:
            # executemany of one cached statement; SQLAlchemy sends it as multi-row VALUES ("insertmanyvalues")
            rows = [
                {**{name: values[i] for name, values in columns.items()}, "user_id": owner_id}
                | {"created_at": now, "updated_at": now}
                for i in range(len(drafts))
            ]
            result = await conn.execute(stmt, rows)
        proposed = set(ids)
        return sum(1 for lead_id in result.scalars() if lead_id in proposed)

    async def opt_out_phone(self, phone: str, at: datetime) -> list[UUID]:
        stmt = (
            update(leads)
            .where(leads.c.phone == phone, leads.c.opted_out_at.is_(None))
            .values(opted_out_at=at, updated_at=at)
            .returning(leads.c.id)
        )
        async with self._engine.begin() as conn:
            return list((await conn.execute(stmt)).scalars())
