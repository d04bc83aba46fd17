"""Device pool benchmark: cold start of many simulated devices across worker processes, memory per device in a
worker, memory per offline neonize client, and a bare-transport baseline. Not part of the test suite.

    .venv/bin/python bench/pool.py [--devices 3000] [--workers 2] [--neonize-clients 1000] ...

Needs Postgres (an admin URL, default postgresql://postgres@127.0.0.1:5432/postgres or WAMD_BENCH_PG) and Redis
(default redis://127.0.0.1:6379/0 or WAMD_BENCH_REDIS). Prints one JSON object per figure on stdout, progress
on stderr. It creates a database `wamd_bench_<hex>` (dropped at the end), uses a unique WAMD_REDIS_PREFIX, and
stops every process it started, also after a failure or Ctrl+C. See docs/performance.md.

Phases:
1. seed: a standalone `wamd-sim`, `wamd-server api` and K `wamd-server worker`s; every device is created and
   paired through the API (QR from the WebSocket event, scanned with the simulator's `/api/sim/scan`), many
   at once, until all are online. Then the workers get SIGTERM (they hand back their leases) and the API stops.
2. baseline: the same sessions (same session ids, JIDs and secrets) opened straight through `SimTransport`
   against the same simulator, without pool, leases or status writes: all at once, and paced like K workers.
3. cold start: K idle workers on an empty database (the memory baseline), then K fresh workers on the seeded
   database at the default stagger; the clock runs from starting them until every device is `online` in the
   database (polled every 0.2 s). Then leases per worker, the simulator's double connections, and RSS.
4. neonize: a child process restores N synthetic devices through `NeonizeTransport` (SQLite store; Postgres
   too when `max_connections` allows one connection per client), all failing offline, and reports RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

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
    log,
    machine_cpu,
    pg_connection_budget,
    pg_database_url,
    remove_tree,
    run_with_cleanup,
    source_revision,
    stop_all,
)

HERE = Path(__file__).resolve().parent

TARGET_COLD_START_S = 60.0
TARGET_WORKER_KB_PER_DEVICE = 150.0
TARGET_NEONIZE_KB_PER_CLIENT = 300.0

POLL_S = 0.2
ADMIN_EMAIL = "bench@example.com"


def measured_source(source: Path | None) -> dict[str, Any]:
    """What was measured: the name of the `--source` directory, or the working tree's commit and whether its
    server code had uncommitted changes."""
    return {"source": source.name} if source is not None else source_revision(HERE.parent)


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure here."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def default_connects_per_second() -> float:
    """The worker's default stagger, read from the configuration code (no WAMD_* variable set)."""
    from wamd_server.config import load_config

    return load_config({}).connects_per_second


# --- the cluster ----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    work: Path
    cleanup: Cleanup
    pg_admin: str
    redis_url: str
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    sim_url: str = ""
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def db_name(self) -> str:
        return f"wamd_bench_{self.tag}"

    @property
    def prefix(self) -> str:
        return f"wamd-bench-{self.tag}"

    def db_url(self, suffix: str = "") -> str:
        return pg_database_url(self.pg_admin, self.db_name + suffix)

    def create_db(self, suffix: str = "") -> str:
        name = self.db_name + suffix
        create_database(self.pg_admin, name)
        self.cleanup.add(f"drop database {name}", lambda: drop_database(self.pg_admin, name))
        log(f"created database {name}")
        return self.db_url(suffix)

    def server_env(self, db_suffix: str = "", prefix_suffix: str = "", **extra: str) -> dict[str, str]:
        return clean_env(
            {
                "DATABASE_URL": self.db_url(db_suffix),
                "REDIS_URL": self.redis_url,
                "WAMD_REDIS_PREFIX": self.prefix + prefix_suffix,
                "WAMD_TRANSPORT": "sim",
                "WAMD_SIM_URL": self.sim_url,
                "WAMD_DATA_DIR": str(self.work / "data"),
                **extra,
            }
        )

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, args, env, self.work / f"{name}.log").start()
        self.cleanup.add(f"stop {name}", lambda: proc.stop(20.0))
        return proc

    def start_sim(self) -> Proc:
        port = free_port()
        self.sim_url = f"http://127.0.0.1:{port}"
        args = [str(BIN / "wamd-sim"), "--port", str(port), "--log-level", "WARNING"]
        return self.start("wamd-sim", args, clean_env({}))

    def start_api(self, port: int) -> Proc:
        env = self.server_env(PORT=str(port), WAMD_ADMIN_EMAIL=ADMIN_EMAIL, WAMD_ADMIN_PASSWORD=self.admin_password)
        return self.start("api", [str(BIN / "wamd-server"), "api"], env)

    def start_worker(self, name: str, capacity: int, *, db_suffix: str = "", prefix_suffix: str = "") -> Proc:
        env = self.server_env(db_suffix, prefix_suffix)
        return self.start(name, [str(BIN / "wamd-server"), "worker", "--capacity", str(capacity)], env)


