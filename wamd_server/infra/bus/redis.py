"""Event bus over Redis pub/sub: every API process on the same Redis sees every event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from wamd_server.domain.ports import BusEvent, BusHandler
from wamd_server.infra.bus.codec import decode, encode
from wamd_server.infra.bus.local import HandlerSet

log = logging.getLogger(__name__)


class RedisEventBus:
    kind = "redis"

    def __init__(self, redis: Redis, *, channel_prefix: str = "wamd") -> None:
        self._redis = redis
        self.channel = f"{channel_prefix}:events"
        self._handlers = HandlerSet()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        await self._redis.ping()  # fail at start, with a clear error, if Redis is unreachable
        self._listener = asyncio.create_task(self._listen(), name="redis-bus-listener")
        await self._subscribed.wait()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def publish(self, event: BusEvent) -> None:
        # Delivered back to this process too, through the listener: one path for local and remote events.
        await self._redis.publish(self.channel, encode(event))

    def subscribe(self, handler: BusHandler) -> Callable[[], None]:
        return self._handlers.add(handler)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._subscribed.set()
                    delay = 0.5
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            event = decode(message["data"])
                        except (ValueError, KeyError):
                            log.warning("dropping malformed bus message on %s", self.channel)
                            continue
                        await self._handlers.dispatch(event)
            except (RedisError, OSError) as exc:
                log.warning("redis bus connection lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
