"""Leads: what a query over them may ask, what a bulk upsert takes, and the repository port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from wamd_server.domain.models import Lead, TargetStatus


@dataclass(frozen=True)
class LeadQuery:
    """Which leads a list, an export or a planner wants. Every filter set must match (None: any)."""

    owner_id: UUID | None = None  # None: every user's leads (admins, the system)
    niche: str | None = None  # the same niche, ignoring case
    target_status: TargetStatus | None = None
    trigger: str | None = None  # the lead's triggers contain this one
    device_id: UUID | None = None
    device_ids: tuple[UUID, ...] | None = None  # the lead's owner device is one of these
    search: str | None = None  # part of the name (case-insensitive) or of the phone
    opted_out: bool | None = None  # True: only opted-out leads; False: only those still reachable


@dataclass
class LeadDraft:
    """One lead of a bulk upsert, keyed by (owner, phone). None: not given — a new lead gets the default
    (empty text, prospect, no triggers, no device), an existing lead keeps its value. `fields` are merged
    into the existing ones; `opted_out_at` only ever sets an opt-out, never clears one."""

    phone: str
    name: str | None = None
    niche: str | None = None
    target_status: TargetStatus | None = None
    triggers: list[str] | None = None
    device_id: UUID | None = None
    notes: str | None = None
    fields: dict[str, str] | None = None
    opted_out_at: datetime | None = None


@dataclass(frozen=True)
class UpsertCounts:
    created: int
    updated: int


class LeadRepository(Protocol):
    async def add(self, lead: Lead) -> Lead | None:
        """Insert; None when the owner already has a lead with this phone (nothing is changed then)."""
        ...

    async def get(self, lead_id: UUID, owner_id: UUID | None = None) -> Lead | None: ...

    async def by_phone(self, owner_id: UUID, phone: str) -> Lead | None: ...

    async def list_page(self, query: LeadQuery, limit: int, after: tuple[datetime, UUID] | None) -> list[Lead]: ...

    async def update(self, lead_id: UUID, values: Mapping[str, Any]) -> Lead | None:
        """Change the given columns; raises `Conflict` if the new phone is taken by another lead of the owner."""
        ...

    async def delete(self, lead_id: UUID) -> bool: ...

    async def upsert_many(self, owner_id: UUID, drafts: Sequence[LeadDraft], now: datetime) -> UpsertCounts:
        """Insert or update by (owner, phone) in one transaction; a phone repeated in `drafts` is applied in
        order (the later values win) and counts as an update."""
        ...

    def iterate(self, query: LeadQuery, chunk: int = 1000) -> AsyncIterator[Lead]:
        """Every matching lead in creation order, read `chunk` at a time (memory stays bounded)."""
        ...

    async def field_keys(self, query: LeadQuery, limit: int = 1000) -> list[str]:
        """The custom field names the matching leads use, sorted (at most `limit`)."""
        ...

    async def opt_out_phone(self, phone: str, at: datetime) -> list[UUID]:
        """Mark every lead with this phone (of any owner) that has not opted out yet; returns their ids."""
        ...