async def wait_http(proc: Proc, url: str, within_s: float = 60.0) -> None:
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
    raise RuntimeError(f"{url} did not answer within {within_s:.0f}s:\n{proc.tail()}")


def check_alive(procs: list[Proc]) -> None:
    for proc in procs:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.returncode()}:\n{proc.tail()}")


async def scalar(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    cursor = await conn.execute(sql)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def wait_registered(db_url: str, count: int, procs: list[Proc], within_s: float = 60.0) -> None:
    """Until `count` workers heartbeat in the `workers` table of `db_url`."""
    deadline = time.monotonic() + within_s
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            check_alive(procs)
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                live = await scalar(conn, "SELECT count(*) FROM workers WHERE heartbeat_at > now() - interval '10 s'")
                if live >= count:
                    return
            await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{count} workers did not register within {within_s:.0f}s")


async def sim_stats(sim_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(sim_url + "/api/sim/stats") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def wait_sim_offline(sim_url: str, within_s: float = 60.0) -> None:
    """Until the simulator has no live session (links closed by stopped workers or transports)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        online = len((await sim_stats(sim_url))["online"])
        if online == 0:
            return
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"the simulator still has {online} live sessions after {within_s:.0f}s")


class ConnectionPeak:
    """Samples, every 0.5 s, how many Postgres connections our database and the whole server have; keeps the
    peaks (the server is shared: `max_connections` bounds everyone)."""

    def __init__(self, admin_url: str, database: str) -> None:
        self._admin_url = admin_url
        self._database = database
        self.ours = 0
        self.server = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConnectionPeak:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._admin_url, autocommit=True) as conn:
            while True:
                cursor = await conn.execute(
                    "SELECT count(*) FILTER (WHERE datname = %s), count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend'",
                    (self._database,),
                )
                row = await cursor.fetchone()
                assert row is not None
                self.ours, self.server = max(self.ours, int(row[0])), max(self.server, int(row[1]))
                await asyncio.sleep(0.5)


def warn_connection_budget(admin_url: str, processes: int) -> None:
    """Each wamd process may open 30 Postgres connections (pool 10 + overflow 20); say so if that may not fit."""
    max_conn, reserved, used = pg_connection_budget(admin_url)
    worst = 30 * processes + 5
    if worst > max_conn - reserved - used:
        log(
            f"warning: {processes} wamd processes may open up to {worst} Postgres connections; "
            f"max_connections={max_conn} ({reserved} reserved, {used} in use by others). A run that fails with "
            "'too many clients' was starved by other users of this server."
        )


# --- phase 1: seed --------------------------------------------------------------------------------------


class QrCodes:
    """`device.qr` events from the API's WebSocket, handed to whoever waits for a device's code."""

    def __init__(self) -> None:
        self.codes: dict[str, str] = {}
        self.waiters: dict[str, asyncio.Future[str]] = {}

    def expect(self, device_id: str) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if device_id in self.codes:
            future.set_result(self.codes.pop(device_id))
        else:
            self.waiters[device_id] = future
        return future

    def got(self, device_id: str, code: str) -> None:
        future = self.waiters.pop(device_id, None)
        if future is not None and not future.done():
            future.set_result(code)
        else:
            self.codes[device_id] = code


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def api_call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, token: str = "", *, attempts: int = 1
) -> Any:
    """One JSON call; a 503 (no worker seen alive, device moving between workers) is retried `attempts` times."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(1, attempts + 1):
        async with http.request(method, url, json=body, headers=headers) as resp:
            answer = await resp.json(content_type=None)
            if resp.status < 300:
                return answer
            if resp.status != 503 or attempt == attempts:
                raise ApiError(resp.status, f"{method} {url} answered {resp.status}: {answer}")
        log(f"seed: {method} {url} answered 503 ({answer}); retrying")
        await asyncio.sleep(attempt)
    raise AssertionError("unreachable")


def phone(n: int) -> str:
    return f"6011{n:07d}"


async def seed_devices(api_url: str, sim_url: str, password: str, count: int, concurrency: int) -> None:
    """Create and pair `count` devices through the API, `concurrency` at a time."""
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as http:
        login = await api_call(http, "POST", api_url + "/api/auth/login", {"email": ADMIN_EMAIL, "password": password})
        token = str(login["token"])
        ws = await http.ws_connect(api_url + "/api/ws", heartbeat=20.0)
        await ws.send_json({"type": "auth", "token": token})
        first = await ws.receive_json(timeout=10)
        if first.get("type") != "auth_ok":
            raise RuntimeError(f"WebSocket authentication failed: {first}")
        await ws.send_json({"id": 1, "type": "subscribe_events", "event_types": ["device.qr"]})
        qr = QrCodes()
        subscribed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def read() -> None:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("type") == "event" and data["event"].get("type") == "device.qr":
                    qr.got(str(data["event"]["device_id"]), str(data["event"]["code"]))
                elif data.get("id") == 1 and not subscribed.done():
                    subscribed.set_result(data)
            if not subscribed.done():
                subscribed.set_exception(RuntimeError(f"the WebSocket closed: {ws.close_code}"))

        reader = asyncio.create_task(read())
        try:
            answer = await asyncio.wait_for(subscribed, 10)
            if not answer.get("success"):
                raise RuntimeError(f"subscribing failed: {answer}")
            numbers = iter(range(count))
            done = 0

            async def pair_one(n: int) -> None:
                device = await api_call(http, "POST", api_url + "/api/devices", {"name": f"Bench {n}"}, token)
                device_id = str(device["id"])
                code = qr.expect(device_id)
                await api_call(
                    http, "POST", f"{api_url}/api/devices/{device_id}/pair", {"method": "qr"}, token, attempts=5
                )
                await api_call(
                    http, "POST", sim_url + "/api/sim/scan", {"qr": await asyncio.wait_for(code, 30), "phone": phone(n)}
                )

            async def pipeline() -> None:
                nonlocal done
                for n in numbers:
                    await pair_one(n)
                    done += 1
                    if done % 500 == 0:
                        log(f"seed: {done}/{count} devices paired")

            await asyncio.gather(*(pipeline() for _ in range(concurrency)))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await ws.close()


async def wait_online(
    db_url: str,
    count: int,
    procs: list[Proc],
    give_up_s: float,
    started: float,
    *,
    workers: int,
    progress_s: float = 5.0,
) -> dict[str, Any]:
    """Poll the database every 0.2 s until `count` devices are online (and note when `workers` workers had
    registered). Times are seconds since `started`; `procs` must stay alive meanwhile."""
    first_online: float | None = None
    registered: float | None = None
    timeline: list[tuple[float, int]] = []
    next_report = progress_s
    online = 0
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while True:
            now = time.monotonic() - started
            cursor = await conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'online'), "
                "(SELECT count(*) FROM workers WHERE heartbeat_at > now() - interval '10 s') FROM devices"
            )
            row = await cursor.fetchone()
            assert row is not None
            online, live_workers = int(row[0]), int(row[1])
            if online and first_online is None:
                first_online = now
            if registered is None and live_workers >= workers:
                registered = now
            if now >= next_report:
                timeline.append((round(now, 1), online))
                log(f"  {now:5.1f}s: {online}/{count} online")
                next_report += progress_s
            if online >= count:
                return {
                    "seconds": now,
                    "first_online_s": first_online,
                    "registered_s": registered,
                    "timeline": timeline,
                }
            if now > give_up_s:
                return {
                    "seconds": None,
                    "online": online,
                    "first_online_s": first_online,
                    "registered_s": registered,
                    "timeline": timeline,
                }
            check_alive(procs)
            await asyncio.sleep(POLL_S)


