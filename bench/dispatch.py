"""Dispatch benchmark: outbox rows to the simulated network, end to end, against two baselines (a minimal raw-SQL
claim-and-mark loop and pgqueuer). Not part of the test suite.

    .venv/bin/python bench/dispatch.py [--devices 3000] [--messages 200000] [--mode inprocess|remote] ...

Needs Postgres (an admin URL, default postgresql://postgres@127.0.0.1:5432/postgres or WAMD_BENCH_PG); the remote
mode needs Redis too (default redis://127.0.0.1:6379/0 or WAMD_BENCH_REDIS). Prints one JSON object per figure on
stdout, progress on stderr. Every phase uses its own throw-away database `wamd_bench_<hex>_<phase>` (dropped at
the end), so no phase runs on the dead rows of another; it stops every process it started, also after a failure or
Ctrl+C. See docs/performance.md, "Dispatch (bench/dispatch.py)".

Phases (each on a fresh database holding the same rows, `VACUUM ANALYZE`d before the clock starts):
1. raw: the rows processed by a minimal loop of plain SQL over psycopg: per device, `UPDATE … WHERE id IN (SELECT …
   FOR UPDATE SKIP LOCKED LIMIT n) RETURNING …`, a no-op "send", then one `UPDATE … FROM unnest(…)` marking them
   sent; as many connections as wamd may open and wamd's batch size. The ceiling of the database work.
2. pgqueuer: the same number of no-op jobs through pgqueuer's `QueueManager` (drain mode), as many processes as
   wamd runs and as many connections in all as wamd may open, with wamd's batch size.
3. wamd: the devices are created and paired through the device pool (pacing off: no delays, no typing, large
   caps), their queues paused, the rows enqueued through `SqlOutboxRepository.enqueue` for a running broadcast
   campaign (due at once), then every queue is resumed and the lanes woken (`outbox.queued`): the clock runs from
   that release until no row of the campaign is queued or sending. Afterwards: every row `sent`, and the
   simulator received exactly one message per lead (`inbox_counts`).
   - `--mode inprocess`: one `wamd-server`-like runtime (API, planner, worker) with the simulated network in the
     same process, which is this benchmark's process (it only polls the database meanwhile).
   - `--mode remote`: a standalone `wamd-sim` and K `wamd-server worker` processes; the devices are paired by a
     runtime in this process, which then stops and hands them to the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from _common import (
    BIN,
    DEFAULT_PG,
    DEFAULT_REDIS,
    Cleanup,
    Proc,
    clean_env,
    cpu_seconds,
    create_database,
    delete_redis_prefix,
    drop_database,
    emit,
    free_port,
    load_average,
    log,
    machine_cpu,
    pg_connection_budget,
    pg_database_name,
    pg_database_url,
    remove_tree,
    run_with_cleanup,
    source_revision,
    stop_all,
)

HERE = Path(__file__).resolve().parent

TARGET_MSGS_PER_S = 10_000.0
TARGET_VS_PGQUEUER = 1.0
POLL_S = 0.2
ENQUEUE_CHUNK = 20_000
FAST = {"min_delay_s": 0.0, "max_delay_s": 0.0, "hourly_cap": 1_000_000, "daily_cap": 10_000_000, "typing": False}
PAUSED = "bench: waiting for the release"
ADMIN_EMAIL = "bench@example.com"


def device_phone(n: int) -> str:
    return f"6011{n:07d}"


def lead_phone(n: int) -> str:
    return f"6019{n:07d}"


def message_text(n: int) -> str:
    return f"Hi Lead {n}, the new listing is out: https://x.example/p/{n} - reply STOP to opt out"


# --- databases --------------------------------------------------------------------------------------------


@dataclass
class Databases:
    """Throw-away databases, one per phase, dropped by the cleanup."""

    admin_url: str
    cleanup: Cleanup
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def create(self, phase: str) -> str:
        name = f"wamd_bench_{self.tag}_{phase}"
        create_database(self.admin_url, name)
        self.cleanup.add(f"drop database {name}", lambda: drop_database(self.admin_url, name))
        log(f"created database {name}")
        return pg_database_url(self.admin_url, name)


def db_name(url: str) -> str:
    return pg_database_name(url)


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


async def vacuum(url: str, *tables: str) -> None:
    """`VACUUM ANALYZE` the phase's tables, then a `CHECKPOINT`: every phase starts with no other phase's writes
    waiting to be flushed, and with its first change to each page logged in full (as a phase that happened to meet
    a checkpoint would), so the phases of a run pay the same for the WAL."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for table in tables:
            await conn.execute(f"VACUUM ANALYZE {table}")
        try:
            await conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            log("  (no CHECKPOINT before the phase: the role may not; phases may pay unevenly for the WAL)")


async def migrated_engine(url: str, pool_size: int = 5) -> Any:
    from wamd_server.infra.db import migrate
    from wamd_server.infra.db.engine import create_engine

    engine = create_engine(sqlalchemy_url(url), pool_size=pool_size)
    await migrate.upgrade(engine)
    return engine


