"""The transport against the real Go library, offline. Each scenario runs in a child process (see child.py):
a Go fatal error aborts the whole process, and must show up here as a failed exit code, not a dead pytest."""

from __future__ import annotations

from pathlib import Path

from tests.neonize.helpers import WHATSMEOW_TABLES, ChildResult, run_child, run_children

DIAL_ERROR = "failed to dial whatsapp web websocket"


def assert_ok(child: ChildResult) -> None:
    assert child.returncode == 0, f"child exited with {child.returncode}:\n{child.tail()}"


def test_store_tables_are_created_and_sessions_found_and_forgotten(store: str) -> None:
    child = run_child("tables", store)
    assert_ok(child)
    result = child.result
    assert result["has_before"] is False  # no tables yet: no session, no error, no file created
    assert DIAL_ERROR in result["pair_error"]
    assert set(result["tables"]) == WHATSMEOW_TABLES
    assert result["has_after_insert"] is True
    assert result["has_after_forget"] is False
    assert result["contacts_after_forget"] == 0  # per-device rows cascade with the device row
    if not store.startswith("postgres"):
        assert result["journal_mode"] == "wal"


def test_offline_connect_fails_fast_and_is_reported(store: str) -> None:
    child = run_child("offline", store)
    assert_ok(child)
    result = child.result
    assert DIAL_ERROR in result["reason"]
    # whatsmeow does not retry a first connect; the dial fails on DNS (a resolver retry can add ~5 s here).
    assert result["seconds"] < 20
    assert result["send"] == "NotConnected"
    assert result["mark_read"] == "NotConnected"
    assert result["typing"] == "NotConnected"
    assert result["pair_code"] == "TransportError"
    assert result["has_session"] is True  # a failed connect keeps the credentials
    assert result["logout"] == "TransportError"
    assert result["has_session_after_logout"] is False
    assert result["other_events"] == []
    assert result["connect_failures"] == 2  # the logout's own connect attempt is not reported


def test_connect_with_unknown_jid_raises_session_missing(store: str) -> None:
    child = run_child("unknown", store)
    assert_ok(child)
    result = child.result
    assert result["before_tables"] == "SessionMissing"
    assert result["after_tables"] == "SessionMissing"
    assert result["logout"] == "no error"  # nothing stored, nothing to unlink
    assert result["running"] == []


def test_a_dial_that_hangs_holds_up_neither_commands_nor_exit(sqlite_store: str) -> None:
    child = run_child("hung", sqlite_store, timeout=50)
    assert_ok(child)  # exits although Go threads are still blocked in their 60 s dials
    result = child.result
    assert result["pair_error"] == "WhatsApp sent no QR code in time"
    assert result["pair_seconds"] < 10
    assert result["connecting"] is True
    assert result["disconnect_seconds"] < 5  # waits for the start to settle, but not for the dial
    assert result["running_after"] == []
    assert result["events"] == []  # an explicit disconnect reports nothing
    assert result["close_seconds"] < 5


def test_200_devices_connecting_at_once_do_not_abort_the_process(tmp_path: Path) -> None:
    """Without the adapter's gate, 200 concurrent connects abort with `fatal error: concurrent map writes`
    in about 2 of 5 runs on this machine. Three independent processes, started together."""
    runs = run_children([("stress", str(tmp_path / f"run{i}.db"), "200", "20") for i in range(3)])
    for child in runs:
        assert_ok(child)
        assert "concurrent map" not in child.stderr
        result = child.result
        assert result["connect_errors"] == []
        assert result["failed_devices"] == 200  # every one reported its (offline) failure
        assert result["pairings_failed"] == 20