# --- phase 2: baseline ----------------------------------------------------------------------------------


class MemorySessions:
    """A `SessionStore` over a dict: credentials as the seed stored them, no database in the way."""

    def __init__(self, secrets_by_jid: dict[str, str]) -> None:
        self._secrets = dict(secrets_by_jid)

    async def get(self, jid: str) -> str | None:
        return self._secrets.get(jid)

    async def put(self, jid: str, transport: str, secret: str) -> None:
        self._secrets[jid] = secret

    async def delete(self, jid: str) -> None:
        self._secrets.pop(jid, None)


async def load_sessions(db_url: str) -> list[tuple[UUID, str, str]]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT d.id, d.jid, s.secret FROM devices d JOIN transport_sessions s ON s.jid = d.jid ORDER BY d.id"
        )
        return [(UUID(str(r[0])), str(r[1]), str(r[2])) for r in await cursor.fetchall()]


async def bare_transport_start(
    sim_url: str, sessions: list[tuple[UUID, str, str]], *, pacers: int = 0, per_second: float = 0.0
) -> dict[str, Any]:
    """Open every session through one `SimTransport`; seconds until every device reported `Connected`.

    `pacers` > 0 spaces the connects like that many workers, each at `per_second` (the pool's `ConnectPacer`).
    """
    from wamd_server.domain.events import Connected, TransportEvent
    from wamd_server.infra.whatsapp.sim import SimTransport
    from wamd_server.services.device_pool import ConnectPacer

    connected: set[UUID] = set()
    other: dict[str, int] = {}
    everyone = asyncio.Event()
    count = len(sessions)

    async def sink(event: TransportEvent) -> None:
        if isinstance(event, Connected):
            connected.add(event.device_id)
            if len(connected) >= count:
                everyone.set()
        else:
            other[type(event).__name__] = other.get(type(event).__name__, 0) + 1

    transport = SimTransport.remote(sim_url, MemorySessions({jid: secret for _, jid, secret in sessions}))
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    await transport.start(sink)
    try:
        if pacers:
            groups = [sessions[i::pacers] for i in range(pacers)]

            async def paced(group: list[tuple[UUID, str, str]]) -> None:
                pacer = ConnectPacer(per_second)
                for device_id, jid, _ in group:
                    await pacer.wait()
                    task = asyncio.create_task(transport.connect(device_id, jid))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

            await asyncio.gather(*(paced(g) for g in groups))
        else:
            await asyncio.gather(*(transport.connect(d, jid) for d, jid, _ in sessions))
        await asyncio.wait_for(everyone.wait(), 300)
        seconds = time.monotonic() - started
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.close()
    return {"seconds": seconds, "connected": len(connected), "other_events": other}


