"""Helpers for the simulator tests: a dict session store, recorders to wait on, short timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid4

from wamd_server.domain.events import TransportEvent
from wamd_server.infra.whatsapp.sim import SimTransport
from wamd_server.sim.config import SimConfig

T = TypeVar("T")
WAIT_S = 5.0


class DictSessionStore:
    """The `SessionStore` port over a dict (a database-backed store replaces it later)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, str]] = {}

    async def get(self, jid: str) -> str | None:
        entry = self.data.get(jid)
        return entry[1] if entry else None

    async def put(self, jid: str, transport: str, secret: str) -> None:
        self.data[jid] = (transport, secret)

    async def delete(self, jid: str) -> None:
        self.data.pop(jid, None)


class Recorder(Generic[T]):
    """Collects what an async callback receives, and lets a test wait for a matching item."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = asyncio.Event()

    async def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, match: Callable[[T], bool], *, after: int = 0, timeout: float = WAIT_S) -> T:
        """The first item at index >= `after` that matches, waiting for it if need be."""
        index = after
        async with asyncio.timeout(timeout):
            while True:
                while index < len(self.items):
                    if match(self.items[index]):
                        return self.items[index]
                    index += 1
                self._changed.clear()
                await self._changed.wait()

    def mark(self) -> int:
        return len(self.items)


class FrameRecorder(Recorder[dict[str, Any]]):
    async def event(self, ev: str, sid: str | None = None, *, after: int = 0, **fields: Any) -> dict[str, Any]:
        def match(frame: dict[str, Any]) -> bool:
            return (
                frame.get("ev") == ev
                and (sid is None or frame.get("sid") == sid)
                and all(frame.get(k) == v for k, v in fields.items())
            )

        return await self.wait_for(match, after=after)

    def events(self, ev: str, sid: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.items if f.get("ev") == ev and (sid is None or f.get("sid") == sid)]


E = TypeVar("E", bound=TransportEvent)


class EventRecorder(Recorder[TransportEvent]):
    async def event(
        self,
        kind: type[E],
        device_id: UUID | None = None,
        *,
        after: int = 0,
        timeout: float = WAIT_S,
        **fields: Any,
    ) -> E:
        def match(event: TransportEvent) -> bool:
            return (
                isinstance(event, kind)
                and (device_id is None or event.device_id == device_id)
                and all(getattr(event, k) == v for k, v in fields.items())
            )

        found = await self.wait_for(match, after=after, timeout=timeout)
        assert isinstance(found, kind)
        return found

    def of(self, kind: type[E], device_id: UUID | None = None) -> list[E]:
        return [e for e in self.items if isinstance(e, kind) and (device_id is None or e.device_id == device_id)]


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll a condition that no event announces (e.g. the server noticing a closed socket)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def fast_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"qr_first_s": 0.3, "qr_next_s": 0.2, "qr_codes": 3, "receipt_delay_s": 0.01}
    values.update(overrides)
    return SimConfig(**values)


TRANSPORT_OPTIONS: dict[str, Any] = {
    "reconnect_delay_s": 0.05,
    "max_reconnect_delay_s": 0.5,
    "request_timeout_s": 5.0,
}


class TransportHarness:
    """A started transport with its event recorder, store and one fresh device id."""

    def __init__(self, transport: SimTransport, events: EventRecorder, store: DictSessionStore) -> None:
        self.transport = transport
        self.events = events
        self.store = store
        self.device_id = uuid4()
