"""The outbox's companions (`outbox_due`: rows still to send; `outbox_sent`, `outbox_failed`: each send and failure
by device and time) stay in step with the outbox through everything that queues or settles a row, on both backends;
on Postgres, marking a row sent is an update that touches no index (what the split is for), and what keeps it so:
the history writer looks rows up by key whatever the statistics say, and no connection idles in a transaction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Uuid, column, inspect, select, text
from sqlalchemy import table as table_clause
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.db.migration_steps import device_under, downgrade_to, upgrade_to
from wamd_server.domain.models import Campaign, CampaignStatus, OutboxStatus, Role, SourceKind
from wamd_server.domain.ports import Sent
from wamd_server.infra.db import migrate
from wamd_server.infra.db.campaigns import SqlCampaignRepository
from wamd_server.infra.db.devices import SqlDeviceRepository
from wamd_server.infra.db.engine import create_engine, driver_connection
from wamd_server.infra.db.leader import LeaderLock
from wamd_server.infra.db.locked_batch import LockedBatches
from wamd_server.infra.db.messages import HISTORY_FROM_OUTBOX_PG, PREVIEW_CHARS, STATUS_ORDER
from wamd_server.infra.db.outbox import NewMessage, SqlOutboxRepository, execute_record_sent
from wamd_server.infra.db.tables import outbox, outbox_due, outbox_failed, outbox_sent
from wamd_server.infra.db.types import UtcDateTime
from wamd_server.infra.db.users import SqlUserRepository

T0 = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)
PHONES = [f"6019900010{n}" for n in range(6)]


def _due_key(row: Any) -> tuple[Any, ...]:
    return row["device_id"], row["source_id"], row["scheduled_at"], row["seq"]


async def tables(engine: AsyncEngine) -> dict[str, Any]:
    """The outbox rows by status, and what the two companion tables hold, as comparable values."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox))).mappings().all()
        due = (await conn.execute(select(outbox_due))).mappings().all()
        sent = (await conn.execute(select(outbox_sent))).mappings().all()
        failed = (await conn.execute(select(outbox_failed))).all()
    waiting = {OutboxStatus.QUEUED.value, OutboxStatus.SENDING.value}
    return {
        "expected_due": {r["id"]: _due_key(r) for r in rows if r["status"] in waiting},
        "due": {d["id"]: _due_key(d) for d in due},
        "expected_sent": {(r["device_id"], r["sent_at"], r["id"]) for r in rows if r["status"] == "sent"},
        "sent": {(s["device_id"], s["sent_at"], s["outbox_id"]) for s in sent},
        "status": {r["recipient"]: r["status"] for r in rows},
        "failed": {tuple(f) for f in failed},
    }


async def in_step(engine: AsyncEngine) -> dict[str, str]:
    found = await tables(engine)
    assert found["due"] == found["expected_due"]
    assert found["sent"] == found["expected_sent"]
    status: dict[str, str] = found["status"]
    return status


async def running_campaign(engine: AsyncEngine, title: str = "Promo") -> Campaign:
    users = SqlUserRepository(engine)
    found = await users.by_email("owner@example.com")
    owner = found.user if found else await users.add("owner@example.com", "hash", Role.ADMIN, "")
    campaign = Campaign(uuid.uuid4(), owner.id, "broadcast", title, "hi", T0, CampaignStatus.RUNNING)
    return await SqlCampaignRepository(engine).add(campaign, T0)