# --- phase 4: neonize -----------------------------------------------------------------------------------


def run_neonize_child(cluster: Cluster, name: str, store: str, clients: int, warmup: int) -> dict[str, Any]:
    """Run bench/_neonize_child.py; its RESULT, or {"failed": ...} if it died (a Go fatal error aborts it)."""
    args = [sys.executable, str(HERE / "_neonize_child.py"), store, str(clients), "--warmup", str(warmup)]
    proc = cluster.start(name, args, clean_env({}))
    timeout = 120.0 + clients * 0.5
    code = proc.wait(timeout)
    if code is None:
        proc.stop(10.0)
        return {"failed": f"did not finish within {timeout:.0f}s", "tail": proc.tail(15)}
    text = proc.log_path.read_text(errors="replace")
    result = next((line for line in reversed(text.splitlines()) if line.startswith("RESULT ")), None)
    if code != 0 or result is None:
        return {"failed": f"the child exited with {code} (a negative code is a signal)", "tail": proc.tail(15)}
    parsed: dict[str, Any] = json.loads(result[len("RESULT ") :])
    return parsed


def neonize_figures(cluster: Cluster, args: argparse.Namespace) -> None:
    clients, warmup = args.neonize_clients, args.neonize_warmup
    store_dir = cluster.work / "neonize"
    store_dir.mkdir()
    log(f"neonize: restoring {clients} synthetic devices on SQLite (after {warmup} warm-up clients)")
    result = run_neonize_child(cluster, "neonize-sqlite", str(store_dir / "whatsmeow.db"), clients, warmup)
    emit_neonize("neonize_sqlite_rss_per_client_kb", result, clients)

    max_conn, reserved, used = pg_connection_budget(cluster.pg_admin)
    # Each failed connect keeps one Postgres connection open (reference: neonize.md §5), plus the adapter's own.
    needed = clients + warmup + 2
    available = max_conn - reserved - used
    if needed > available - 10:
        reason = (
            f"needs about {needed} Postgres connections (one per client, never released by neonize 0.5.2); "
            f"max_connections={max_conn}, {reserved} reserved, {used} in use"
        )
        log(f"neonize on Postgres skipped: {reason}")
        emit(
            "neonize_postgres_rss_per_client_kb",
            None,
            "kB",
            target=TARGET_NEONIZE_KB_PER_CLIENT,
            met=None,
            skipped=reason,
            clients=clients,
        )
        return
    url = cluster.create_db("_wa")
    store = "postgres://" + url.split("://", 1)[1] + "?sslmode=disable"
    log(f"neonize: restoring {clients} synthetic devices on Postgres")
    result = run_neonize_child(cluster, "neonize-postgres", store, clients, warmup)
    emit_neonize("neonize_postgres_rss_per_client_kb", result, clients)