async def insert_plain_devices(url: str, count: int) -> list[uuid.UUID]:
    """Device rows for the baselines (no session, nothing connects): online, pacing off."""
    ids = [uuid.uuid4() for _ in range(count)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        now = dt.datetime.now(dt.UTC)
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO devices (id, name, phone, status, min_delay_s, max_delay_s, hourly_cap, daily_cap, "
                "typing, created_at, updated_at) VALUES (%s, %s, %s, 'online', 0, 0, %s, %s, false, %s, %s)",
                [
                    (d, f"Bench {n}", device_phone(n), FAST["hourly_cap"], FAST["daily_cap"], now, now)
                    for n, d in enumerate(ids)
                ],
            )
    return ids


async def insert_campaign(url: str, user_id: uuid.UUID | None) -> tuple[uuid.UUID, uuid.UUID]:
    """A running broadcast campaign (rows are enqueued for it directly); creates its owner when none is given."""
    campaign_id = uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if user_id is None:
            user_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO users (id, email, password_hash, role, created_at, updated_at) "
                "VALUES (%s, %s, 'x', 'admin', %s, %s)",
                (user_id, ADMIN_EMAIL, now, now),
            )
        await conn.execute(
            "INSERT INTO campaigns (id, user_id, type, title, message, target_status, device_ids, scheduled_at, "
            "status, options, created_at, updated_at, started_at) VALUES (%s, %s, 'broadcast', 'Bench', 'Hi {name}', "
            "'all', '[]', %s, 'running', '{}', %s, %s, %s)",
            (campaign_id, user_id, now, now, now, now),
        )
    return campaign_id, user_id


async def enqueue_rows(
    url: str, device_ids: list[uuid.UUID], count: int, campaign_id: uuid.UUID, user_id: uuid.UUID
) -> float:
    """`count` messages, lead n to device n mod D, through `SqlOutboxRepository.enqueue` (as a producer does);
    due at once. Returns the seconds it took."""
    from wamd_server.domain.models import SourceKind
    from wamd_server.infra.db.outbox import NewMessage, SqlOutboxRepository

    engine = await migrated_engine(url)
    try:
        outbox = SqlOutboxRepository(engine)
        started = time.monotonic()
        now = dt.datetime.now(dt.UTC)
        created = 0
        for start in range(0, count, ENQUEUE_CHUNK):
            messages = [
                NewMessage(
                    device_id=device_ids[n % len(device_ids)],
                    recipient=lead_phone(n),
                    text=message_text(n),
                    source_kind=SourceKind.CAMPAIGN,
                    source_key=f"campaign:{campaign_id}:{n}",
                    scheduled_at=now,
                    user_id=user_id,
                    source_id=campaign_id,
                )
                for n in range(start, min(start + ENQUEUE_CHUNK, count))
            ]
            created += await outbox.enqueue(messages, now)
        if created != count:
            raise RuntimeError(f"enqueued {created} of {count} rows")
        return time.monotonic() - started
    finally:
        await engine.dispose()


