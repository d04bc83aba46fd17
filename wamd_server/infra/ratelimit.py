"""Attempt counters for rate limits: in memory for one process, in Redis when API replicas share it."""

from __future__ import annotations

import time
from collections import deque

from redis.asyncio import Redis


class MemoryRateLimiter:
    """Sliding window per key."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    def _window(self, key: str, window_s: int) -> deque[float]:
        hits = self._hits.setdefault(key, deque())
        cutoff = time.monotonic() - window_s
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return hits

    async def hit(self, key: str, limit: int, window_s: int) -> int:
        hits = self._window(key, window_s)
        hits.append(time.monotonic())
        return self._wait(hits, limit, window_s)

    async def blocked_for(self, key: str, limit: int, window_s: int) -> int:
        return self._wait(self._window(key, window_s), limit, window_s)

    async def reset(self, key: str) -> None:
        self._hits.pop(key, None)

    @staticmethod
    def _wait(hits: deque[float], limit: int, window_s: int) -> int:
        if len(hits) < limit:
            return 0
        oldest_counted = hits[len(hits) - limit]
        return max(1, int(oldest_counted + window_s - time.monotonic()) + 1)


class RedisRateLimiter:
    """Fixed window per key (INCR + EXPIRE): shared by every API process on the same Redis."""

    def __init__(self, redis: Redis, prefix: str = "wamd:rl") -> None:
        self._redis = redis
        self._prefix = prefix

    async def hit(self, key: str, limit: int, window_s: int) -> int:
        name = f"{self._prefix}:{key}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.expire(name, window_s, nx=True)
            count, _ = await pipe.execute()
        return await self._ttl(name) if int(count) >= limit else 0

    async def blocked_for(self, key: str, limit: int, window_s: int) -> int:
        name = f"{self._prefix}:{key}"
        count = await self._redis.get(name)
        return await self._ttl(name) if count is not None and int(count) >= limit else 0

    async def reset(self, key: str) -> None:
        await self._redis.delete(f"{self._prefix}:{key}")

    async def _ttl(self, name: str) -> int:
        return max(1, int(await self._redis.ttl(name)))
