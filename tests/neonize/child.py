"""Scenarios that drive neonize's Go library, each run in its own process by the tests.

    python -m tests.neonize.child <scenario> <store> [args...]

Each prints one line `RESULT {json}` and exits 0; a Go fatal error shows up as another exit code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID, uuid4

from tests.neonize.helpers import (
    RESULT_PREFIX,
    WHATSMEOW_TABLES,
    count_rows,
    insert_contact,
    insert_devices,
    is_postgres,
    sqlite_journal_mode,
    table_names,
)
from wamd_server.domain.errors import NotConnected, SessionMissing, TransportError
from wamd_server.domain.events import ConnectFailure, TransportEvent
from wamd_server.domain.models import OutboundMessage
from wamd_server.infra.whatsapp.neonize import NeonizeTransport

E = TypeVar("E", bound=TransportEvent)
WAIT_S = 60.0


class Recorder:
    """The transport's event sink; lets a scenario wait for events without sleeping."""

    def __init__(self) -> None:
        self.items: list[TransportEvent] = []
        self._changed = asyncio.Condition()

    async def __call__(self, event: TransportEvent) -> None:
        async with self._changed:
            self.items.append(event)
            self._changed.notify_all()

    def of(self, kind: type[E], device_id: UUID | None = None) -> list[E]:
        return [e for e in self.items if isinstance(e, kind) and (device_id is None or e.device_id == device_id)]

    async def wait_count(self, kind: type[E], count: int, device_id: UUID | None = None) -> list[E]:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: len(self.of(kind, device_id)) >= count)
        return self.of(kind, device_id)


async def open_store(transport: NeonizeTransport) -> str:
    """Make whatsmeow create its tables: a pairing attempt opens (and migrates) the store, then fails offline."""
    try:
        await transport.pair_qr(uuid4())
    except TransportError as exc:
        return exc.message
    return "paired?!"


async def expect(error: type[Exception], call: Callable[[], Awaitable[Any]]) -> str:
    try:
        await call()
    except error as exc:
        return type(exc).__name__
    except Exception as exc:
        return f"unexpected {type(exc).__name__}: {exc}"
    return "no error"


async def tables(store: str) -> dict[str, Any]:
    jid = "15550000001:3@s.whatsapp.net"
    events = Recorder()
    transport = NeonizeTransport(store)
    await transport.start(events)
    has_before = await transport.has_session(jid)
    pair_error = await open_store(transport)
    found = sorted(table_names(store) & WHATSMEOW_TABLES)
    insert_devices(store, [jid])
    insert_contact(store, jid, "15550000002@s.whatsapp.net")
    has_after_insert = await transport.has_session(jid)
    await transport.forget(jid)
    result = {
        "has_before": has_before,
        "pair_error": pair_error,
        "tables": found,
        "has_after_insert": has_after_insert,
        "has_after_forget": await transport.has_session(jid),
        "contacts_after_forget": count_rows(store, "whatsmeow_contacts", "our_jid", jid),
        "journal_mode": None if is_postgres(store) else sqlite_journal_mode(store),
    }
    await transport.close()
    return result


async def offline(store: str) -> dict[str, Any]:
    jid = "15550000011:2@s.whatsapp.net"
    device, other = uuid4(), uuid4()
    events = Recorder()
    transport = NeonizeTransport(store)
    await transport.start(events)
    await open_store(transport)
    insert_devices(store, [jid])
    started = time.monotonic()
    await transport.connect(device, jid)
    failure = (await events.wait_count(ConnectFailure, 1, device))[0]
    seconds = time.monotonic() - started
    await transport.connect(device, jid)  # a retry reuses the same client object
    await events.wait_count(ConnectFailure, 2, device)
    message = OutboundMessage(wa_id="3EB0TEST", to="15550000099", text="hi")
    result = {
        "reason": failure.reason,
        "seconds": seconds,
        "send": await expect(NotConnected, lambda: transport.send(device, message)),
        "mark_read": await expect(NotConnected, lambda: transport.mark_read(device, "1@s.whatsapp.net", "", ["X"])),
        "typing": await expect(NotConnected, lambda: transport.set_typing(device, "1@s.whatsapp.net", True)),
        "pair_code": await expect(TransportError, lambda: transport.pair_code(other, "15550000012")),
        "has_session": await transport.has_session(jid),
    }
    # Unlinking needs WhatsApp: the credentials go anyway, then the error is raised (and nothing reported).
    result["logout"] = await expect(TransportError, lambda: transport.logout(device, jid))
    result["has_session_after_logout"] = await transport.has_session(jid)
    result["other_events"] = sorted({type(e).__name__ for e in events.items} - {"ConnectFailure"})
    result["connect_failures"] = len(events.of(ConnectFailure, device))
    await transport.close()
    return result