async def test_due_rows_and_sends_follow_every_change_of_a_row(engine: AsyncEngine) -> None:
    devices = SqlDeviceRepository(engine)
    first = await devices.add("First", None, None)
    second = await devices.add("Second", None, None)
    rows = SqlOutboxRepository(engine)
    source = (await running_campaign(engine)).id
    new = [
        NewMessage(first.id, phone, f"hi {n}", SourceKind.CAMPAIGN, f"k{n}", T0, source_id=source)
        for n, phone in enumerate(PHONES)
    ]
    assert await rows.enqueue(new, T0) == 6
    assert await rows.enqueue(new, T0) == 0  # producing twice adds nothing, in either table
    assert set((await in_step(engine)).values()) == {"queued"}
    assert await rows.next_due(first.id) == T0

    claimed = await rows.claim(first.id, T0, 4)
    assert [i.recipient for i in claimed] == PHONES[:4]
    await in_step(engine)
    assert [i.id for i in await rows.in_flight(first.id)] == [i.id for i in claimed]
    assert await rows.next_due(first.id) == T0  # rows 4 and 5 still queued

    sent_at = T0 + timedelta(seconds=5)
    await rows.record_sent(first.id, [Sent(claimed[0].id, sent_at, sent_at, claimed[0].wa_message_id)], [])
    await rows.record_sent(first.id, [Sent(claimed[0].id, sent_at, sent_at, claimed[0].wa_message_id)], [])
    await rows.mark_failed(claimed[1].id, "not on WhatsApp", T0)
    await rows.mark_cancelled(claimed[2].id, "opted out", T0)
    later = T0 + timedelta(minutes=10)
    await rows.retry_later(claimed[3].id, later, "timeout", T0)
    status = await in_step(engine)
    assert [status[p] for p in PHONES] == ["sent", "failed", "cancelled", "queued", "queued", "queued"]
    assert await rows.sent_since(first.id, T0) == [sent_at]  # settled once: one send
    assert await rows.sent_since(second.id, T0) == []
    assert (await tables(engine))["failed"] == {(first.id, T0, claimed[1].id)}
    week_ago = T0 - timedelta(days=7)
    record = await rows.device_history([first.id, second.id], week_ago)
    assert record[first.id] == {"sent": 1, "failed": 1, "replied": 0}
    assert record[second.id] == {"sent": 0, "failed": 0, "replied": 0}

    assert await rows.retry_failed(source, None, T0 + timedelta(minutes=1)) == 1
    assert (await rows.device_history([first.id], week_ago))[first.id]["failed"] == 0  # failed no more
    assert await rows.cancel_for_recipient(PHONES[4], "opted out", T0) == 1
    status = await in_step(engine)
    assert [status[p] for p in PHONES] == ["sent", "queued", "cancelled", "queued", "cancelled", "queued"]

    overview = await rows.queue_overview([first.id, second.id], sent_at)
    assert overview[first.id] == {"queued": 3, "sending": 0, "sent_last_hour": 1, "next_due": T0}
    assert second.id not in overview

    # A queued row given to another device takes its place in that device's queue.
    moved = await SqlCampaignRepository(engine).move_rows({claimed[3].id: second.id}, T0)
    assert moved == 1
    await in_step(engine)
    assert await rows.next_due(second.id) == later
    assert [i.recipient for i in await rows.claim(second.id, later, 10)] == [PHONES[3]]

    assert await rows.cancel_source(source, "campaign cancelled", T0) == 2
    status = await in_step(engine)
    assert [status[p] for p in PHONES] == ["sent", "cancelled", "cancelled", "sending", "cancelled", "cancelled"]
    assert await rows.next_due(first.id) is None

    # The device's rows, sends and failures go with it.
    assert await devices.delete(first.id)
    left = await tables(engine)
    assert left["sent"] == left["failed"] == set()
    assert set(left["due"]) == {claimed[3].id}  # the row moved to the second device


async def test_rows_queued_again_after_their_campaign_ended_are_cancelled(engine: AsyncEngine) -> None:
    """A campaign's cancel leaves its `sending` rows alone; released later (the device went away before sending
    them) or queued to be tried again, those of a cancelled or deleted campaign are cancelled, not left queued for
    a campaign that never sends again. Those of a running campaign are queued again."""
    device = await SqlDeviceRepository(engine).add("Only", None, None)
    repo = SqlCampaignRepository(engine)
    made = {name: await running_campaign(engine, name) for name in ("running", "cancelled", "deleted", "retried")}
    rows = SqlOutboxRepository(engine)
    new = [
        NewMessage(device.id, phone, "hi", SourceKind.CAMPAIGN, name, T0, source_id=made[name].id)
        for phone, name in zip(PHONES, made, strict=False)
    ]
    await rows.enqueue(new, T0)
    claimed = await rows.claim(device.id, T0, 10)
    assert len(claimed) == 4
    for name in ("cancelled", "retried"):
        await repo.transition(made[name].id, [CampaignStatus.RUNNING], T0, status=CampaignStatus.CANCELLED)
        assert await rows.cancel_source(made[name].id, "campaign cancelled", T0) == 0  # `sending`: left alone
    assert await repo.delete(made["deleted"].id)

    await rows.release([item.id for item in claimed[:3]], T0)
    await rows.retry_later(claimed[3].id, T0 + timedelta(minutes=1), "timeout", T0)
    status = await in_step(engine)
    assert [status[p] for p in PHONES[:4]] == ["queued", "cancelled", "cancelled", "cancelled"]
    async with engine.connect() as conn:
        errors = dict((await conn.execute(select(outbox.c.recipient, outbox.c.last_error))).all())
    assert [errors[p] for p in PHONES[1:4]] == ["campaign cancelled", "campaign deleted", "campaign cancelled"]
    assert await rows.next_due(device.id) == T0
    assert [i.recipient for i in await rows.claim(device.id, T0, 10)] == [PHONES[0]]


