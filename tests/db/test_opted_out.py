"""The dispatchers' set of opted-out phones against the database it mirrors: news applied at once, reloads that
replace (an opt-out taken back ends), and a database check before a message is held back."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.domain.leads import LeadDraft
from wamd_server.domain.models import Role
from wamd_server.infra.db.leads import SqlLeadRepository
from wamd_server.infra.db.outbox import SqlOutboxRepository
from wamd_server.infra.db.tables import leads
from wamd_server.infra.db.users import SqlUserRepository
from wamd_server.services.dispatcher import OptedOut

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
OUT, KEPT = "60190000001", "60190000002"


async def test_the_opt_out_set_follows_the_database(engine: AsyncEngine) -> None:
    owner = await SqlUserRepository(engine).add("owner@example.com", "hash", Role.ADMIN, "")
    drafts = [LeadDraft(phone=OUT, opted_out_at=T0), LeadDraft(phone=KEPT)]
    await SqlLeadRepository(engine).upsert_many(owner.id, drafts, T0)
    reloading = OptedOut(SqlOutboxRepository(engine), max_age_s=0.0)  # reloads on every look
    cached = OptedOut(SqlOutboxRepository(engine), max_age_s=3600.0)  # loads once

    assert await reloading.phones() == await cached.phones() == {OUT}
    assert await cached.holds(OUT) and not await cached.holds(KEPT)

    # News of an opt-out is applied at once; where the database has not caught up (another process's write, say)
    # the set holds the phone, but no message is held back on its word alone, and the stale entry goes.
    cached.add(KEPT)
    assert await cached.phones() == {OUT, KEPT}
    assert not await cached.holds(KEPT)
    assert await cached.phones() == {OUT}

    # Taken back in the database: a reload ends it (the set was only ever added to before), and a set not yet
    # reloaded holds nothing back either.
    async with engine.begin() as conn:
        await conn.execute(update(leads).where(leads.c.phone == OUT).values(opted_out_at=None))
    assert await reloading.phones() == set()
    assert not await cached.holds(OUT)
    assert await cached.phones() == set()