async def unknown(store: str) -> dict[str, Any]:
    jid = "15559999999:7@s.whatsapp.net"
    device = uuid4()
    events = Recorder()
    transport = NeonizeTransport(store)
    await transport.start(events)
    before_tables = await expect(SessionMissing, lambda: transport.connect(device, jid))
    await open_store(transport)
    after_tables = await expect(SessionMissing, lambda: transport.connect(device, jid))
    result = {
        "before_tables": before_tables,
        "after_tables": after_tables,
        "logout": await expect(Exception, lambda: transport.logout(device, jid)),
        "running": [str(d) for d in transport.running_devices()],
    }
    await transport.close()
    return result


async def stress(store: str, devices: int, pairings: int) -> dict[str, Any]:
    """`devices` stored sessions and `pairings` new pairings, all started at once."""
    events = Recorder()
    transport = NeonizeTransport(store)
    await transport.start(events)
    await open_store(transport)
    sessions = {uuid4(): f"1555{i:07d}:2@s.whatsapp.net" for i in range(devices)}
    insert_devices(store, sessions.values())

    async def pair(device_id: UUID) -> str:
        try:
            await transport.pair_qr(device_id)
        except TransportError:
            return "failed"
        return "started"

    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(transport.connect(d, jid) for d, jid in sessions.items()),
        *(pair(uuid4()) for _ in range(pairings)),
        return_exceptions=True,
    )
    failures = await events.wait_count(ConnectFailure, devices)
    seconds = time.monotonic() - started
    await transport.close()
    return {
        "connect_errors": [repr(o) for o in outcomes[:devices] if o is not None],
        "pairings_failed": sum(1 for o in outcomes[devices:] if o == "failed"),
        "failed_devices": len({f.device_id for f in failures} & set(sessions)),
        "seconds": round(seconds, 2),
        "threads": transport.executor_threads,
    }


async def hung(store: str) -> dict[str, Any]:
    """Every dial goes through a proxy that accepts and never answers (whatsmeow waits 60 s for it): pairing,
    disconnect and close must not wait that long, and the process must exit normally."""
    # Never accepted: the kernel completes the TCP handshake into the backlog, and nothing ever answers.
    proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(16)
    port = proxy.getsockname()[1]
    jid = "15550000021:4@s.whatsapp.net"
    device = uuid4()
    events = Recorder()
    transport = NeonizeTransport(
        store, proxy=f"socks5://127.0.0.1:{port}", first_qr_timeout_s=1.0, stop_wait_s=0.5, close_timeout_s=1.0
    )
    await transport.start(events)
    started = time.monotonic()
    pair_error = await open_store(transport)
    pair_seconds = time.monotonic() - started
    insert_devices(store, [jid])
    await transport.connect(device, jid)
    connecting = [str(d) for d in transport.running_devices()]
    started = time.monotonic()
    await transport.disconnect(device)
    disconnect_seconds = time.monotonic() - started
    result = {
        "pair_error": pair_error,
        "pair_seconds": pair_seconds,
        "connecting": connecting == [str(device)],
        "disconnect_seconds": disconnect_seconds,
        "running_after": [str(d) for d in transport.running_devices()],
        "events": [type(e).__name__ for e in events.items],
    }
    started = time.monotonic()
    await transport.close()
    result["close_seconds"] = time.monotonic() - started
    return result  # the proxy stays open: the Go dials are still waiting when the process exits


SCENARIOS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "tables": tables,
    "offline": offline,
    "unknown": unknown,
    "stress": stress,
    "hung": hung,
}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    scenario, store, *extra = sys.argv[1:]
    args: list[Any] = [int(a) for a in extra]
    result = asyncio.run(SCENARIOS[scenario](store, *args))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
