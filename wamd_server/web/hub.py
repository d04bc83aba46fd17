"""The WebSocket hub: fans bus events out to this API process's connections, each filtered to what its user
may see, each with a bounded send queue (a client that cannot keep up is disconnected)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from aiohttp import web

from wamd_server.domain.models import User
from wamd_server.domain.ports import BusEvent, UserRepository
from wamd_server.protocol import ws as proto
from wamd_server.protocol.events import ACCESS_CHANGED

log = logging.getLogger(__name__)

SEND_QUEUE = 512
OVERFLOW_CLOSE_CODE = 4008
# How long a closing connection may take to flush and answer the close frame. A client that does not read
# at all would otherwise hold its connection (and whoever awaits the close) forever: aiohttp stops the
# heartbeat once a close starts, and the close waits for the full send buffer to drain.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Subscription:
    event_types: frozenset[str] | None
    device_id: UUID | None

    def matches(self, event: BusEvent) -> bool:
        if self.event_types is not None and event.type not in self.event_types:
            return False
        return self.device_id is None or event.device_id == self.device_id


class Connection:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        user: User,
        granted: set[UUID] | None,
        transport: asyncio.Transport | None = None,
        token: str = "",
    ) -> None:
        self.ws = ws
        self.user = user
        self.token = token  # kept to re-check the session when the user's access changes
        self.granted = granted  # None: sees every device (admin)
        self.subscriptions: dict[int, Subscription] = {}
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SEND_QUEUE)
        self.overflowed = False
        self.closing: asyncio.Task[None] | None = None
        self._transport = transport

    def may_see(self, event: BusEvent) -> bool:
        if event.device_id is not None:
            return self.granted is None or event.device_id in self.granted
        if event.user_id is not None:
            return event.user_id == self.user.id
        return self.user.is_admin

    def offer(self, event: BusEvent) -> None:
        if self.overflowed or not self.subscriptions or not self.may_see(event):
            return
        payload = {"type": event.type, **event.data}
        for sub_id, sub in self.subscriptions.items():
            if sub.matches(event):
                self.send(proto.event(sub_id, payload))

    def send(self, message: dict[str, Any]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("websocket of %s cannot keep up; disconnecting it", self.user.email)
            self.disconnect(OVERFLOW_CLOSE_CODE, b"send queue overflow")

    def disconnect(self, code: int, reason: bytes) -> None:
        """Close in the background, so the caller (the hub, hence the bus) never waits on this client."""
        if self.closing is None:
            self.closing = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: bytes) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason)
        except TimeoutError:
            log.warning("websocket of %s did not take its close frame; dropping the connection", self.user.email)
            if self._transport is not None:
                self._transport.abort()


class Hub:
    """Fans bus events out to the WebSocket connections of this API process."""

    def __init__(self, users: UserRepository, session_valid: Callable[[str], Awaitable[bool]]) -> None:
        self._users = users
        self._session_valid = session_valid
        self.connections: set[Connection] = set()

    async def dispatch(self, event: BusEvent) -> None:
        if event.type == ACCESS_CHANGED:
            await self._reload_access(UUID(event.data["user_id"]))
            return
        if event.type.startswith("_"):  # internal coordination between processes, never for clients
            return
        for conn in tuple(self.connections):
            conn.offer(event)

    async def _reload_access(self, user_id: UUID) -> None:
        affected = [c for c in self.connections if c.user.id == user_id]
        if not affected:
            return
        user = await self._users.get(user_id)
        granted = None
        if user is not None and not user.is_admin:
            granted = await self._users.granted_device_ids(user_id)
        for conn in affected:
            if user is None or not user.is_active:
                conn.disconnect(4001, b"account removed or deactivated")
                continue
            if not await self._session_valid(conn.token):
                conn.disconnect(4001, b"session ended")
                continue
            conn.user, conn.granted = user, granted

    async def close_all(self) -> None:
        closing = []
        for conn in tuple(self.connections):
            conn.disconnect(1001, b"server shutting down")
            if conn.closing is not None:
                closing.append(conn.closing)
        await asyncio.gather(*closing, return_exceptions=True)


HUB = web.AppKey("wamd_ws_hub", Hub)