class Load:
    """CPU used during a measurement: this process (and its garbage collections), given child processes, the
    Postgres backends of the measured database (sampled every `sample_s`, so one that ends keeps what it used
    until then; other databases on the server are not counted) and the whole machine."""

    def __init__(self, admin_url: str, database: str, pids: list[int] | None = None, sample_s: float = 0.25) -> None:
        self.admin_url, self.database = admin_url, database
        self.pids = pids or []
        self.sample_s = sample_s
        # Active statements seen per sample (their first 70 characters): where the backends spend their time.
        self.active: dict[str, int] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample_backends(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while True:
                rows = conn.execute(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchall()
                for pid, state, query in rows:
                    used = cpu_seconds(int(pid))
                    if used >= 0:
                        self._first.setdefault(int(pid), 0.0 if self._started_sampling else used)
                        self._last[int(pid)] = used
                    if state == "active" and self._started_sampling:
                        key = " ".join(str(query).split())[:70]
                        self.active[key] = self.active.get(key, 0) + 1
                self._started_sampling = True
                if self._stop.wait(self.sample_s):
                    return

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            took = time.perf_counter() - self._gc_started
            self.gc_s += took
            self.gc_runs[info["generation"]] += 1
            self.gc_s_by_generation[info["generation"]] += took

    def __enter__(self) -> Load:
        # Garbage collection in this process (the in-process runtime's): full collections traverse every object.
        self.gc_s, self.gc_runs, self._gc_started = 0.0, [0, 0, 0], 0.0
        self.gc_s_by_generation = [0.0, 0.0, 0.0]
        gc.callbacks.append(self._gc_callback)
        self._started_sampling = False
        self._sampler = threading.Thread(target=self._sample_backends, daemon=True)
        self._sampler.start()
        while not self._started_sampling and self._sampler.is_alive():
            time.sleep(0.01)
        self._self = cpu_seconds()
        self._pids = [cpu_seconds(p) for p in self.pids]
        self._machine = machine_cpu()
        self._load = load_average()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._gc_callback)
        self.seconds = time.monotonic() - self._started
        self.self_cpu = cpu_seconds() - self._self
        self.pid_cpu = [round(cpu_seconds(p) - before, 1) for p, before in zip(self.pids, self._pids, strict=True)]
        busy, total = machine_cpu()
        self.machine_busy_pct = 100.0 * (busy - self._machine[0]) / max(total - self._machine[1], 1.0)
        self.loadavg = (self._load, load_average())
        self._stop.set()
        self._sampler.join()
        self.db_cpu = sum(self._last[p] - self._first[p] for p in self._last)

    def figures(self, messages: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bench_process_cpu_s": round(self.self_cpu, 1),
            "bench_process_gc_s": round(self.gc_s, 1),
            "bench_process_gc_runs": self.gc_runs,
            "bench_process_gc_s_by_generation": [round(s, 2) for s in self.gc_s_by_generation],
            "database_backends_cpu_s": round(self.db_cpu, 1),
            "machine_busy_pct": round(self.machine_busy_pct, 1),
            "loadavg_1m": list(self.loadavg),
        }
        if messages:
            out["database_cpu_us_per_msg"] = round(1e6 * self.db_cpu / messages)
        return out


# --- phase 1: raw SQL -------------------------------------------------------------------------------------

RAW_CLAIM = """
UPDATE outbox SET status = 'sending', attempts = attempts + 1, claimed_at = now(), updated_at = now()
WHERE id IN (
    SELECT o.id FROM outbox_due d JOIN outbox o ON o.id = d.id
    WHERE d.device_id = %(device)s AND o.device_id = %(device)s AND o.status = 'queued' AND d.scheduled_at <= now()
    ORDER BY d.scheduled_at, d.seq LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED
)
RETURNING id, device_id, recipient, text, wa_message_id, attempts, scheduled_at, seq
"""
# As wamd's schema asks: a row marked sent leaves `outbox_due` and its send is logged in `outbox_sent`.
RAW_MARK = """
WITH marked AS (
    UPDATE outbox SET status = 'sent', sent_at = v.sent_at, server_ts = v.server_ts, updated_at = v.sent_at,
        last_error = NULL
    FROM unnest(%s::uuid[], %s::timestamptz[], %s::timestamptz[]) AS v(id, sent_at, server_ts)
    WHERE outbox.id = v.id AND outbox.status = 'sending'
    RETURNING outbox.id, outbox.device_id, outbox.sent_at
),
undue AS (DELETE FROM outbox_due USING marked WHERE outbox_due.id = marked.id)
INSERT INTO outbox_sent (device_id, sent_at, outbox_id) SELECT device_id, sent_at, id FROM marked
"""


async def raw_phase(dbs: Databases, args: argparse.Namespace) -> dict[str, Any]:
    url = dbs.create("raw")
    engine = await migrated_engine(url)
    await engine.dispose()
    device_ids = await insert_plain_devices(url, args.devices)
    campaign_id, user_id = await insert_campaign(url, None)
    seed_s = await enqueue_rows(url, device_ids, args.messages, campaign_id, user_id)
    await vacuum(url, "outbox", "outbox_due", "outbox_sent")
    emit("raw_seed_rows_s", round(seed_s, 1), "s", rows=args.messages, via="SqlOutboxRepository.enqueue")

    connections = wamd_connections(args)
    todo: deque[uuid.UUID] = deque(device_ids)
    done = 0

    async def worker() -> None:
        nonlocal done
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while todo:
                device_id = todo.popleft()
                cursor = await conn.execute(RAW_CLAIM, {"device": device_id, "limit": args.batch}, prepare=True)
                rows = await cursor.fetchall()
                if not rows:
                    continue  # this device is done
                now = dt.datetime.now(dt.UTC)  # the no-op "send"
                ids = [r[0] for r in rows]
                await conn.execute(RAW_MARK, (ids, [now] * len(ids), [now] * len(ids)), prepare=True)
                done += len(rows)
                todo.append(device_id)

    log(f"raw: {args.messages} rows, {connections} connections, batch {args.batch}")
    with Load(args.pg, db_name(url)) as load:
        await asyncio.gather(*(worker() for _ in range(connections)))
    sent = await count_status(url, "sent")
    if done != args.messages or sent != args.messages:
        raise RuntimeError(f"raw: processed {done}, {sent} sent, of {args.messages}")
    rate = args.messages / load.seconds
    return emit(
        "raw_sql_msgs_per_s",
        round(rate),
        "msg/s",
        elapsed_s=round(load.seconds, 2),
        rows=args.messages,
        connections=connections,
        batch=args.batch,
        **load.figures(args.messages),
    )


async def count_status(url: str, status: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT count(*) FROM outbox WHERE status = %s", (status,))).fetchone()
        assert row is not None
        return int(row[0])


# --- phase 2: pgqueuer ------------------------------------------------------------------------------------


def start_pgqueuer_children(
    url: str, driver: str, per_process: list[int], batch: int, work: Path
) -> list[subprocess.Popen[str]]:
    """One child per process, each with its share of the connections; each says "ready", then waits for "go"."""
    children = []
    for i, conns in enumerate(per_process):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--pgqueuer-child",
            url,
            "--pgqueuer-connections",
            str(conns),
            "--batch",
            str(batch),
            "--pgqueuer-driver",
            driver,
        ]
        with (work / f"pgq-{driver}-{i}.log").open("ab") as errors:
            children.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            )
    return children


async def pgqueuer_phase(
    dbs: Databases, args: argparse.Namespace, cleanup: Cleanup, work: Path, driver: str
) -> dict[str, Any]:
    url = dbs.create(f"pgq_{driver}")
    started = time.monotonic()
    await pgqueuer_child_install(url, args.messages)
    seed_s = time.monotonic() - started
    await vacuum(url, "pgqueuer")
    emit("pgqueuer_seed_jobs_s", round(seed_s, 1), "s", jobs=args.messages, driver=driver)

    processes = wamd_processes(args)
    connections = wamd_connections(args)
    per_process = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    children = start_pgqueuer_children(url, driver, per_process, args.batch, work)
    for i, child in enumerate(children):
        cleanup.add(f"stop pgqueuer child {i}", lambda p=child: p.kill() if p.poll() is None else None)
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a pgqueuer child did not start; see {work}")
    log(
        f"pgqueuer ({driver}): {args.messages} jobs, {processes} process(es), {connections} connections, "
        f"batch {args.batch}"
    )
    with Load(args.pg, db_name(url), [c.pid for c in children]) as load:
        go = time.monotonic()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = await asyncio.to_thread(child.communicate, None, 3600)
            results.append(json.loads(out.strip().splitlines()[-1]))
    done = sum(r["done"] for r in results)
    if done != args.messages:
        raise RuntimeError(f"pgqueuer ran {done} of {args.messages} jobs")
    # Until every child's queue managers drained the queue and stored the jobs' completion (as wamd's clock runs
    # until every row is marked sent).
    seconds = max(r["finished"] for r in results) - go
    return emit(
        "pgqueuer_msgs_per_s",
        round(args.messages / seconds),
        "jobs/s",
        elapsed_s=round(seconds, 2),
        jobs=args.messages,
        driver=driver,
        processes=processes,
        connections=connections,
        batch=args.batch,
        pgqueuer_version=pgqueuer_version(),
        child_cpu_s=[r["cpu_s"] for r in results],
        **load.figures(args.messages),
    )


