"""Per-device ordering of transport events, shared by the transports.

A device's events reach the sink in the order they happened, each after its pre-action (storing credentials,
cleaning up an ended session). One short-lived task drains a device's line while it has events: no task sits
waiting per device. A transport may hand an event to the sink itself while the line is `idle`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from uuid import UUID

from wamd_server.domain.events import TransportEvent

log = logging.getLogger(__name__)

PreAction = Callable[[], Awaitable[None]]
Sink = Callable[[TransportEvent], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[Any]"]


class EventLine:
    __slots__ = ("_items", "_task")

    def __init__(self) -> None:
        self._items: deque[tuple[PreAction | None, TransportEvent | None]] | None = None
        self._task: asyncio.Task[Any] | None = None

    def push(
        self,
        device_id: UUID,
        pre: PreAction | None,
        event: TransportEvent | None,
        sink: Callable[[], Sink | None],
        spawn: Spawn,
    ) -> None:
        """Queue `pre` then `event`; `sink()` is asked for the sink when the event's turn comes."""
        if self._items is None:
            self._items = deque()
        self._items.append((pre, event))
        if self._task is None:
            self._task = spawn(self._drain(device_id, sink))

    @property
    def idle(self) -> bool:
        """Nothing of this device waits to be delivered: an event may go to the sink directly, in order."""
        return self._task is None

    def clear(self) -> None:
        """Drop what waits and stop draining (the transport is closing)."""
        self._items = None
        if self._task is not None:
            self._task.cancel()

    async def _drain(self, device_id: UUID, sink: Callable[[], Sink | None]) -> None:
        try:
            while self._items:
                pre, event = self._items.popleft()
                if pre is not None:
                    try:
                        await pre()
                    except Exception:
                        log.exception("device %s: preparing an event failed", device_id)
                deliver = sink()
                if event is not None and deliver is not None:
                    try:
                        await deliver(event)
                    except Exception:
                        log.exception("event sink failed on %s", type(event).__name__)
        finally:
            self._task = None  # no await since the emptiness check: nothing queued is left behind
            self._items = None
