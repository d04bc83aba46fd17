"""The adapter's own machinery, in-process: store DSNs, our SQL on the store, the executor, the Go-map gate,
and the event path from neonize's callback entry point (`Event.execute`, called from a foreign thread as Go
does) to the sink. Nothing here makes a Go call that could abort the process."""

from __future__ import annotations

import asyncio
import ctypes
import io
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from neonize.aioze.client import NewAClient
from neonize.events import EVENT_TO_INT
from neonize.proto import Neonize_pb2 as nz
from PIL import Image

from tests.neonize import events as ev
from tests.neonize.child import Recorder
from wamd_server.config import load_config
from wamd_server.domain.errors import TransportError
from wamd_server.domain.events import (
    Connected,
    Disconnected,
    HistoryChunk,
    KeepAliveTimeout,
    LoggedOut,
    LogoutReason,
    MessageReceived,
    Paired,
    QrCode,
    Receipt,
)
from wamd_server.infra.whatsapp import neonize as adapter
from wamd_server.infra.whatsapp.neonize import NeonizeTransport, whatsmeow_dsn

ME = "60111111111:7@s.whatsapp.net"
ALICE = "60123456789@s.whatsapp.net"


# --- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "dsn"),
    [
        ("postgres://u:p@db:5432/app", "postgres://u:p@db:5432/app?sslmode=prefer"),
        ("postgresql://u@db/app?connect_timeout=5", "postgres://u@db/app?connect_timeout=5&sslmode=prefer"),
        ("postgresql+psycopg://u@db/app", "postgres://u@db/app?sslmode=prefer"),
        ("postgres://u@db/app?sslmode=require", "postgres://u@db/app?sslmode=require"),
        ("postgres://u@db/app?sslmode=disable", "postgres://u@db/app?sslmode=disable"),
        ("data/whatsmeow.db", "data/whatsmeow.db?_journal_mode=WAL&_busy_timeout=5000&_foreign_keys=on&_x="),
        ("data/wm.db?_busy_timeout=9000", "data/wm.db?_busy_timeout=9000"),
    ],
)
def test_whatsmeow_dsn(store: str, dsn: str) -> None:
    assert whatsmeow_dsn(store) == dsn


@pytest.mark.parametrize(("configured", "expected"), [("DEBUG", "WARNING"), ("INFO", "WARNING"), ("ERROR", "ERROR")])
async def test_from_config_never_forwards_debug_logs(tmp_path: Path, configured: str, expected: str) -> None:
    config = load_config({"WAMD_DATA_DIR": str(tmp_path), "WAMD_LOG_LEVEL": configured})
    transport = NeonizeTransport.from_config(config)
    await transport.start(Recorder())
    try:
        level = logging.getLogger("neonize.utils.log").level
        assert logging.getLevelName(level) == expected
        # the default store is a SQLite file in the data dir, with WAL and a busy timeout
        assert transport._dsn.startswith(str(tmp_path / "whatsmeow.db") + "?_journal_mode=WAL")
    finally:
        await transport.close()


def test_from_config_uses_the_postgres_of_the_database(tmp_path: Path) -> None:
    config = load_config({"WAMD_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgres://u:pw@db.internal:5432/app"})
    assert NeonizeTransport.from_config(config)._dsn == "postgres://u:pw@db.internal:5432/app?sslmode=prefer"


# --- our SQL on the store -------------------------------------------------------------------------------


async def test_no_session_in_a_store_without_tables(pg_store: str, sqlite_store: str) -> None:
    for store in (pg_store, sqlite_store):
        transport = NeonizeTransport(store)
        await transport.start(Recorder())
        try:
            assert await transport.has_session(ME) is False
            await transport.forget(ME)  # nothing to delete, no error
        finally:
            await transport.close()
    assert not Path(sqlite_store).exists()  # asking must not create the file


async def test_commands_before_start_are_refused(sqlite_store: str) -> None:
    transport = NeonizeTransport(sqlite_store)
    with pytest.raises(TransportError):
        await transport.connect(uuid4(), ME)
    with pytest.raises(TransportError):
        await transport.pair_qr(uuid4())


# --- threads and the gate -------------------------------------------------------------------------------


