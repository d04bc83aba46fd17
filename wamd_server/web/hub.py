"""The WebSocket hub: fans bus events out to this API process's connections, each filtered to what its user
may see, each with a bounded send queue (a client that cannot keep up is disconnected)."""

from __future__ import annotations

import asyncio
import logging
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


@dataclass(frozen=True)
class Subscription:
    event_types: frozenset[str] | None
    device_id: UUID | None

    def matches(self, event: BusEvent) -> bool:
        if self.event_types is not None and event.type not in self.event_types:
            return False
        return self.device_id is None or event.device_id == self.device_id


class Connection:
    def __init__(self, ws: web.WebSocketResponse, user: User, granted: set[UUID] | None) -> None:
        self.ws = ws
        self.user = user
        self.granted = granted  # None: sees every device (admin)
        self.subscriptions: dict[int, Subscription] = {}
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SEND_QUEUE)
        self.overflowed = False

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
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("websocket of %s cannot keep up; disconnecting it", self.user.email)
            asyncio.get_running_loop().create_task(
                self.ws.close(code=OVERFLOW_CLOSE_CODE, message=b"send queue overflow")
            )


class Hub:
    """Fans bus events out to the WebSocket connections of this API process."""

    def __init__(self, users: UserRepository) -> None:
        self._users = users
        self.connections: set[Connection] = set()

    async def dispatch(self, event: BusEvent) -> None:
        if event.type == ACCESS_CHANGED:
            await self._reload_access(UUID(event.data["user_id"]))
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
                await conn.ws.close(code=4001, message=b"account removed or deactivated")
                continue
            conn.user, conn.granted = user, granted

    async def close_all(self) -> None:
        for conn in tuple(self.connections):
            await conn.ws.close(code=1001, message=b"server shutting down")


HUB = web.AppKey("wamd_ws_hub", Hub)