async def test_a_locked_batch_settles_its_rows_in_both_tables(fresh_pg_url: str) -> None:
    engine = create_engine(fresh_pg_url)
    await migrate.upgrade(engine)
    try:
        device = await SqlDeviceRepository(engine).add("Locked", None, None)
        rows = SqlOutboxRepository(engine)
        await rows.enqueue(
            [NewMessage(device.id, p, "hi", SourceKind.MANUAL, f"l{n}", T0) for n, p in enumerate(PHONES[:4])], T0
        )
        async with LockedBatches(engine, max_open=1).batch(device.id, T0, 10) as batch:
            first, second, third, _ = batch.items
            await batch.sent([Sent(first.id, T0, T0, first.wa_message_id)], [])
            await batch.failed(second.id, "not on WhatsApp", T0)
            await batch.retry_later(third.id, T0 + timedelta(hours=1), "timeout", T0)
        status = await in_step(engine)
        assert [status[p] for p in PHONES[:4]] == ["sent", "failed", "queued", "queued"]
        assert (await tables(engine))["failed"] == {(device.id, T0, second.id)}
        assert await rows.next_due(device.id) == T0  # the fourth; the third waits an hour
    finally:
        await engine.dispose()


async def test_marking_a_batch_sent_adds_no_index_entry_on_postgres(fresh_pg_url: str) -> None:
    """Every index of `outbox` holds only columns that marking a row sent leaves alone, so Postgres writes the new
    version beside the old one (a HOT update, given room on the page: ten rows leave most of it free) instead of
    adding an entry to each index."""
    engine = create_engine(fresh_pg_url)
    await migrate.upgrade(engine)
    try:
        device = await SqlDeviceRepository(engine).add("Hot", None, None)
        rows = SqlOutboxRepository(engine)
        await rows.enqueue(
            [NewMessage(device.id, f"6019901{n:04d}", "hi", SourceKind.MANUAL, f"h{n}", T0) for n in range(10)], T0
        )
        async with engine.connect() as conn:
            ids = list((await conn.execute(select(outbox.c.id))).scalars())
        async with driver_connection(engine) as pg:
            # The counters of this transaction, read inside it (nothing else adds to them).
            await pg.execute("BEGIN")
            params = {
                "ids": ids,
                "sent_at": [T0] * 10,
                "server_ts": [T0] * 10,
                "sent": "sent",
                "held_as": "queued",  # as a locked batch holds them
                "counted": 1,
            }
            await execute_record_sent(pg, device.id, params, [])
            counts = await (
                await pg.execute(
                    "SELECT pg_stat_get_xact_tuples_updated('outbox'::regclass), "
                    "pg_stat_get_xact_tuples_hot_updated('outbox'::regclass)"
                )
            ).fetchone()
            await pg.execute("COMMIT")
        assert counts == (10, 10)
        assert set((await in_step(engine)).values()) == {"sent"}
    finally:
        await engine.dispose()


# --- migration 0007 --------------------------------------------------------------------------------------------

# `outbox` as revision 0006 left it (the columns this test writes), typed for both backends.
OLD_OUTBOX = table_clause(
    "outbox",
    column("id", Uuid),
    column("seq"),
    column("device_id", Uuid),
    column("recipient"),
    column("source_kind"),
    column("source_id", Uuid),
    column("source_key"),
    column("wa_message_id"),
    column("status"),
    column("scheduled_at", UtcDateTime),
    column("sent_at", UtcDateTime),
    column("created_at", UtcDateTime),
    column("updated_at", UtcDateTime),
)


def _indexes(conn: Connection) -> set[tuple[str, ...]]:
    """The outbox's own indexes (not those behind its unique constraints)."""
    return {tuple(i["column_names"]) for i in inspect(conn).get_indexes("outbox") if i["name"].startswith("ix_")}