def pgqueuer_version() -> str:
    import pgqueuer

    return str(pgqueuer.__version__)


async def pgqueuer_driver(url: str, driver: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """A pgqueuer `Driver` on a new connection, and how to close it."""
    if driver == "asyncpg":
        import asyncpg
        from pgqueuer import AsyncpgDriver

        conn = await asyncpg.connect(url)
        return AsyncpgDriver(conn), conn.close
    from pgqueuer import PsycopgDriver

    pconn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    return PsycopgDriver(pconn), pconn.close


async def pgqueuer_child_install(url: str, jobs: int) -> None:
    from pgqueuer import Queries

    driver, close = await pgqueuer_driver(url, "psycopg")
    try:
        queries = Queries(driver)
        await queries.install()
        for start in range(0, jobs, 5000):
            n = min(5000, jobs - start)
            payloads: list[bytes | None] = [message_text(start + i).encode() for i in range(n)]
            await queries.enqueue(["noop"] * n, payloads, [0] * n)
    finally:
        await close()


async def pgqueuer_child(url: str, connections: int, batch: int, driver_name: str) -> None:
    """One pgqueuer process: `connections` queue managers (one connection each) drain the queue after "go"."""
    from pgqueuer import Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    done = 0
    last_job: float | None = None
    managers = []
    closers = []
    for _ in range(connections):
        driver, close = await pgqueuer_driver(url, driver_name)
        closers.append(close)
        manager = QueueManager(Queries(driver))

        @manager.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal done, last_job
            done += 1
            last_job = time.monotonic()

        managers.append(manager)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    cpu = cpu_seconds()
    await asyncio.gather(
        *(
            m.run(batch_size=batch, mode=QueueExecutionMode.drain, dequeue_timeout=dt.timedelta(seconds=0.5))
            for m in managers
        )
    )
    finished = time.monotonic()
    cpu = cpu_seconds() - cpu
    for close in closers:
        await close()
    print(json.dumps({"done": done, "last_job": last_job, "finished": finished, "cpu_s": round(cpu, 1)}), flush=True)


# --- phase 3: wamd ----------------------------------------------------------------------------------------


def wamd_processes(args: argparse.Namespace) -> int:
    return 1 if args.mode == "inprocess" else args.workers


def wamd_connections(args: argparse.Namespace) -> int:
    """The most Postgres connections wamd's sending processes may open: pool + overflow, per process."""
    return 2 * args.db_pool_size * wamd_processes(args)


def server_env(args: argparse.Namespace, url: str, work: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        {
            "DATABASE_URL": url,
            "WAMD_TRANSPORT": "sim",
            "WAMD_DATA_DIR": str(work / "data"),
            "WAMD_DB_POOL_SIZE": str(args.db_pool_size),
            "WAMD_CONNECTS_PER_SECOND": "500",
            "WAMD_LOG_LEVEL": "WARNING",
            "HOST": "127.0.0.1",
            "PORT": "0",
            **extra,
        }
    )


class DeviceEvents:
    """QR codes from the runtime's bus, for whoever waits for a device's code."""

    def __init__(self) -> None:
        self.qr: dict[str, asyncio.Future[str]] = {}

    def expect(self, device_id: str) -> asyncio.Future[str]:
        future = self.qr[device_id] = asyncio.get_running_loop().create_future()
        return future

    async def handle(self, event: Any) -> None:
        if event.type == "device.qr":
            future = self.qr.get(str(event.data.get("device_id")))
            if future is not None and not future.done():
                future.set_result(str(event.data["code"]))


async def pair_devices(
    runtime: Any, url: str, count: int, concurrency: int, scan: Callable[[str, str], Awaitable[Any]]
) -> list[uuid.UUID]:
    """Create and pair `count` devices through the runtime's device pool (pacing off), `concurrency` at a time,
    then wait until all are online. A pairing that gets no QR code in time is tried again."""
    events = DeviceEvents()
    unsubscribe = runtime.bus.subscribe(events.handle)
    numbers = iter(range(count))
    ids: list[uuid.UUID | None] = [None] * count
    done = 0

    async def pair(n: int) -> None:
        device = await runtime.device_repo.add(f"Bench {n}", None, None)
        await runtime.device_repo.set_fields(device.id, **FAST)
        for attempt in range(1, 4):
            qr = events.expect(str(device.id))
            try:
                await runtime.router.pair_qr(device.id)
                await scan(await asyncio.wait_for(qr, 30), device_phone(n))
                break
            except Exception as exc:
                if attempt == 3:
                    raise
                log(f"  pairing device {n} failed ({type(exc).__name__}: {exc}); trying again")
        ids[n] = device.id

    async def pipeline() -> None:
        nonlocal done
        for n in numbers:
            await pair(n)
            done += 1
            if done % 500 == 0:
                log(f"  {done}/{count} devices paired")

    try:
        await asyncio.gather(*(pipeline() for _ in range(concurrency)))
    finally:
        unsubscribe()
    await wait_online(url, count, lambda: None, 120.0)
    return [d for d in ids if d is not None]


async def set_queues_paused(url: str, paused: bool) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if paused:
            await conn.execute(
                "UPDATE devices SET queue_paused_reason = %s, queue_pause_kind = 'user', queue_paused_at = now()",
                (PAUSED,),
            )
        else:
            await conn.execute(
                "UPDATE devices SET queue_paused_reason = NULL, queue_pause_kind = NULL, queue_paused_at = NULL"
            )


@dataclass
class Progress:
    seconds: float | None
    timeline: list[tuple[float, int]]
    remaining: int
    released_at: dt.datetime
    history_at_done: int | None = None  # sends in the chat history when the outbox was done
    history_done_s: float | None = None  # since the release, until every send was in the chat history


async def wait_history(url: str, progress: Progress, expected: int, started: float, give_up_s: float) -> None:
    """How far the chat history (written a moment after the sends, `services/history.py`) was when the clock
    stopped, and when it had every send (polled every 0.5 s, the runtime still running), into `progress`."""
    query = "SELECT count(*) FROM messages WHERE from_me"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, application_name="wamd-bench") as conn:
        while True:
            row = await (await conn.execute(query)).fetchone()
            assert row is not None
            if progress.history_at_done is None:
                progress.history_at_done = int(row[0])
            if int(row[0]) >= expected:
                progress.history_done_s = round(time.monotonic() - started, 2)
                return
            if time.monotonic() - started > give_up_s:
                return
            await asyncio.sleep(0.5)