def test_executor_grows_to_its_capacity_with_daemon_threads() -> None:
    executor = adapter._ElasticExecutor(2, shutdown_wait_s=0.2)
    release = threading.Event()
    started = threading.Semaphore(0)

    def block() -> str:
        started.release()
        release.wait(10)
        return threading.current_thread().name

    try:
        first = [executor.submit(block) for _ in range(2)]
        for _ in range(2):
            assert started.acquire(timeout=5)
        queued = executor.submit(block)  # at capacity: waits for a free thread
        assert executor.threads == 2 and not queued.running()
        executor.ensure_capacity(3)
        extra = executor.submit(block)
        assert started.acquire(timeout=5)  # a third thread took `queued` or `extra`
        assert executor.threads == 3
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("neonize-"))
        release.set()
        assert {f.result(5) for f in [*first, queued, extra]} <= {f"neonize-{i}" for i in range(1, 4)}
    finally:
        release.set()
        executor.shutdown(wait=True)


def test_executor_shutdown_does_not_wait_forever_for_a_blocked_call() -> None:
    executor = adapter._ElasticExecutor(1, shutdown_wait_s=0.1)
    release = threading.Event()
    future = executor.submit(release.wait, 30)
    try:
        executor.shutdown(wait=True)  # returns after shutdown_wait_s although the call is still blocked
        assert not future.done()
        with pytest.raises(RuntimeError):
            executor.submit(print)
    finally:
        release.set()
    assert future.result(5) is True


async def test_gate_serialises_writers_and_holds_back_readers() -> None:
    gate = adapter._GoGate()
    order: list[str] = []
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def writer(name: str) -> None:
        async with gate.writing():
            order.append(f"{name}-in")
            inside.set()
            await leave.wait()
            order.append(f"{name}-out")

    async def reader() -> None:
        await gate.quiet()
        order.append("read")

    first = asyncio.create_task(writer("w1"))
    await inside.wait()
    second = asyncio.create_task(writer("w2"))
    read = asyncio.create_task(reader())
    await asyncio.sleep(0)
    assert order == ["w1-in"]  # the reader and the second writer wait
    leave.set()
    await asyncio.gather(first, second, read)
    assert order[:2] == ["w1-in", "w1-out"]
    assert order.index("read") == 2  # the waiting reader goes before the next writer
    assert order[3:] == ["w2-in", "w2-out"]


# --- neonize callbacks to the sink ----------------------------------------------------------------------


class Harness:
    """A started transport with one restored-looking session whose callbacks are fed like Go feeds them.

    Its attempts are never registered in Go, so stopping them makes no Go call.
    """

    def __init__(self, transport: NeonizeTransport, events: Recorder) -> None:
        self.transport = transport
        self.events = events
        self.device_id = uuid4()
        self.session = transport._session(self.device_id)
        self.session.mode = "restore"
        self.session.jid = ME
        self.session.wanted = True
        self.loop = asyncio.get_running_loop()

    def client(self, mode: adapter.Mode = "restore") -> Any:
        """A new current attempt (the previous one becomes stale); returns its client."""
        client = adapter._new_client(NewAClient(self.transport._dsn, uuid=f"test-{uuid4()}", new_device=True))
        attempt = adapter._Attempt(client, mode, ME if mode == "restore" else None)
        self.transport._register_handlers(self.session, attempt)
        self.session.attempt = attempt
        self.session.mode = mode
        return client

    async def feed(self, client: Any, *events: Any) -> None:
        """Call neonize's `Event.execute` with each event's wire bytes, from another thread."""

        def run() -> None:
            for event in events:
                data = event.SerializeToString()
                buffer = ctypes.create_string_buffer(data, len(data))
                client.event.execute(client.uuid, ctypes.addressof(buffer), len(data), EVENT_TO_INT[type(event)])

        thread = threading.Thread(target=run, name="fake-go")
        thread.start()
        await asyncio.to_thread(thread.join)

    async def qr(self, client: Any, code: bytes) -> None:
        """Deliver a QR code as neonize's Go-side QR callback does (`run_coroutine_threadsafe`)."""

        def run() -> None:
            asyncio.run_coroutine_threadsafe(client.event._qr(client, code), self.loop).result(10)

        await asyncio.to_thread(run)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    events = Recorder()
    transport = NeonizeTransport(str(tmp_path / "whatsmeow.db"))
    await transport.start(events)
    yield Harness(transport, events)
    await transport.close()


