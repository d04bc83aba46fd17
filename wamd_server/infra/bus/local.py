"""In-process event bus for the embedded server."""

from __future__ import annotations

import logging
from collections.abc import Callable

from wamd_server.domain.ports import BusEvent, BusHandler

log = logging.getLogger(__name__)


class HandlerSet:
    """Handlers called in turn; one that raises is logged and does not stop the others."""

    def __init__(self) -> None:
        self._handlers: list[BusHandler] = []

    def add(self, handler: BusHandler) -> Callable[[], None]:
        self._handlers.append(handler)

        def remove() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return remove

    async def dispatch(self, event: BusEvent) -> None:
        for handler in tuple(self._handlers):
            try:
                await handler(event)
            except Exception:
                log.exception("event handler failed for %s", event.type)


class LocalEventBus:
    kind = "local"

    def __init__(self) -> None:
        self._handlers = HandlerSet()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, event: BusEvent) -> None:
        await self._handlers.dispatch(event)

    def subscribe(self, handler: BusHandler) -> Callable[[], None]:
        return self._handlers.add(handler)

    async def ping(self) -> bool:
        return True