def emit_neonize(figure: str, result: dict[str, Any], clients: int) -> None:
    if "failed" in result:
        log(f"{figure}: FAILED: {result['failed']}\n{result.get('tail', '')}")
        emit(figure, None, "kB", target=TARGET_NEONIZE_KB_PER_CLIENT, met=False, clients=clients, **result)
        return
    value = result.pop("per_client_kb")
    emit(figure, value, "kB", target=TARGET_NEONIZE_KB_PER_CLIENT, met=value <= TARGET_NEONIZE_KB_PER_CLIENT, **result)


# --- the run --------------------------------------------------------------------------------------------


async def sample_rss(procs: list[Proc], samples: int = 3, interval_s: float = 1.0) -> list[int]:
    """Median of a few VmRSS readings per process, in kB."""
    readings: list[list[int]] = [[] for _ in procs]
    for i in range(samples):
        if i:
            await asyncio.sleep(interval_s)
        for slot, proc in zip(readings, procs, strict=True):
            slot.append(proc.rss_kb())
    return [int(statistics.median(r)) for r in readings]


async def leases_by_worker(db_url: str, workers: list[Proc]) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT w.pid, count(l.device_id) FROM workers w LEFT JOIN device_leases l ON l.worker_id = w.id "
            "GROUP BY w.pid"
        )
        by_pid = {int(pid): int(n) for pid, n in await cursor.fetchall()}
        unleased = await scalar(
            conn,
            "SELECT count(*) FROM devices d WHERE NOT EXISTS (SELECT 1 FROM device_leases l WHERE l.device_id = d.id)",
        )
    result = {proc.name: by_pid.get(proc.pid, 0) for proc in workers}
    result["unleased"] = int(unleased)
    return result