async def wait_sent(
    url: str, campaign_id: uuid.UUID, started: float, give_up_s: float, alive: Callable[[], None]
) -> Progress:
    """Poll every 0.1 s until no row of the campaign is queued or sending (an `EXISTS`, which stops at the first
    such row). The timeline is read afterwards, off the rows' own times (`timeline`): counting the rows every few
    seconds during the run cost Postgres a few per cent of the phase's work."""
    # Rows queued or sending are the campaign's rows in `outbox_due`.
    condition = "source_id = %s"
    released_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=time.monotonic() - started)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, application_name="wamd-bench") as conn:
        while True:
            row = await (
                await conn.execute(f"SELECT EXISTS (SELECT 1 FROM outbox_due WHERE {condition})", (campaign_id,))
            ).fetchone()
            now = time.monotonic() - started
            assert row is not None
            if not row[0]:
                return Progress(now, [], 0, released_at)
            if now > give_up_s:
                left = await (
                    await conn.execute(f"SELECT count(*) FROM outbox_due WHERE {condition}", (campaign_id,))
                ).fetchone()
                assert left is not None
                return Progress(None, [], int(left[0]), released_at)
            alive()
            await asyncio.sleep(0.1)


async def read_timeline(url: str, campaign_id: uuid.UUID, progress: Progress, step_s: float = 5.0) -> None:
    """Rows of the campaign sent or settled by the end of each `step_s` after the release, into
    `progress.timeline`: (seconds, rows so far), from each row's `sent_at` (`updated_at` for rows settled
    otherwise). Called once the phase's load figures are taken."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                """SELECT ceil(extract(epoch FROM coalesce(sent_at, updated_at) - %s) / %s) AS step, count(*)
                   FROM outbox
                   WHERE source_kind = 'campaign' AND source_id = %s AND status NOT IN ('queued', 'sending')
                   GROUP BY step ORDER BY step""",
                (progress.released_at, step_s, campaign_id),
            )
        ).fetchall()
    done = 0
    for step, count in rows:
        done += int(count)
        progress.timeline.append((round(max(float(step), 0.0) * step_s, 1), done))
        log(f"  {progress.timeline[-1][0]:5.1f}s: {done} sent or settled")


async def outcome(url: str, campaign_id: uuid.UUID) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT status, count(*), count(DISTINCT wa_message_id), max(attempts) FROM outbox "
                "WHERE source_id = %s GROUP BY status",
                (campaign_id,),
            )
        ).fetchall()
        history = await (
            await conn.execute("SELECT count(*), count(DISTINCT chat_jid) FROM messages WHERE from_me")
        ).fetchone()
        # Updates of outbox rows, and those Postgres wrote without new index entries (HOT): the runtime has stopped,
        # so its connections' counts have reached the statistics.
        updates = await (
            await conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'outbox'")
        ).fetchone()
        sizes = await (
            await conn.execute(
                "SELECT relname, pg_total_relation_size(relid) / 1048576 FROM pg_stat_user_tables "
                "WHERE relname IN ('outbox', 'outbox_due', 'outbox_sent', 'messages', 'chats')"
            )
        ).fetchall()
    assert history is not None and updates is not None
    result = {f"rows_{r[0]}": int(r[1]) for r in rows}
    result["distinct_message_ids_sent"] = sum(int(r[2]) for r in rows if r[0] == "sent")
    result["max_attempts"] = max((int(r[3]) for r in rows), default=0)
    result["history_messages"], result["history_chats"] = int(history[0]), int(history[1])
    result["outbox_updates"], result["outbox_hot_updates"] = int(updates[0]), int(updates[1])
    result.update({f"mb_{name}": int(mb) for name, mb in sizes})  # tables with their indexes
    return result


def inbox_check(counts: dict[str, int], messages: int) -> dict[str, Any]:
    leads = {lead_phone(n) for n in range(messages)}
    received = {phone: n for phone, n in counts.items() if phone in leads}
    return {
        "distinct_messages": sum(received.values()),
        "leads_with_one": sum(1 for n in received.values() if n == 1),
        "leads_with_more": sum(1 for n in received.values() if n > 1),
        "leads_missing": len(leads) - len(received),
        "others": sum(n for phone, n in counts.items() if phone not in leads),
    }


async def wamd_inprocess(dbs: Databases, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from wamd_server.config import load_config
    from wamd_server.domain.ports import BusEvent
    from wamd_server.gc_tuning import freeze_startup_objects, tune_for_server
    from wamd_server.protocol.events import OUTBOX_QUEUED
    from wamd_server.runtime import Role, Runtime

    url = dbs.create("wamd")
    env = server_env(
        args,
        url,
        work,
        WAMD_WORKER_CAPACITY=str(args.devices),
        WAMD_ADMIN_EMAIL=ADMIN_EMAIL,
        WAMD_ADMIN_PASSWORD=secrets.token_urlsafe(16),
    )
    runtime = Runtime(load_config(env), role=Role.SERVE)
    default_gc = gc.get_threshold()
    # As `wamd-server` runs (see wamd_server/gc_tuning.py), unless the run asks for other thresholds.
    tune_for_server()
    if args.gc_threshold:
        gc.set_threshold(*args.gc_threshold)
    used_gc = gc.get_threshold()
    await runtime.start(serve_http=False)
    freeze_startup_objects()
    try:
        network = runtime.sim_network
        assert network is not None and runtime.bus is not None
        started = time.monotonic()
        log(f"wamd (in-process): pairing {args.devices} devices")
        device_ids = await pair_devices(runtime, url, args.devices, args.seed_concurrency, network.scan)
        emit("seed_devices_s", round(time.monotonic() - started, 1), "s", devices=len(device_ids), mode="inprocess")
        await set_queues_paused(url, True)
        campaign_id = await seed_campaign(url, device_ids, args)
        log(f"wamd (in-process): releasing {args.messages} rows to {len(device_ids)} devices")
        with Load(args.pg, db_name(url), sample_s=args.sample_s) as load, send_profile(args.profile):
            released = time.monotonic()
            await set_queues_paused(url, False)
            await runtime.bus.publish(BusEvent(OUTBOX_QUEUED, {}))
            progress = await wait_sent(url, campaign_id, released, args.timeout, lambda: None)
        await wait_history(url, progress, args.messages, released, args.timeout)
        stats = network.stats()
        counts = network.inbox_counts()
    finally:
        await runtime.stop()
        gc.set_threshold(*default_gc)
        gc.unfreeze()
    extra = {"mode": "inprocess", "processes": 1, "gc_threshold": list(used_gc)}
    return await wamd_figures(url, args, campaign_id, progress, load, counts, stats, extra)


@contextlib.contextmanager
def send_profile(path: str | None) -> Any:
    """cProfile over the sending only (`--profile`): call counts and own time per message, which sampling
    profilers blur (they count a thread preempted at a system call as busy there)."""
    if not path:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)
        log(f"profile of the sending written to {path}")


async def seed_campaign(url: str, device_ids: list[uuid.UUID], args: argparse.Namespace) -> uuid.UUID:
    """A running broadcast of the admin's with `args.messages` rows over the devices, the tables vacuumed and the
    settle time waited out: what both wamd modes release."""
    user_id = await admin_id(url)
    campaign_id, _ = await insert_campaign(url, user_id)
    seed_s = await enqueue_rows(url, device_ids, args.messages, campaign_id, user_id)
    emit("seed_rows_s", round(seed_s, 1), "s", rows=args.messages, via="SqlOutboxRepository.enqueue")
    await vacuum(url, "outbox", "outbox_due", "outbox_sent", "messages", "chats", "devices")
    await asyncio.sleep(args.settle)
    return campaign_id


async def admin_id(url: str) -> uuid.UUID:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT id FROM users ORDER BY created_at LIMIT 1")).fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))


async def wamd_remote(dbs: Databases, args: argparse.Namespace, work: Path, cleanup: Cleanup) -> dict[str, Any]:
    from redis.asyncio import Redis

    from wamd_server.config import load_config
    from wamd_server.domain.ports import BusEvent
    from wamd_server.infra.bus.redis import RedisEventBus
    from wamd_server.protocol.events import OUTBOX_QUEUED
    from wamd_server.runtime import Role, Runtime

    url = dbs.create("wamd")
    prefix = f"wamd-bench-{dbs.tag}"
    cleanup.add("delete redis keys", lambda: delete_redis_prefix(args.redis, prefix))
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    sim = Proc(
        "wamd-sim",
        [str(BIN / "wamd-sim"), "--port", str(port), "--log-level", "WARNING"],
        clean_env({}),
        work / "wamd-sim.log",
    ).start()
    cleanup.add("stop wamd-sim", lambda: sim.stop(20.0))
    await wait_http(sim_url + "/api/health", sim)

    env = server_env(
        args,
        url,
        work,
        WAMD_SIM_URL=sim_url,
        REDIS_URL=args.redis,
        WAMD_REDIS_PREFIX=prefix,
        WAMD_WORKER_CAPACITY=str(args.devices),
        WAMD_ADMIN_EMAIL=ADMIN_EMAIL,
        WAMD_ADMIN_PASSWORD=secrets.token_urlsafe(16),
    )
    # Pair every device through a runtime here (it runs the pool and routes the pairings to itself) …
    seeder = Runtime(load_config(env), role=Role.SERVE)
    await seeder.start(serve_http=False)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:

        async def scan(qr: str, phone: str) -> None:
            async with http.post(sim_url + "/api/sim/scan", json={"qr": qr, "phone": phone}) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"scan answered {resp.status}: {await resp.text()}")

        try:
            log(f"wamd (remote): pairing {args.devices} devices")
            device_ids = await pair_devices(seeder, url, args.devices, args.seed_concurrency, scan)
        finally:
            await seeder.stop()  # … which hands them back (offline, leases released)
    emit("seed_devices_s", round(time.monotonic() - started, 1), "s", devices=len(device_ids), mode="remote")
    await set_queues_paused(url, True)

    capacity = math.ceil(args.devices / args.workers)
    workers = []
    for i in range(args.workers):
        wenv = {k: v for k, v in env.items() if not k.startswith("WAMD_ADMIN")}
        proc = Proc(
            f"worker-{i}",
            [str(BIN / "wamd-server"), "worker", "--capacity", str(capacity)],
            wenv,
            work / f"worker-{i}.log",
        ).start()
        cleanup.add(f"stop worker-{i}", lambda p=proc: p.stop(30.0))
        workers.append(proc)
    procs = [sim, *workers]

    def alive() -> None:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.returncode()}:\n{proc.tail()}")

    log(f"wamd (remote): {args.workers} workers connecting {len(device_ids)} devices")
    await wait_online(url, len(device_ids), alive, 300.0)
    campaign_id = await seed_campaign(url, device_ids, args)

    redis = Redis.from_url(args.redis)
    bus = RedisEventBus(redis, channel_prefix=prefix)
    await bus.start()
    try:
        log(f"wamd (remote): releasing {args.messages} rows to {len(device_ids)} devices")
        with Load(args.pg, db_name(url), [p.pid for p in procs]) as load:
            released = time.monotonic()
            await set_queues_paused(url, False)
            await bus.publish(BusEvent(OUTBOX_QUEUED, {}))
            progress = await wait_sent(url, campaign_id, released, args.timeout, alive)
    finally:
        await bus.close()
        await redis.aclose()
    async with aiohttp.ClientSession() as http:
        async with http.get(sim_url + "/api/sim/inbox-counts") as resp:
            counts = (await resp.json())["counts"]
        async with http.get(sim_url + "/api/sim/stats") as resp:
            stats = await resp.json()
    stop_all(workers, 60.0)
    extra = {
        "mode": "remote",
        "processes": args.workers,
        "worker_cpu_s": load.pid_cpu[1:],
        "sim_cpu_s": load.pid_cpu[0],
    }
    return await wamd_figures(url, args, campaign_id, progress, load, counts, stats, extra)


async def wait_http(url: str, proc: Proc, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.returncode()}:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within_s:.0f}s")


async def wait_online(url: str, count: int, alive: Callable[[], None], give_up_s: float) -> None:
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            row = await (await conn.execute("SELECT count(*) FROM devices WHERE status = 'online'")).fetchone()
            assert row is not None
            if int(row[0]) >= count:
                log(f"  all {count} devices online after {time.monotonic() - started:.1f}s")
                return
            if time.monotonic() - started > give_up_s:
                raise RuntimeError(f"only {row[0]}/{count} devices online after {give_up_s:.0f}s")
            alive()
            await asyncio.sleep(0.5)


async def wamd_figures(
    url: str,
    args: argparse.Namespace,
    campaign_id: uuid.UUID,
    progress: Progress,
    load: Load,
    counts: dict[str, int],
    stats: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    await read_timeline(url, campaign_id, progress)
    rows = await outcome(url, campaign_id)
    inbox = inbox_check(counts, args.messages)
    exact = (
        rows.get("rows_sent") == args.messages
        and rows.get("distinct_message_ids_sent") == args.messages
        and inbox["distinct_messages"] == args.messages
        and inbox["leads_with_one"] == args.messages
        and inbox["leads_with_more"] == 0
    )
    emit(
        "wamd_exactly_once",
        exact,
        "bool",
        **inbox,
        **rows,
        sim_messages_sent=stats.get("messages_sent"),
        sim_redeliveries=stats.get("redeliveries"),
        sim_send_failures=stats.get("send_failures"),
    )
    total = sum(load.active.values()) or 1
    top = sorted(load.active.items(), key=lambda kv: -kv[1])[:8]
    emit(
        "wamd_postgres_active",
        {k: round(100 * n / total, 1) for k, n in top},
        "% of active samples",
        samples=total,
        sample_s=load.sample_s,
    )
    if progress.seconds is None:
        return emit("wamd_msgs_per_s", None, "msg/s", gave_up_s=args.timeout, remaining=progress.remaining, **extra)
    rate = args.messages / progress.seconds
    return emit(
        "wamd_msgs_per_s",
        round(rate),
        "msg/s",
        target=TARGET_MSGS_PER_S,
        met=rate >= TARGET_MSGS_PER_S and exact,
        elapsed_s=round(progress.seconds, 2),
        history_at_done=progress.history_at_done,
        history_done_s=progress.history_done_s,
        messages=args.messages,
        devices=args.devices,
        db_pool_size=args.db_pool_size,
        max_db_connections=wamd_connections(args),
        timeline=progress.timeline,
        **extra,
        **load.figures(args.messages),
    )


# --- main -------------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, cleanup: Cleanup) -> None:
    work = Path(tempfile.mkdtemp(prefix="wamd-dispatch-bench-"))
    failed = True

    def tidy() -> None:
        if failed or args.keep_logs:
            log(f"logs kept in {work}")
        else:
            remove_tree(work)

    cleanup.add("remove the work directory", tidy)
    dbs = Databases(args.pg, cleanup)
    max_conn, reserved, used = pg_connection_budget(args.pg)
    emit(
        "run",
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "utc",
        cpus=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
        loadavg_1m=load_average(),
        devices=args.devices,
        messages=args.messages,
        mode=args.mode,
        processes=wamd_processes(args),
        batch=args.batch,
        db_pool_size=args.db_pool_size,
        pg_max_connections=max_conn,
        pg_connections_in_use=used,
        **source_revision(HERE.parent),
    )
    if wamd_connections(args) + 10 > max_conn - reserved - used:
        log(f"warning: up to {wamd_connections(args)} connections needed; {max_conn - reserved - used} free")
    figures: dict[str, dict[str, Any]] = {}
    for phase in args.phases:
        if phase == "raw":
            figures["raw"] = await raw_phase(dbs, args)
        elif phase == "pgqueuer":
            for driver in args.pgqueuer_drivers:
                found = await pgqueuer_phase(dbs, args, cleanup, work, driver)
                # The ratio is taken against pgqueuer's faster driver.
                if found["value"] > figures.get("pgqueuer", {}).get("value", 0):
                    figures["pgqueuer"] = found
        elif phase == "wamd":
            if args.mode == "inprocess":
                figures["wamd"] = await wamd_inprocess(dbs, args, work)
            else:
                figures["wamd"] = await wamd_remote(dbs, args, work, cleanup)
    wamd = figures.get("wamd", {}).get("value")
    for name, base in (("raw", "raw_sql"), ("pgqueuer", "pgqueuer")):
        other = figures.get(name, {}).get("value")
        if wamd and other:
            target = (
                {"met": wamd / other >= TARGET_VS_PGQUEUER, "target": TARGET_VS_PGQUEUER} if name == "pgqueuer" else {}
            )
            emit(f"wamd_vs_{base}_ratio", round(wamd / other, 2), "x", wamd=wamd, **{base: other}, **target)
    failed = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="wamd dispatch benchmark (see docs/performance.md)")
    parser.add_argument("--devices", type=int, default=3000, help="simulated devices (default 3000)")
    parser.add_argument("--messages", type=int, default=200_000, help="outbox rows (default 200000)")
    parser.add_argument("--mode", choices=["inprocess", "remote"], default="inprocess", help="see the docstring")
    parser.add_argument("--workers", type=int, default=2, help="worker processes in --mode remote (default 2)")
    parser.add_argument("--db-pool-size", type=int, default=10, help="WAMD_DB_POOL_SIZE (default 10)")
    parser.add_argument("--batch", type=int, default=0, help="claim size of the baselines (default: wamd's)")
    parser.add_argument("--phases", default="raw,pgqueuer,wamd", help="which phases, in order (default all)")
    parser.add_argument(
        "--pgqueuer-drivers", default="asyncpg", help="pgqueuer's database drivers to run, of asyncpg,psycopg"
    )
    parser.add_argument("--pgqueuer-driver", default="asyncpg", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sample-s", type=float, default=0.25, help="how often the wamd phase samples pg_stat_activity (s)"
    )
    parser.add_argument("--seed-concurrency", type=int, default=50, help="devices paired at once")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between seeding and the release")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up the wamd phase after this")
    parser.add_argument(
        "--gc-threshold",
        help="--mode inprocess: gc.set_threshold(a, b, c) for the runtime instead of wamd-server's own "
        "(wamd_server/gc_tuning.py), e.g. 700,10,10 for Python's defaults",
    )
    parser.add_argument("--pg", default=DEFAULT_PG, help="Postgres admin URL (env WAMD_BENCH_PG)")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL for --mode remote (env WAMD_BENCH_REDIS)")
    parser.add_argument(
        "--profile", metavar="FILE", help="--mode inprocess: cProfile the sending into FILE (pstats; slows it)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)")
    parser.add_argument("--pgqueuer-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--pgqueuer-connections", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch <= 0:
        from wamd_server.services.dispatcher import DispatchSettings

        args.batch = DispatchSettings().batch
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if args.gc_threshold:
        try:
            args.gc_threshold = tuple(int(v) for v in args.gc_threshold.split(","))
        except ValueError:
            parser.error("--gc-threshold: one to three integers, e.g. 20000,20,100")
    args.pgqueuer_drivers = [d.strip() for d in args.pgqueuer_drivers.split(",") if d.strip()]
    if set(args.pgqueuer_drivers) - {"asyncpg", "psycopg"} or not args.pgqueuer_drivers:
        parser.error("--pgqueuer-drivers: asyncpg, psycopg or both")
    unknown = set(args.phases) - {"raw", "pgqueuer", "wamd"}
    if unknown:
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}")
    if args.devices < 1 or args.messages < 1 or args.workers < 1:
        parser.error("--devices, --messages and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pgqueuer_child:
        asyncio.run(pgqueuer_child(args.pgqueuer_child, args.pgqueuer_connections, args.batch, args.pgqueuer_driver))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_with_cleanup(lambda cleanup: bench(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
