"""Helpers shared by the benchmarks in `bench/`: processes, figures, memory, Postgres and Redis housekeeping.

Benchmarks print one JSON object per figure on stdout and their progress on stderr. Everything they start or
create is registered with a `Cleanup`, which undoes it in reverse order even after a failure or Ctrl+C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

BIN = Path(sys.executable).parent
_STARTED = time.monotonic()

# Variables of ours that must not leak from the caller's environment into the processes a benchmark starts.
_OWN_VARIABLES = ("DATABASE_URL", "DB_URI", "REDIS_URL", "PORT", "HOST")

# The Postgres (admin) and Redis the benchmarks use unless told otherwise.
DEFAULT_PG = os.environ.get("WAMD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DEFAULT_REDIS = os.environ.get("WAMD_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def emit(figure: str, value: Any, unit: str, **extra: Any) -> dict[str, Any]:
    """One figure as one JSON line on stdout."""
    record: dict[str, Any] = {"figure": figure, "value": value, "unit": unit, **extra}
    print(json.dumps(record, sort_keys=False), flush=True)
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any wamd setting, plus `extra` (so a stray
    WAMD_CONNECTS_PER_SECOND in the caller's shell cannot change what is measured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAMD_") and k not in _OWN_VARIABLES}
    env.update(extra)
    return env


# --- memory ---------------------------------------------------------------------------------------------


def proc_status(pid: int | str, key: str) -> int:
    """A numeric field of /proc/<pid>/status (VmRSS in kB, Threads, ...); -1 if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def rss_kb(pid: int | str = "self") -> int:
    return proc_status(pid, "VmRSS")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time a process has used so far; -1 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks summed over all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = float(sum(values[:8]))  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = float(values[3] + values[4])
    return total - idle, total


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def open_fds(pid: int | str = "self") -> int:
    try:
        return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return -1


def source_revision(root: Path) -> dict[str, Any]:
    """What was measured: the commit of the working tree at `root` and whether its server code has uncommitted
    changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "source": "working tree",
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "server_code_modified": bool(git("status", "--porcelain", "--", "wamd_server")),
    }


# --- processes ------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process with its output in a log file. Started in its own session, so a Ctrl+C in the
    terminal reaches only the benchmark, which then stops its children in order."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> Proc:
        with self.log_path.open("ab") as out:
            self.started_at = time.monotonic()
            self.popen = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds. Returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            log(f"{self.name} did not stop within {timeout:.0f}s; killing it")
            self.signal(signal.SIGKILL)
            self.wait(10.0)
        return self.popen.poll()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_all(procs: list[Proc], timeout: float = 30.0) -> None:
    """SIGTERM to all at once (so they stop together), then wait for each; SIGKILL the ones that linger."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc.wait(max(deadline - time.monotonic(), 0.1)) is None and proc.alive():
            log(f"{proc.name} did not stop within {timeout:.0f}s; killing it")
            proc.signal(signal.SIGKILL)
            proc.wait(10.0)


# --- cleanup --------------------------------------------------------------------------------------------


@dataclass
class Cleanup:
    """Undo actions, run last-in first-out; each runs even if an earlier one failed."""

    actions: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def add(self, what: str, action: Callable[[], object]) -> None:
        self.actions.append((what, action))

    def run(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not leave debris
        try:
            while self.actions:
                what, action = self.actions.pop()
                try:
                    action()
                except Exception as exc:
                    log(f"cleanup: {what} failed: {exc}")
        finally:
            signal.signal(signal.SIGINT, previous)


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt wherever the benchmark is, even inside a blocking wait
    (asyncio's own SIGINT handling would only cancel the main task once the loop gets control back), so
    Ctrl+C and `kill <benchmark>` both end in the cleanup."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run_with_cleanup(bench: Callable[[Cleanup], Coroutine[Any, Any, None]]) -> int:
    """Run `bench(cleanup)` to the end, then the cleanup, also after a failure, Ctrl+C or SIGTERM; the exit code
    (0, 1 after a failure, 130 after an interruption)."""
    interrupt_on_signals()
    cleanup = Cleanup()
    code = 0
    try:
        asyncio.run(bench(cleanup))
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except Exception as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        cleanup.run()
    return code


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- Postgres -------------------------------------------------------------------------------------------


def pg_connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def pg_database_url(admin_url: str, name: str) -> str:
    """The admin URL (any `postgresql://…/db`, with or without a query such as `?host=/var/run/postgresql` for
    the Unix socket) pointed at database `name`."""
    return urlunsplit(urlsplit(admin_url)._replace(path="/" + name))


def pg_database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def create_database(admin_url: str, name: str) -> str:
    with pg_connect(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with pg_connect(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_connection_budget(admin_url: str) -> tuple[int, int, int]:
    """(max_connections, reserved for superusers, connections in use now)."""
    with pg_connect(admin_url) as conn:
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
        reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])  # type: ignore[index]
        used = int(conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0])  # type: ignore[index]
    return max_conn, reserved, used


# --- Redis ----------------------------------------------------------------------------------------------


def delete_redis_prefix(url: str, prefix: str) -> int:
    """Delete the keys under `prefix:` (rate-limit counters; the bus itself only uses pub/sub)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()
