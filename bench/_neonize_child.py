"""Child process of bench/pool.py: resident memory per offline neonize client.

    python bench/_neonize_child.py <store> <clients> [--warmup N]

`store` is a SQLite file path or a `postgres://` URL (an empty database). The child creates one
`NeonizeTransport` (the production adapter), lets whatsmeow create its tables, stores `warmup + clients`
synthetic linked devices in `whatsmeow_device`, restores `warmup` of them (one-time costs: the Go runtime,
the first store container, thread pool), waits until everything settled, reads its RSS, then restores the
other `clients` at once (the adapter serialises the Go starts), waits until every one has failed offline (no
network: DNS fails) and its client was stopped, and reads its RSS again.

It prints one line `RESULT {json}` and exits 0. A Go fatal error (e.g. concurrent map writes) aborts the
process with another exit code; the parent reports that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg

RESULT_PREFIX = "RESULT "
SETTLE_TIMEOUT_S = 240.0

_DEVICE_COLUMNS = (
    "jid, registration_id, noise_key, identity_key, signed_pre_key, signed_pre_key_id, signed_pre_key_sig, "
    "adv_key, adv_details, adv_account_sig, adv_account_sig_key, adv_device_sig, push_name"
)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _is_postgres(store: str) -> bool:
    return store.startswith(("postgres://", "postgresql://"))


def _device_row(jid: str) -> tuple[Any, ...]:
    # A synthetic paired device: keys of the lengths the schema checks. Enough for whatsmeow to load it and
    # try to connect (which fails offline), never enough to log in.
    return (
        jid,
        1,
        os.urandom(32),
        os.urandom(32),
        os.urandom(32),
        1,
        os.urandom(64),
        os.urandom(32),
        b"",
        os.urandom(64),
        os.urandom(32),
        os.urandom(64),
        "Bench device",
    )


def insert_devices(store: str, jids: list[str]) -> None:
    rows = [_device_row(jid) for jid in jids]
    if _is_postgres(store):
        url = "postgresql://" + store.split("://", 1)[1].split("?", 1)[0]
        with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            marks = ", ".join(["%s"] * len(rows[0]))
            cur.executemany(f"INSERT INTO whatsmeow_device ({_DEVICE_COLUMNS}) VALUES ({marks})", rows)
        return
    conn = sqlite3.connect(store)
    try:
        with conn:
            marks = ", ".join(["?"] * len(rows[0]))
            conn.executemany(f"INSERT INTO whatsmeow_device ({_DEVICE_COLUMNS}) VALUES ({marks})", rows)
    finally:
        conn.close()


async def settled_rss(stable_kb: int = 512, interval_s: float = 0.5, timeout_s: float = 20.0) -> int:
    """RSS once it stopped moving: three readings in a row within `stable_kb` of each other."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    readings = [_status("VmRSS")]
    while time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        readings.append(_status("VmRSS"))
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= stable_kb:
            break
    return readings[-1]


async def run(store: str, clients: int, warmup: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rss_start = _status("VmRSS")
    from wamd_server.domain.errors import TransportError
    from wamd_server.domain.events import ConnectFailure, Disconnected, LoggedOut, TransportEvent
    from wamd_server.infra.whatsapp.neonize import NeonizeTransport

    rss_imported = _status("VmRSS")
    ended: dict[UUID, str] = {}
    changed = asyncio.Event()

    async def sink(event: TransportEvent) -> None:
        if isinstance(event, (ConnectFailure, Disconnected, LoggedOut)):
            ended[event.device_id] = type(event).__name__
            changed.set()

    transport = NeonizeTransport(store)
    await transport.start(sink)
    try:
        # whatsmeow creates its tables when a client first opens the store; this pairing then fails offline.
        opened = time.monotonic()
        try:
            await transport.pair_qr(uuid4())
            first_error = "paired?!"
        except TransportError as exc:
            first_error = exc.message
        open_s = time.monotonic() - opened

        jids = [f"1555{i:07d}:2@s.whatsapp.net" for i in range(warmup + clients)]
        insert_devices(store, jids)
        devices = [(uuid4(), jid) for jid in jids]

        async def restore(batch: list[tuple[UUID, str]]) -> tuple[float, list[str]]:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(transport.connect(d, j) for d, j in batch), return_exceptions=True)
            errors = [repr(o) for o in outcomes if o is not None]
            wanted = {d for d, _ in batch}
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                while not wanted <= set(ended) or transport.running_devices():
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 0.5)
            return time.monotonic() - started, errors

        await restore(devices[:warmup])
        rss_before = await settled_rss()
        fds_before, threads_before = _fds(), _status("Threads")

        seconds, errors = await restore(devices[warmup:])
        rss_after = await settled_rss()
        fds_after, threads_after = _fds(), _status("Threads")
        kinds: dict[str, int] = {}
        for device_id, _ in devices[warmup:]:
            kinds[ended[device_id]] = kinds.get(ended[device_id], 0) + 1
        reason = next((r for r in (str(e) for e in errors)), None)
        return {
            "store": "postgres" if _is_postgres(store) else "sqlite",
            "clients": clients,
            "warmup": warmup,
            "rss_start_kb": rss_start,
            "rss_imported_kb": rss_imported,
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "per_client_kb": round((rss_after - rss_before) / clients, 1),
            "per_client_incl_first_kb": round((rss_after - rss_imported) / (clients + warmup + 1), 1),
            "fds_per_client": round((fds_after - fds_before) / clients, 2),
            "threads_before": threads_before,
            "threads_after": threads_after,
            "restore_s": round(seconds, 2),
            "store_open_s": round(open_s, 2),
            "first_pairing_error": first_error,
            "outcomes": kinds,
            "connect_errors": len(errors),
            "connect_error_example": reason,
            "executor_threads": transport.executor_threads,
        }
    finally:
        await transport.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("store")
    parser.add_argument("clients", type=int)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    result = asyncio.run(run(args.store, args.clients, args.warmup))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