async def test_events_from_a_go_thread_reach_the_sink_in_order(harness: Harness) -> None:
    client = harness.client()
    source = ev.source(ALICE, ALICE)
    await harness.feed(
        client,
        ev.connected(),
        ev.message_event(ev.text("one"), source, message_id="M1"),
        ev.message_event(ev.image("two"), source, message_id="M2"),
        ev.receipt(nz.Receipt.READ, ["S1"], source),
        ev.disconnected(),
        ev.connected(),
        ev.keepalive_timeout(2),
        ev.history_sync({ALICE: [ev.web_message(ALICE, "H1", ev.text("old"))]}),
        ev.logged_out(nz.LOGGED_OUT, on_connect=False),
    )
    await harness.events.wait_count(LoggedOut, 1)
    kinds = [type(e) for e in harness.events.items]
    assert kinds == [
        Connected,
        MessageReceived,
        MessageReceived,
        Receipt,
        Disconnected,
        Connected,
        KeepAliveTimeout,
        HistoryChunk,
        LoggedOut,
    ]
    messages = harness.events.of(MessageReceived)
    assert [m.message.wa_id for m in messages] == ["M1", "M2"]
    assert harness.events.of(Disconnected)[0].will_retry is True  # whatsmeow reconnects after a drop
    assert harness.events.of(LoggedOut)[0].reason is LogoutReason.LOGGED_OUT
    assert not harness.session.wanted and not harness.session.live


async def test_callbacks_of_an_older_attempt_are_ignored(harness: Harness) -> None:
    old = harness.client()
    new = harness.client()
    await harness.feed(old, ev.connected())
    await harness.feed(new, ev.keepalive_timeout(1))
    await harness.events.wait_count(KeepAliveTimeout, 1)
    assert harness.events.of(Connected) == []


async def test_pairing_qr_codes_then_paired(harness: Harness) -> None:
    harness.session.jid = None
    client = harness.client("qr")
    await harness.qr(client, b"2@first,code")
    await harness.qr(client, b"2@second,code")
    await harness.feed(client, ev.pair_status(ME), ev.connected())
    await harness.events.wait_count(Connected, 1)
    qr_codes = harness.events.of(QrCode)
    assert [q.code for q in qr_codes] == ["2@first,code", "2@second,code"]
    first_ttl = (qr_codes[0].expires_at - qr_codes[1].expires_at).total_seconds()
    assert first_ttl > 30  # the first code lives ~60 s, the next ones ~20 s
    assert harness.events.of(Paired) == [Paired(harness.device_id, jid=ME, phone="60111111111")]
    assert (harness.session.mode, harness.session.jid, harness.session.live) == ("paired", ME, True)


async def test_handler_and_sink_exceptions_are_logged_not_lost(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = harness.client()
    real = harness.transport._on_event
    calls = iter([True])

    def flaky(session: Any, attempt: Any, event: Any) -> None:
        if next(calls, False):
            raise RuntimeError("boom in a handler")
        real(session, attempt, event)

    monkeypatch.setattr(harness.transport, "_on_event", flaky)
    sink_calls = 0

    async def failing_sink(event: object) -> None:
        nonlocal sink_calls
        sink_calls += 1
        if sink_calls == 1:
            raise RuntimeError("boom in the sink")
        await harness.events(event)

    harness.transport._sink = failing_sink
    with caplog.at_level(logging.ERROR, logger="wamd_server.infra.whatsapp.neonize"):
        await harness.feed(client, ev.connected(), ev.keepalive_timeout(1), ev.keepalive_timeout(2))
        await harness.events.wait_count(KeepAliveTimeout, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("handling Connected failed" in m for m in messages)
    assert any("event sink failed on KeepAliveTimeout" in m for m in messages)
    assert harness.events.of(KeepAliveTimeout)[0].error_count == 2


# --- small pieces ---------------------------------------------------------------------------------------


@pytest.fixture
def png() -> Iterator[bytes]:
    out = io.BytesIO()
    Image.new("RGBA", (800, 400), (200, 30, 30, 255)).save(out, format="PNG")
    yield out.getvalue()


def test_thumbnail_of_an_image(png: bytes) -> None:
    thumbnail, width, height, mime = adapter._thumbnail(png)
    assert (width, height, mime) == (800, 400, "image/png")
    with Image.open(io.BytesIO(thumbnail)) as image:
        assert image.format == "JPEG" and max(image.size) == 200


def test_recipient_check_answers() -> None:
    def answer(is_in: bool, jid: str) -> Any:
        return nz.IsOnWhatsAppResponse(Query="+5511987654321", JID=ev.jid(jid), IsIn=is_in)

    # WhatsApp answers the canonical JID (Brazil: without the ninth digit)
    assert adapter._resolve_recipient([answer(True, "551187654321@s.whatsapp.net")]) == "551187654321@s.whatsapp.net"
    assert adapter._resolve_recipient([answer(False, "")]) is None
    with pytest.raises(TransportError):
        adapter._resolve_recipient([])