async def bench(args: argparse.Namespace, cleanup: Cleanup) -> None:
    work = Path(tempfile.mkdtemp(prefix="wamd-bench-pool-"))
    failed = True

    def remove_work() -> None:
        if args.keep_logs or failed:
            log(f"logs kept in {work}")
        else:
            remove_tree(work)

    cleanup.add("remove the work directory", remove_work)
    cluster = Cluster(work, cleanup, args.pg, args.redis)
    cleanup.add("delete Redis keys", lambda: delete_redis_prefix(args.redis, cluster.prefix))
    devices, k = args.devices, args.workers
    capacity = args.capacity or math.ceil(devices / k)
    cps = default_connects_per_second()
    emit(
        "run",
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "utc",
        cpus=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
        devices=devices,
        workers=k,
        capacity=capacity,
        connects_per_second=cps,
        loadavg_1m=load_average(),
        **measured_source(args.source),
    )

    # --- phase 1: seed -------------------------------------------------------------------------------------
    db_url = cluster.create_db()
    sim = cluster.start_sim()
    await wait_http(sim, cluster.sim_url + "/api/health")
    api_port = free_port()
    api = cluster.start_api(api_port)
    api_url = f"http://127.0.0.1:{api_port}"
    await wait_http(api, api_url + "/api/health")
    seeders = [cluster.start_worker(f"seed-worker-{n}", devices) for n in range(k)]
    await wait_registered(db_url, k, seeders)
    warn_connection_budget(args.pg, k + 1)
    log(f"seed: pairing {devices} devices through the API, {args.seed_concurrency} at a time")
    started = time.monotonic()
    async with ConnectionPeak(args.pg, cluster.db_name) as seed_peak:
        await seed_devices(api_url, cluster.sim_url, cluster.admin_password, devices, args.seed_concurrency)
        paired_s = time.monotonic() - started
        seeded = await wait_online(db_url, devices, [sim, api, *seeders], 300.0, started, workers=k, progress_s=30.0)
    if seeded["seconds"] is None:
        raise RuntimeError(f"seeding: only {seeded['online']}/{devices} devices came online")
    seed_s = time.monotonic() - started
    emit(
        "seed_s",
        round(seed_s, 1),
        "s",
        devices=devices,
        paired_s=round(paired_s, 1),
        rate_per_s=round(devices / seed_s),
        concurrency=args.seed_concurrency,
        db_connections_peak=seed_peak.ours,
    )
    log("seed: stopping the seed workers (SIGTERM) and the API")
    stopping = time.monotonic()
    stop_all(seeders, 60.0)
    emit(
        "seed_workers_sigterm_exit_s",
        round(time.monotonic() - stopping, 1),
        "s",
        devices_per_worker=round(devices / k),
        exit_codes=[p.returncode() for p in seeders],
    )
    stop_all([api], 30.0)
    await wait_sim_offline(cluster.sim_url)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        leftover = await scalar(conn, "SELECT count(*) FROM device_leases")
        statuses = dict(await (await conn.execute("SELECT status, count(*) FROM devices GROUP BY status")).fetchall())
    log(f"seed: after stopping, {leftover} leases left, statuses {statuses}")

    # --- phase 2: baseline ---------------------------------------------------------------------------------
    sessions = await load_sessions(db_url)
    if len(sessions) != devices:
        raise RuntimeError(f"{len(sessions)} stored sessions for {devices} devices")
    log(f"baseline: {devices} sessions straight through SimTransport, all at once")
    bare = await bare_transport_start(cluster.sim_url, sessions)
    await wait_sim_offline(cluster.sim_url)
    emit(
        "baseline_sim_transport_s",
        round(bare["seconds"], 2),
        "s",
        devices=devices,
        paced=False,
        connected=bare["connected"],
        other_events=bare["other_events"],
    )
    paced: dict[str, Any] | None = None
    if not args.skip_paced_baseline:
        log(f"baseline: the same, paced like {k} workers at {cps:g} connects/s each")
        paced = await bare_transport_start(cluster.sim_url, sessions, pacers=k, per_second=cps)
        await wait_sim_offline(cluster.sim_url)
        emit(
            "baseline_sim_transport_paced_s",
            round(paced["seconds"], 2),
            "s",
            devices=devices,
            paced=True,
            pacers=k,
            connects_per_second=cps,
            connected=paced["connected"],
            other_events=paced["other_events"],
        )

    # --- phase 3: cold start ----------------------------------------------------------------------------------
    idle_db = cluster.create_db("_idle")
    migrate = Proc(
        "migrate-idle", [str(BIN / "wamd-server"), "migrate"], cluster.server_env("_idle"), work / "migrate.log"
    )
    if migrate.start().wait(120) != 0:
        raise RuntimeError(f"migrating the idle database failed:\n{migrate.tail()}")
    idle = [
        cluster.start_worker(f"idle-worker-{n}", capacity, db_suffix="_idle", prefix_suffix="-idle") for n in range(k)
    ]
    await wait_registered(idle_db, k, idle)
    await asyncio.sleep(2.0)
    doubles_before = (await sim_stats(cluster.sim_url))["double_connection_total"]

    log(f"cold start: {k} workers (capacity {capacity}, default stagger {cps:g}/s each) for {devices} devices")
    busy_before, total_before = machine_cpu()
    started = time.monotonic()
    async with ConnectionPeak(args.pg, cluster.db_name) as cold_peak:
        workers = [cluster.start_worker(f"worker-{n}", capacity) for n in range(k)]
        cold = await wait_online(db_url, devices, [sim, *workers, *idle], args.online_timeout, started, workers=k)
    busy_after, total_after = machine_cpu()
    worker_cpu = [round(cpu_seconds(p.pid), 1) for p in workers]
    stats = await sim_stats(cluster.sim_url)
    leases = await leases_by_worker(db_url, workers)
    floor = devices / (k * cps) if capacity * k >= devices else None
    value = None if cold["seconds"] is None else round(cold["seconds"], 2)
    emit(
        "cold_start_online_s",
        value,
        "s",
        target=TARGET_COLD_START_S,
        met=value is not None and value <= TARGET_COLD_START_S,
        devices=devices,
        workers=k,
        capacity=capacity,
        connects_per_second=cps,
        pacing_floor_s=None if floor is None else round(floor, 1),
        workers_registered_s=None if cold["registered_s"] is None else round(cold["registered_s"], 2),
        first_online_s=None if cold["first_online_s"] is None else round(cold["first_online_s"], 2),
        online_at_timeout=cold.get("online"),
        timeline=cold["timeline"],
        worker_cpu_s=worker_cpu,
        worker_cpu_ms_per_device=round(sum(worker_cpu) * 1000 / devices, 2),
        machine_busy_pct=round(100 * (busy_after - busy_before) / max(total_after - total_before, 1), 1),
        loadavg_1m=load_average(),
        db_connections_peak=cold_peak.ours,
        server_connections_peak=cold_peak.server,
    )
    emit("cold_start_leases", [leases[p.name] for p in workers], "devices", by_worker=leases, capacity=capacity)
    doubles = stats["double_connection_total"]
    emit(
        "sim_double_connection_total",
        doubles,
        "connections",
        target=0,
        met=doubles == 0,
        during_cold_start=doubles - doubles_before,
        sim_online=len(stats["online"]),
        linked=stats.get("linked"),
    )
    for name, base in (("cold_start_vs_baseline_ratio", bare), ("cold_start_vs_paced_baseline_ratio", paced)):
        if base is not None:
            ratio = None if value is None else round(value / base["seconds"], 2)
            emit(name, ratio, "x", wamd_s=value, baseline_s=round(base["seconds"], 2))

    await asyncio.sleep(args.settle)
    loaded_rss = await sample_rss(workers)
    idle_rss = await sample_rss(idle)
    per_device = (sum(loaded_rss) - sum(idle_rss)) / devices
    emit(
        "worker_rss_per_device_kb",
        round(per_device, 1),
        "kB",
        target=TARGET_WORKER_KB_PER_DEVICE,
        met=per_device <= TARGET_WORKER_KB_PER_DEVICE,
        loaded_rss_kb=loaded_rss,
        idle_rss_kb=idle_rss,
        devices_per_worker=[leases[p.name] for p in workers],
    )
    log("cold start: stopping the workers and the simulator")
    stop_all([*workers, *idle], 60.0)
    stop_all([sim], 20.0)

    # --- phase 4: neonize ------------------------------------------------------------------------------------
    if args.neonize_clients > 0:
        neonize_figures(cluster, args)
    failed = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="wamd device pool benchmark (see docs/performance.md)")
    parser.add_argument("--devices", type=int, default=3000, help="simulated devices (default 3000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes K (default 2)")
    parser.add_argument("--capacity", type=int, default=0, help="capacity per worker (default ceil(devices/K))")
    parser.add_argument("--seed-concurrency", type=int, default=32, help="devices paired at once while seeding")
    parser.add_argument("--online-timeout", type=float, default=180.0, help="give up the cold start after this")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after all online before reading RSS")
    parser.add_argument("--skip-paced-baseline", action="store_true", help="only the unpaced bare-transport run")
    parser.add_argument("--neonize-clients", type=int, default=1000, help="neonize clients (0 skips that part)")
    parser.add_argument("--neonize-warmup", type=int, default=10, help="neonize clients before the RSS baseline")
    parser.add_argument("--pg", default=DEFAULT_PG, help="Postgres admin URL (env WAMD_BENCH_PG)")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL (env WAMD_BENCH_REDIS)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)")
    parser.add_argument(
        "--source",
        type=Path,
        help="measure the wamd_server package in this directory (e.g. a `git archive` of a commit) instead of the "
        "installed one; every process gets it first on PYTHONPATH",
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.workers < 1:
        parser.error("--devices and --workers must be at least 1")
    if args.source is not None:
        args.source = args.source.resolve()
        if not (args.source / "wamd_server" / "__init__.py").is_file():
            parser.error(f"--source: no wamd_server package in {args.source}")
    return args


def use_source(source: Path | None) -> None:
    if source is None:
        return
    sys.path.insert(0, str(source))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_source(args.source)
    return run_with_cleanup(lambda cleanup: bench(args, cleanup))


if __name__ == "__main__":
    sys.exit(main())