async def test_rows_stored_before_the_split_are_due_and_sent_after_it_and_back(
    fresh_pg_url: str,
    tmp_path: Any,
) -> None:
    for url in (fresh_pg_url, f"sqlite+aiosqlite:///{tmp_path / 'split.db'}"):
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                device = await device_under(conn, "0006", T0)
                source = uuid.uuid4()
                ids = {}
                for n, status in enumerate(["queued", "sending", "sent", "failed"]):
                    ids[status] = uuid.uuid4()
                    await conn.execute(
                        OLD_OUTBOX.insert(),
                        {
                            "id": ids[status],
                            "seq": n,
                            "device_id": device,
                            "recipient": PHONES[n],
                            "source_kind": "campaign",
                            "source_id": source,
                            "source_key": f"old-{n}",
                            "wa_message_id": f"WA{n}",
                            "status": status,
                            "scheduled_at": T0,
                            "sent_at": T0 + timedelta(seconds=n) if status == "sent" else None,
                            "created_at": T0,
                            "updated_at": T0,
                        },
                    )
                await conn.run_sync(upgrade_to, "head")
                due = (await conn.execute(text("SELECT id FROM outbox_due"))).scalars().all()
                assert {uuid.UUID(str(d)) for d in due} == {ids["queued"], ids["sending"]}
                logged = (await conn.execute(select(outbox_sent))).all()
                assert [(r.device_id, r.sent_at, r.outbox_id) for r in logged] == [
                    (device, T0 + timedelta(seconds=2), ids["sent"])
                ]
                failures = (await conn.execute(select(outbox_failed))).all()
                assert [tuple(r) for r in failures] == [(device, T0, ids["failed"])]
                assert await conn.run_sync(_indexes) == {("device_id",), ("source_id",), ("recipient",)}
                await conn.run_sync(downgrade_to, "0006")
                names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
                assert not {"outbox_due", "outbox_sent", "outbox_failed"} & names
                assert await conn.run_sync(_indexes) == {
                    ("device_id", "status", "scheduled_at", "seq"),
                    ("source_kind", "source_id", "status"),
                    ("device_id", "sent_at"),
                    ("recipient", "status"),
                }
                count = (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
                assert count == 4
        finally:
            await engine.dispose()


async def test_the_history_writer_looks_sends_up_by_key_whatever_the_statistics_say(fresh_pg_url: str) -> None:
    """Statistics taken while a broadcast was queued say no outbox row is `sent`, and no index holds `status`: the
    history statement must still look each send up by its key, not scan the outbox (once per send, it did)."""
    engine = create_engine(fresh_pg_url)
    await migrate.upgrade(engine)
    try:
        device = await SqlDeviceRepository(engine).add("Stats", None, None)
        new = [NewMessage(device.id, f"6019902{n:04d}", "hi", SourceKind.MANUAL, f"s{n}", T0) for n in range(2000)]
        await SqlOutboxRepository(engine).enqueue(new, T0)
        async with driver_connection(engine) as pg:
            await pg.execute("ANALYZE outbox")
            await pg.execute("UPDATE outbox SET status = 'sent', sent_at = %s", (T0,))
            ids = [r[0] for r in await (await pg.execute("SELECT id FROM outbox")).fetchall()]
            params = {
                "ids": ids,
                "texts": [None] * len(ids),
                "statuses": ["delivered"] * len(ids),
                "order": list(STATUS_ORDER),
                "at_server": "@s.whatsapp.net",
                "preview_chars": PREVIEW_CHARS,
                "now": T0,
            }
            explained = await (await pg.execute("EXPLAIN " + HISTORY_FROM_OUTBOX_PG, params)).fetchall()
        plan = "\n".join(r[0] for r in explained)
        assert "Seq Scan on outbox" not in plan
        assert "Index Scan using pk_outbox on outbox" in plan
    finally:
        await engine.dispose()


async def test_the_planner_leader_holds_its_lock_without_an_open_transaction(fresh_pg_url: str) -> None:
    """The leader's connection keeps its advisory lock between checks, idle: a transaction left open on it would
    keep vacuum (and the outbox's HOT pruning) from removing any old row version of the database."""
    engine = create_engine(fresh_pg_url)
    try:
        leader = LeaderLock(engine)
        assert await leader.is_leader()
        assert await leader.is_leader()  # the check on the connection it holds
        async with driver_connection(engine) as pg:
            found = await pg.execute(
                "SELECT state FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            states = [r[0] for r in await found.fetchall()]
        assert states and "idle in transaction" not in states
        await leader.release()
    finally:
        await engine.dispose()
