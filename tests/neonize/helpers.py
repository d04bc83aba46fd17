"""Helpers shared by the neonize tests and their child processes: whatsmeow store rows, running a child.

Anything that drives neonize's Go library runs in a child process (`tests.neonize.child`): a Go fatal error
aborts the whole process, and pytest must survive to report it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "

# The tables whatsmeow's sqlstore creates (schema version 15 in the shipped build).
WHATSMEOW_TABLES = frozenset(
    {
        "whatsmeow_app_state_mutation_macs",
        "whatsmeow_app_state_sync_keys",
        "whatsmeow_app_state_version",
        "whatsmeow_chat_settings",
        "whatsmeow_contacts",
        "whatsmeow_device",
        "whatsmeow_event_buffer",
        "whatsmeow_identity_keys",
        "whatsmeow_lid_map",
        "whatsmeow_message_secrets",
        "whatsmeow_nct_salt",
        "whatsmeow_pre_keys",
        "whatsmeow_privacy_tokens",
        "whatsmeow_retry_buffer",
        "whatsmeow_sender_keys",
        "whatsmeow_sessions",
        "whatsmeow_version",
    }
)

_DEVICE_COLUMNS = (
    "jid, registration_id, noise_key, identity_key, signed_pre_key, signed_pre_key_id, signed_pre_key_sig, "
    "adv_key, adv_details, adv_account_sig, adv_account_sig_key, adv_device_sig, push_name"
)


def is_postgres(store: str) -> bool:
    return store.startswith(("postgres://", "postgresql://"))


def _pg_url(store: str) -> str:
    return "postgresql://" + store.split("://", 1)[1]


def _device_values(jid: str) -> tuple[Any, ...]:
    # A synthetic paired device: keys of the lengths the schema checks. Enough for whatsmeow to load it and
    # try to connect (it then fails offline), never enough to log in.
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
        "Test, with a comma",  # neonize's get_all_devices would choke on it; we never call it
    )


def insert_devices(store: str, jids: Iterable[str]) -> None:
    rows = [_device_values(jid) for jid in jids]
    if is_postgres(store):
        with psycopg.connect(_pg_url(store), autocommit=True) as conn, conn.cursor() as cur:
            placeholders = ", ".join(["%s"] * len(rows[0]))
            cur.executemany(f"INSERT INTO whatsmeow_device ({_DEVICE_COLUMNS}) VALUES ({placeholders})", rows)
        return
    conn = sqlite3.connect(store)
    try:
        with conn:
            placeholders = ", ".join(["?"] * len(rows[0]))
            conn.executemany(f"INSERT INTO whatsmeow_device ({_DEVICE_COLUMNS}) VALUES ({placeholders})", rows)
    finally:
        conn.close()


def insert_contact(store: str, our_jid: str, their_jid: str) -> None:
    """A per-device row (FK to whatsmeow_device, ON DELETE CASCADE)."""
    sql = "INSERT INTO whatsmeow_contacts (our_jid, their_jid, push_name) VALUES ({0}, {0}, {0})"
    _execute(store, sql, (our_jid, their_jid, "Contact"))


def count_rows(store: str, table: str, column: str, value: str) -> int:
    rows = _query(store, f"SELECT count(*) FROM {table} WHERE {column} = {{0}}", (value,))
    return int(rows[0][0])


def table_names(store: str) -> set[str]:
    if is_postgres(store):
        rows = _query(store, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", ())
    else:
        rows = _query(store, "SELECT name FROM sqlite_master WHERE type = 'table'", ())
    return {str(row[0]) for row in rows}


def sqlite_journal_mode(path: str) -> str:
    return str(_query(path, "PRAGMA journal_mode", ())[0][0])


def _execute(store: str, sql: str, params: Sequence[Any]) -> None:
    if is_postgres(store):
        with psycopg.connect(_pg_url(store), autocommit=True) as conn:
            conn.execute(sql.format("%s"), params)
        return
    conn = sqlite3.connect(store)
    try:
        with conn:
            conn.execute(sql.format("?"), params)
    finally:
        conn.close()


def _query(store: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    if is_postgres(store):
        with psycopg.connect(_pg_url(store), autocommit=True) as conn:
            return conn.execute(sql.format("%s"), params).fetchall()
    conn = sqlite3.connect(store)
    try:
        return conn.execute(sql.format("?"), params).fetchall()
    finally:
        conn.close()


# --- child processes --------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                value: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
                return value
        raise AssertionError(f"the child printed no result (rc {self.returncode}):\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join((self.stdout + "\n" + self.stderr).splitlines()[-lines:])


def child_command(scenario: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.neonize.child", scenario, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(scenario: str, *args: str, timeout: float = 120.0) -> ChildResult:
    done = subprocess.run(
        child_command(scenario, *args), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    return ChildResult(done.returncode, done.stdout, done.stderr)


def run_children(commands: Sequence[tuple[str, ...]], timeout: float = 180.0) -> list[ChildResult]:
    """Run several children at once (they mostly wait on the network), and collect them all."""
    processes = [
        subprocess.Popen(
            child_command(*command),
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(ChildResult(process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results
