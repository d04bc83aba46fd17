"""Storage on both backends (Postgres and SQLite): migrations, and the repositories' guarantees."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, Connection, Uuid, column, func, inspect, select, text
from sqlalchemy import table as table_clause
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.db.migration_steps import device_under, downgrade_to, upgrade_to
from wamd_server.domain.errors import Conflict
from wamd_server.domain.events import Receipt, ReceiptType
from wamd_server.domain.models import Device, DeviceStatus, InboundMessage, OutboxItem, Role, SourceKind
from wamd_server.domain.ports import DeviceScope, Sent
from wamd_server.infra.db import migrate
from wamd_server.infra.db.devices import DEVICE_BY_ID_PG, SqlDeviceRepository, device_from_tuple
from wamd_server.infra.db.engine import create_engine, driver_connection
from wamd_server.infra.db.locked_batch import LOCK_DUE_PG, LockedBatches
from wamd_server.infra.db.messages import SqlMessageRepository
from wamd_server.infra.db.outbox import CLAIM_COLUMNS, NewMessage, SqlOutboxRepository
from wamd_server.infra.db.sessions import SqlSessionStore
from wamd_server.infra.db.tables import chats, messages, metadata, outbox
from wamd_server.infra.db.types import UtcDateTime
from wamd_server.infra.db.users import SqlTokenRepository, SqlUserRepository
from wamd_server.services.history import HistoryWriter
from wamd_server.services.receipts import ANNOUNCE_PER_DEVICE, ANNOUNCE_PER_FLUSH, ReceiptBatcher
from wamd_server.services.users import UserService

EVERYTHING = DeviceScope.everything()
CONTACT = "60199000020"
CONTACT_JID = f"{CONTACT}@s.whatsapp.net"
T0 = datetime(2024, 6, 1, 9, 0, tzinfo=UTC)


# --- migrations ------------------------------------------------------------------------------------------------


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(migrate.alembic_config()).get_heads())


def current_revisions(conn: Connection) -> set[str]:
    return set(MigrationContext.configure(conn).get_current_heads())


async def test_migrations_are_idempotent(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate.upgrade(engine)
        await migrate.upgrade(engine)
        assert await migrate.pending_revisions(engine) == []
        async with engine.connect() as conn:
            assert await conn.run_sync(current_revisions) == head_revisions()
    finally:
        await engine.dispose()


def describe_schema(conn: Connection) -> dict[str, Any]:
    """Tables, columns (nullability), primary keys, unique constraints, foreign keys and indexes by columns."""
    insp = inspect(conn)
    schema: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        if table == "alembic_version":
            continue
        schema[table] = {
            "columns": {c["name"]: c["nullable"] for c in insp.get_columns(table)},
            "pk": sorted(insp.get_pk_constraint(table)["constrained_columns"]),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], (f.get("options") or {}).get("ondelete"))
                for f in insp.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(table)
                if not i.get("duplicates_constraint")
            ),
        }
    return schema


def drift(conn: Connection) -> list[Any]:
    """Differences between the migrated database and `tables.py` (what `alembic revision --autogenerate` would
    write)."""
    return list(compare_metadata(MigrationContext.configure(conn), metadata))


async def test_fresh_databases_get_the_same_schema_on_both_backends(fresh_pg_url: str, tmp_path: Any) -> None:
    schemas = []
    for url in (fresh_pg_url, f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"):
        engine = create_engine(url)
        try:
            assert set(await migrate.pending_revisions(engine)) >= head_revisions()
            await migrate.upgrade(engine)
            assert await migrate.pending_revisions(engine) == []
            async with engine.connect() as conn:
                schemas.append(await conn.run_sync(describe_schema))
                assert await conn.run_sync(drift) == [], url.split(":")[0]
        finally:
            await engine.dispose()
    postgres, sqlite = schemas
    assert set(postgres) == {t.name for t in metadata.sorted_tables}
    assert postgres == sqlite


# The tables as revision 0005 left them (the columns these tests write), typed for both backends.
OLD_MESSAGES = table_clause(
    "messages",
    column("id", Uuid),
    column("device_id", Uuid),
    column("chat_jid"),
    column("wa_message_id"),
    column("from_me", Boolean),
    column("text"),
    column("sent_at", UtcDateTime),
    column("created_at", UtcDateTime),
)
OLD_CHATS = table_clause(
    "chats",
    column("id", Uuid),
    column("device_id", Uuid),
    column("jid"),
    column("is_group", Boolean),
    column("last_message_text"),
    column("unread_count"),
    column("created_at", UtcDateTime),
)


def _history_rows(conn: Connection) -> list[Any]:
    found = conn.execute(
        text(
            "SELECT m.wa_message_id, m.text, c.jid, c.last_message_text FROM messages m JOIN chats c "
            "ON c.device_id = m.device_id AND c.jid = m.chat_jid ORDER BY m.wa_message_id"
        )
    )
    return [tuple(r) for r in found]


async def test_history_stored_before_the_natural_keys_migration_survives_it_both_ways(
    fresh_pg_url: str, tmp_path: Any
) -> None:
    """0006 turns the unique (device, message id) and (device, chat) into the primary keys of `messages` and
    `chats`, dropping their unused uuid ids: rows stored before are kept, and kept again by the downgrade."""
    for url in (fresh_pg_url, f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"):
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                device = await device_under(conn, "0005", T0)
                for n in (1, 2):
                    jid, said = f"6019900000{n}@s.whatsapp.net", f"hello {n}"
                    common = {"id": uuid.uuid4(), "device_id": device, "created_at": T0}
                    await conn.execute(
                        OLD_MESSAGES.insert(),
                        {
                            **common,
                            "chat_jid": jid,
                            "wa_message_id": f"WA{n}",
                            "from_me": True,
                            "text": said,
                            "sent_at": T0,
                        },
                    )
                    await conn.execute(
                        OLD_CHATS.insert(),
                        {**common, "jid": jid, "is_group": False, "last_message_text": said, "unread_count": 0},
                    )
                before = await conn.run_sync(_history_rows)
                await conn.run_sync(upgrade_to, "head")
                assert await conn.run_sync(_history_rows) == before
                keys = await conn.run_sync(lambda c: {t: _keys(c, t) for t in ("messages", "chats")})
                assert keys == {"messages": (["device_id", "wa_message_id"], []), "chats": (["device_id", "jid"], [])}
                await conn.run_sync(downgrade_to, "0005")
                assert await conn.run_sync(_history_rows) == before and len(before) == 2
                ids = await conn.execute(text("SELECT count(DISTINCT id) FROM messages"))
                assert ids.scalar_one() == 2
                keys = await conn.run_sync(lambda c: {t: _keys(c, t) for t in ("messages", "chats")})
                assert keys == {
                    "messages": (["id"], [("device_id", "wa_message_id")]),
                    "chats": (["id"], [("device_id", "jid")]),
                }
        finally:
            await engine.dispose()


def _keys(conn: Connection, table: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """A table's primary key columns and its unique constraints' columns."""
    insp = inspect(conn)
    unique = sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table))
    return insp.get_pk_constraint(table)["constrained_columns"], unique


# --- users and tokens ------------------------------------------------------------------------------------------


async def test_user_emails_are_unique_whatever_their_case(engine: AsyncEngine) -> None:
    users = SqlUserRepository(engine)
    service = UserService(users, SqlDeviceRepository(engine))
    ann = await service.create("  Ann@Example.COM ", "password-123", Role.STAFF, "Ann")
    assert ann.email == "ann@example.com"
    with pytest.raises(Conflict):
        await service.create("ann@example.com", "password-456", Role.ADMIN)
    with pytest.raises(Conflict):
        await users.add("ann@example.com", "hash", Role.STAFF, "")
    creds = await users.by_email("ann@example.com")
    assert creds is not None and creds.user.id == ann.id and creds.user.role is Role.STAFF


async def test_tokens_expire_and_die_with_deactivation(engine: AsyncEngine) -> None:
    users, tokens = SqlUserRepository(engine), SqlTokenRepository(engine)
    user = await users.add("tok@example.com", "hash", Role.STAFF, "")
    now = datetime.now(UTC)
    await tokens.add(user.id, "a" * 64, now + timedelta(hours=1))
    await tokens.add(user.id, "b" * 64, now + timedelta(days=30))

    found = await tokens.user_for("a" * 64, now)
    assert found is not None and found.id == user.id
    assert await tokens.user_for("a" * 64, now + timedelta(hours=1)) is None  # expired at expires_at
    assert await tokens.user_for("c" * 64, now) is None
    assert await tokens.purge_expired(now + timedelta(hours=2)) == 1
    assert await tokens.user_for("b" * 64, now + timedelta(hours=2)) is not None

    await users.update(user.id, is_active=False)
    assert await tokens.user_for("b" * 64, now) is None
    await users.update(user.id, is_active=True)
    assert await tokens.user_for("b" * 64, now) is None  # deactivation ended the session for good


# --- devices and grants ----------------------------------------------------------------------------------------


async def test_staff_see_only_granted_devices(engine: AsyncEngine) -> None:
    users, devices = SqlUserRepository(engine), SqlDeviceRepository(engine)
    admin = await users.add("boss@example.com", "hash", Role.ADMIN, "")
    ann = await users.add("ann@example.com", "hash", Role.STAFF, "")
    bob = await users.add("bob@example.com", "hash", Role.STAFF, "")
    own = await devices.add("Ann's", created_by=ann.id, grant_to=ann.id)
    shared = await devices.add("Shared", created_by=admin.id, grant_to=None)
    spare = await devices.add("Spare", created_by=admin.id, grant_to=None)
    await users.set_grants(bob.id, [shared.id, spare.id, shared.id])  # duplicates are harmless

    ann_scope, bob_scope = DeviceScope(ann.id), DeviceScope(bob.id)
    assert await devices.get(own.id, ann_scope) is not None
    assert await devices.get(shared.id, ann_scope) is None
    assert [d.id for d in await devices.list_page(ann_scope, 100, None)] == [own.id]
    assert {d.id for d in await devices.list_page(bob_scope, 100, None)} == {shared.id, spare.id}
    assert await users.granted_device_ids(bob.id) == {shared.id, spare.id}

    everything = await devices.list_page(EVERYTHING, 100, None)
    assert {d.id for d in everything} == {own.id, shared.id, spare.id}
    first = await devices.list_page(EVERYTHING, 2, None)
    rest = await devices.list_page(EVERYTHING, 2, (first[-1].created_at, first[-1].id))
    assert [d.id for d in first + rest] == [d.id for d in everything]

    await users.set_grants(bob.id, [spare.id])  # replaces
    assert await devices.get(shared.id, bob_scope) is None
    assert await devices.delete(spare.id)
    assert await users.granted_device_ids(bob.id) == set()  # the grant went with the device
    await users.delete(ann.id)
    assert await devices.get(own.id, EVERYTHING) is not None  # the device stays when its creator goes


async def test_utc_datetime_round_trips_aware_utc_and_rejects_naive(engine: AsyncEngine) -> None:
    devices = SqlDeviceRepository(engine)
    device = await devices.add("Clock", created_by=None, grant_to=None)
    assert device.created_at.utcoffset() == timedelta(0)

    local = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=ZoneInfo("Asia/Kuala_Lumpur"))
    stored = await devices.set_fields(device.id, last_seen_at=local)
    assert stored is not None
    assert stored.last_seen_at == local
    assert stored.last_seen_at is not None and stored.last_seen_at.tzinfo == UTC
    assert stored.last_seen_at.replace(tzinfo=None) == datetime(2024, 1, 1, 19, 4, 5, 678901)
    again = await devices.get(device.id, EVERYTHING)
    assert again is not None and again.last_seen_at == local and again.last_seen_at.tzinfo == UTC

    with pytest.raises(StatementError) as caught:
        await devices.set_fields(device.id, last_seen_at=datetime(2024, 1, 2, 3, 4, 5))
    assert isinstance(caught.value.orig, ValueError)
    unchanged = await devices.get(device.id, EVERYTHING)
    assert unchanged is not None and unchanged.last_seen_at == local


# --- messages and chats ----------------------------------------------------------------------------------------


def inbound(
    wa_id: str, text: str, at: datetime, *, from_me: bool = False, push_name: str | None = "Cathy"
) -> InboundMessage:
    return InboundMessage(
        wa_id=wa_id,
        chat_jid=CONTACT_JID,
        sender_jid=CONTACT_JID,
        sender_phone="60199000020",
        from_me=from_me,
        is_group=False,
        text=text,
        timestamp=at,
        push_name=push_name,
    )


async def chat_row(engine: AsyncEngine, device_id: UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        query = select(chats).where(chats.c.device_id == device_id, chats.c.jid == CONTACT_JID)
        return dict((await conn.execute(query)).mappings().one())


async def message_count(engine: AsyncEngine, device_id: UUID) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(messages).where(messages.c.device_id == device_id)
        return int((await conn.execute(query)).scalar_one())


async def test_messages_are_stored_once_and_the_chat_only_moves_forward(engine: AsyncEngine) -> None:
    devices, repo = SqlDeviceRepository(engine), SqlMessageRepository(engine)
    device = await devices.add("Inbox", None, None)
    other = await devices.add("Other", None, None)

    assert await repo.store_inbound(device.id, inbound("W1", "first", T0)) is True
    assert await repo.store_inbound(device.id, inbound("W1", "first, redelivered", T0)) is False
    assert await message_count(engine, device.id) == 1
    chat = await chat_row(engine, device.id)
    assert (chat["unread_count"], chat["last_message_text"], chat["last_message_at"], chat["name"]) == (
        1,
        "first",
        T0,
        "Cathy",
    )

    await repo.store_inbound(device.id, inbound("W2", "second", T0 + timedelta(minutes=5), push_name=None))
    chat = await chat_row(engine, device.id)
    assert (chat["unread_count"], chat["last_message_text"], chat["name"]) == (2, "second", "Cathy")

    # history arriving late: stored and counted, but the chat keeps showing the newest message
    await repo.store_inbound(device.id, inbound("W0", "older", T0 - timedelta(hours=1)))
    chat = await chat_row(engine, device.id)
    assert (chat["unread_count"], chat["last_message_text"], chat["last_message_at"]) == (
        3,
        "second",
        T0 + timedelta(minutes=5),
    )

    # our own message from the phone: newest, so it is the preview; it is not unread
    await repo.store_inbound(device.id, inbound("W3", "my reply", T0 + timedelta(minutes=6), from_me=True))
    chat = await chat_row(engine, device.id)
    assert (chat["unread_count"], chat["last_message_text"]) == (3, "my reply")
    assert await message_count(engine, device.id) == 4

    # the same message id on another device is another message
    assert await repo.store_inbound(other.id, inbound("W1", "first", T0)) is True

    # deleting a device deletes its history, and only its own
    assert await devices.delete(device.id)
    assert await message_count(engine, device.id) == 0
    assert await message_count(engine, other.id) == 1
    async with engine.connect() as conn:
        left = (await conn.execute(select(chats.c.device_id))).scalars().all()
    assert left == [other.id]


async def test_receipts_only_move_a_message_forward(engine: AsyncEngine) -> None:
    devices, repo = SqlDeviceRepository(engine), SqlMessageRepository(engine)
    device = await devices.add("Receipts", None, None)
    await repo.store_inbound(device.id, inbound("OUT1", "from us", T0, from_me=True))
    await repo.store_inbound(device.id, inbound("OUT2", "from us too", T0, from_me=True))
    await repo.store_inbound(device.id, inbound("IN1", "from them", T0))

    async def status(wa_id: str) -> str | None:
        async with engine.connect() as conn:
            query = select(messages.c.status).where(
                messages.c.device_id == device.id, messages.c.wa_message_id == wa_id
            )
            return (await conn.execute(query)).scalar_one()  # type: ignore[no-any-return]

    assert await status("OUT1") == "sent"
    d = device.id
    found = await repo.mark_status([(d, "OUT1"), (d, "OUT2")], "delivered")
    assert found == {(d, "OUT1"), (d, "OUT2")}
    await repo.mark_status([(d, "OUT1")], "read")
    await repo.mark_status([(d, "OUT1"), (d, "OUT2")], "delivered")  # a late receipt changes nothing
    assert (await status("OUT1"), await status("OUT2")) == ("read", "delivered")
    await repo.mark_status([(d, "OUT1")], "sent")
    await repo.mark_status([(d, "OUT1")], "played")
    await repo.mark_status([(d, "OUT1")], "read")
    assert await status("OUT1") == "played"

    assert await repo.mark_status([(d, "IN1")], "read") == set()  # receipts are about our own messages
    assert await status("IN1") is None
    assert await repo.mark_status([(d, "OUT2")], "exploded") == set()
    assert await repo.mark_status([], "read") == set()
    # Another device's message id, and a message not stored yet, are not found.
    assert await repo.mark_status([(uuid.uuid4(), "OUT2"), (d, "NOT-YET")], "read") == set()
    assert await status("OUT2") == "delivered"


async def test_sends_stored_later_take_the_receipts_that_came_meanwhile(engine: AsyncEngine) -> None:
    """Unpaced sends join the chat history a moment after they went out (`HistoryWriter`), each message read from
    its outbox row: the receipts that arrive meanwhile are not looked up in vain but stored with their messages,
    and announced all the same; a message stored already only moves forward."""
    devices, repo, rows = SqlDeviceRepository(engine), SqlMessageRepository(engine), SqlOutboxRepository(engine)
    device = await devices.add("Later history", None, None)
    d = device.id
    looked_up: list[list[tuple[UUID, str]]] = []
    announced: list[Receipt] = []

    class Store:
        async def mark_status(self, keys: list[tuple[UUID, str]], status: str) -> set[tuple[UUID, str]]:
            looked_up.append(keys)
            return await repo.mark_status(keys, status)

    async def announce(receipts: list[Receipt]) -> None:
        announced.extend(receipts)

    async def sent_rows(device_id: UUID, *names: str, edited: str | None = None) -> dict[str, Sent]:
        """Outbox rows of these names sent (as a lane records them: its history left to the writer)."""
        new = [
            NewMessage(device_id, CONTACT, f"text of {n}", SourceKind.MANUAL, f"later-{device_id}-{n}", T0)
            for n in names
        ]
        await rows.enqueue(new, T0)
        items = {i.text.removeprefix("text of "): i for i in await rows.claim(device_id, T0, 100)}
        sent = {
            n: Sent(i.id, T0, T0 + timedelta(seconds=1 + names.index(n)), i.wa_message_id, edited)
            for n, i in items.items()
        }
        await rows.record_sent(device_id, list(sent.values()), [])
        return sent

    async def stored(wa_id: str) -> tuple[str, str, datetime] | None:
        async with engine.connect() as conn:
            query = select(messages.c.status, messages.c.text, messages.c.sent_at).where(
                messages.c.device_id == d, messages.c.wa_message_id == wa_id
            )
            row = (await conn.execute(query)).one_or_none()
            return None if row is None else (row.status, row.text, row.sent_at)

    async def status(wa_id: str) -> str | None:
        row = await stored(wa_id)
        return None if row is None else row[0]

    sent = await sent_rows(d, "H1", "H2", "H3")
    h1, h2, h3 = (sent[n].wa_id for n in ("H1", "H2", "H3"))
    receipts = ReceiptBatcher(Store(), announce)
    writer = HistoryWriter(repo, receipts)
    writer.add(d, [sent["H1"], sent["H2"], sent["H2"]])  # H2 handed over twice: stored once
    receipts.add(Receipt(d, CONTACT_JID, (h1, h2), ReceiptType.DELIVERED, T0))
    receipts.add(Receipt(d, CONTACT_JID, (h1,), ReceiptType.READ, T0))
    await receipts.flush()
    assert (looked_up, announced) == ([], [])  # the messages are not stored yet: nobody looks for them
    await writer.flush()
    # The message as its row has it: text, and the server's time of the send; the chat shows the latest.
    assert await stored(h1) == ("read", "text of H1", T0 + timedelta(seconds=1))
    assert await status(h2) == "delivered"
    assert await message_count(engine, d) == 2
    async with engine.connect() as conn:
        chat = (await conn.execute(select(chats.c.jid, chats.c.last_message_text).where(chats.c.device_id == d))).one()
    assert tuple(chat) == (CONTACT_JID, "text of H2")
    await receipts.flush()
    assert looked_up == []
    assert sorted((r.type.value, r.message_ids) for r in announced) == [
        ("delivered", (h1, h2)),
        ("read", (h1,)),
    ]

    # A receipt after the history was stored is stored as receipts are; a later store never moves a status back.
    announced.clear()
    receipts.add(Receipt(d, CONTACT_JID, (h2,), ReceiptType.READ, T0))
    await receipts.flush()
    assert looked_up == [[(d, h2)]] and [(r.type.value, r.message_ids) for r in announced] == [("read", (h2,))]
    writer.add(d, [sent["H1"]])
    await writer.close()
    assert (await status(h1), await status(h2)) == ("read", "read")
    assert await message_count(engine, d) == 2

    # Sends held while their batch commits: a receipt waits for them; if the batch fails, they are released and
    # the receipt is looked up as usual (and kept while its message is missing, for a later store to take).
    looked_up.clear()
    writer.hold(d, [sent["H3"]])
    receipts.add(Receipt(d, CONTACT_JID, (h3,), ReceiptType.DELIVERED, T0))
    await receipts.flush()
    assert looked_up == []
    writer.release(d, [sent["H3"]])
    await receipts.flush()
    assert looked_up == [[(d, h3)]]

    # A text a plugin changed before the send is the one in the history; a device deleted while its sends wait
    # takes them along, and the others' are stored.
    gone = await devices.add("Deleted meanwhile", None, None)
    lost = await sent_rows(gone.id, "G1")
    edited = await sent_rows(d, "H4", edited="changed by a plugin")
    writer.add(gone.id, [lost["G1"]])
    writer.add(d, [sent["H3"], edited["H4"]])
    assert await devices.delete(gone.id)
    await writer.close()
    await receipts.close()
    assert await status(h3) == "delivered"  # the receipt kept above, taken with its message
    h4 = await stored(edited["H4"].wa_id)
    assert h4 is not None and h4[1] == "changed by a plugin"
    assert await message_count(engine, gone.id) == 0


async def test_closing_the_history_writer_lets_a_write_finish_and_stores_the_rest_whole(engine: AsyncEngine) -> None:
    """A server stopping while the history writer stores a batch: the batch is not cancelled (and written again),
    and what waits is written in one statement, not one per device (thousands at the end of a broadcast)."""
    devices, repo, rows = SqlDeviceRepository(engine), SqlMessageRepository(engine), SqlOutboxRepository(engine)
    sent: dict[UUID, list[Sent]] = {}
    for n in range(3):
        device = await devices.add(f"Closing {n}", None, None)
        new = [NewMessage(device.id, CONTACT, "hi", SourceKind.MANUAL, f"closing-{n}-{k}", T0) for k in range(2)]
        await rows.enqueue(new, T0)
        sent[device.id] = [Sent(i.id, T0, T0, i.wa_message_id) for i in await rows.claim(device.id, T0, 10)]
        await rows.record_sent(device.id, sent[device.id], [])
    first, *others = sent
    writes: list[int] = []
    writing, go_on = asyncio.Event(), asyncio.Event()

    class Slow:
        async def store_sent(self, sends: Sequence[Any]) -> None:
            writes.append(len(sends))
            if len(writes) == 1:
                writing.set()
                await go_on.wait()
            await repo.store_sent(sends)

    writer = HistoryWriter(Slow(), None, flush_s=0)
    writer.add(first, sent[first])
    await writing.wait()
    for device_id in others:
        writer.add(device_id, sent[device_id])
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0)  # one turn of the loop: `close` is waiting for the write (or has cancelled it)
    go_on.set()
    await closing
    assert writes == [2, 4]
    assert await message_count(engine, first) == 2 and all([await message_count(engine, d) == 2 for d in others])


async def test_a_burst_of_receipts_is_stored_but_announced_within_budgets(engine: AsyncEngine) -> None:
    """A broadcast brings a receipt per chat over many devices at once: each flush announces at most
    `ANNOUNCE_PER_DEVICE` chats per device and `ANNOUNCE_PER_FLUSH` in all (clients are not flooded)."""
    announced: list[Receipt] = []

    async def announce(receipts: list[Receipt]) -> None:
        announced.extend(receipts)

    batcher = ReceiptBatcher(SqlMessageRepository(engine), announce)
    device_ids = [uuid.uuid4() for _ in range(30)]
    keys = [(d, f"B{d.hex[:8]}{n:03d}") for d in device_ids for n in range(25)]
    batcher.hold(keys)
    for d, wa_id in keys:
        batcher.add(Receipt(d, f"6019{wa_id[-3:]}@s.whatsapp.net", (wa_id,), ReceiptType.DELIVERED, T0))
    taken = batcher.take(keys)
    assert len(taken.statuses) == len(keys) == 750
    batcher.stored(taken)
    await batcher.flush()
    per_device = collections.Counter(r.device_id for r in announced)
    assert len(announced) == ANNOUNCE_PER_FLUSH
    assert max(per_device.values()) == ANNOUNCE_PER_DEVICE
    assert all(len(r.message_ids) == 1 for r in announced)
    await batcher.close()


class RecordingHistory:
    """Stands in for the history writer a locked batch hands its sends to (or releases them from)."""

    def __init__(self) -> None:
        self.handed: list[Sent] = []
        self.released: list[Sent] = []

    def hold(self, device_id: UUID, sent: Sequence[Sent]) -> None: ...

    def release(self, device_id: UUID, sent: Sequence[Sent]) -> None:
        self.released.extend(sent)

    def add(self, device_id: UUID, sent: Sequence[Sent]) -> None:
        self.handed.extend(sent)


@asynccontextmanager
async def three_queued(url: str, name: str, **engine_options: Any) -> AsyncIterator[tuple[AsyncEngine, Device]]:
    """A migrated database with one device and three messages queued for it, due at T0."""
    engine = create_engine(url, **engine_options)
    await migrate.upgrade(engine)
    try:
        device = await SqlDeviceRepository(engine).add(name, None, None)
        new = [NewMessage(device.id, CONTACT, f"text {n}", SourceKind.MANUAL, f"{name}-{n}", T0) for n in range(3)]
        await SqlOutboxRepository(engine).enqueue(new, T0)
        yield engine, device
    finally:
        await engine.dispose()


async def statuses_of(engine: AsyncEngine, device: Device) -> list[str]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(select(outbox.c.status).where(outbox.c.device_id == device.id))).scalars())


async def test_a_locked_batch_cancelled_while_committing_still_commits_and_hands_over_its_sends(
    fresh_pg_url: str,
) -> None:
    """A lane cancelled (its device went offline) just as its locked batch commits: the commit runs to its end
    before the cancel goes on; the sent rows are not put back in the queue (no ROLLBACK between its statements),
    and the history writer is given them."""
    async with three_queued(fresh_pg_url, "cancelled") as (engine, device):
        writer = RecordingHistory()
        batches = LockedBatches(engine, max_open=2, history=writer)

        async def lane() -> None:
            async with batches.batch(device.id, T0 + timedelta(seconds=1), 10) as batch:
                assert len(batch.items) == 3
                await batch.sent([Sent(i.id, T0, T0, i.wa_message_id) for i in batch.items], [])
                # The cancel lands while the batch is committing.
                asyncio.get_running_loop().call_soon(task.cancel)

        task = asyncio.create_task(lane())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await statuses_of(engine, device) == ["sent", "sent", "sent"]
        assert len(writer.handed) == 3 and not writer.released


async def test_a_locked_batch_whose_results_the_database_refuses_leaves_its_rows_queued(fresh_pg_url: str) -> None:
    """When writing the results fails, nothing of the batch is kept (its rows are queued again, with their message
    ids), its sends are released, and the next batch of the device takes the same rows on a connection that works."""
    async with three_queued(fresh_pg_url, "refused", pool_size=1) as (engine, device):
        async with engine.begin() as conn:  # the database refuses to mark rows sent (say, a full disk)
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_sent() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_sent BEFORE UPDATE ON outbox FOR EACH ROW "
                    "WHEN (NEW.status = 'sent') EXECUTE FUNCTION refuse_sent()"
                )
            )
        writer = RecordingHistory()
        batches = LockedBatches(engine, max_open=1, history=writer)
        with pytest.raises(Exception, match="refused"):
            async with batches.batch(device.id, T0 + timedelta(seconds=1), 10) as batch:
                first_ids = {i.wa_message_id for i in batch.items}
                await batch.sent([Sent(i.id, T0, T0, i.wa_message_id) for i in batch.items], [])
        assert batch.next_due is None and not batch.committed
        assert len(writer.released) == 3 and not writer.handed
        async with batches.batch(device.id, T0 + timedelta(seconds=1), 10) as again:
            assert {i.wa_message_id for i in again.items} == first_ids and len(first_ids) == 3
            await again.failed(again.items[0].id, "given up", T0)
        assert again.committed and again.next_due == T0  # the two rows left are due as before
        assert await statuses_of(engine, device) == ["failed", "queued", "queued"]


# --- transport sessions ----------------------------------------------------------------------------------------


async def test_session_store_upserts(engine: AsyncEngine) -> None:
    store = SqlSessionStore(engine)
    jid = "60123000501:1@s.whatsapp.net"
    assert await store.get(jid) is None
    await store.put(jid, "sim", "secret-1")
    assert await store.get(jid) == "secret-1"
    await store.put(jid, "sim", "secret-2")  # the same jid again replaces, never duplicates
    assert await store.get(jid) == "secret-2"
    await store.put("60123000502:1@s.whatsapp.net", "sim", "other")
    await store.delete(jid)
    assert await store.get(jid) is None
    await store.delete(jid)  # deleting what is gone is fine
    assert await store.get("60123000502:1@s.whatsapp.net") == "other"


async def test_device_status_values_survive_storage(engine: AsyncEngine) -> None:
    devices = SqlDeviceRepository(engine)
    device = await devices.add("States", None, None)
    assert device.status is DeviceStatus.UNPAIRED
    for status in DeviceStatus:
        stored = await devices.set_fields(device.id, status=status, status_reason=f"now {status}")
        assert stored is not None and (stored.status, stored.status_reason) == (status, f"now {status}")
    with pytest.raises(ValueError, match="unknown device fields"):
        await devices.set_fields(device.id, password="x")


async def test_the_send_path_reads_a_device_as_the_repository_does(fresh_pg_url: str) -> None:
    # Locked batches and unscoped `SqlDeviceRepository.get`s read the device with plain SQL (`DEVICE_BY_ID_PG`):
    # the same `Device`, times in UTC, as a read through SQLAlchemy gives (`list_page`, and `get` on SQLite).
    engine = create_engine(fresh_pg_url)
    try:
        await migrate.upgrade(engine)
        devices = SqlDeviceRepository(engine)
        device = await devices.add("Plain", None, None)
        now = datetime.now(UTC)
        await devices.set_fields(
            device.id,
            status=DeviceStatus.ONLINE,
            phone="60123000777",
            linked_at=now - timedelta(days=3),
            queue_paused_at=now,
            queue_paused_reason="paused by a user",
            quiet_start="22:00",
            quiet_end="08:00",
            min_delay_s=0.0,
            typing=False,
        )
        [expected] = [d for d in await devices.list_page(DeviceScope.everything(), 10, None) if d.id == device.id]
        assert await devices.get(device.id, DeviceScope.everything()) == expected
        assert await devices.get(uuid.uuid4(), DeviceScope.everything()) is None
        async with driver_connection(engine) as pg:
            await pg.execute("SET TIME ZONE 'Asia/Kuala_Lumpur'")  # times come back in the session's zone
            row = await (await pg.execute(DEVICE_BY_ID_PG, {"device": device.id})).fetchone()
            await pg.execute("RESET TIME ZONE")
        assert row is not None
        read = device_from_tuple(row)
        assert read == expected
        assert read.linked_at is not None and read.linked_at.utcoffset() == timedelta(0)
    finally:
        await engine.dispose()


def test_rows_of_the_send_path_come_in_the_order_outbox_items_take() -> None:
    # `item_from_tuple` unpacks claimed and locked rows by position, in the order of `OutboxItem`'s fields.
    fields = tuple(f.name for f in dataclasses.fields(OutboxItem))
    assert fields == CLAIM_COLUMNS
    locked = LOCK_DUE_PG.split("FROM outbox_due", 1)[0].removeprefix("\nSELECT").split(",")
    assert tuple(c.strip().removeprefix("o.").replace("attempts + 1", "attempts") for c in locked) == fields
