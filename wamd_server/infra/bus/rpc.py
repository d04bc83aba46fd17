"""Device commands between processes over Redis: an API process asks the worker that owns a device.

Requests go to the worker's channel, answers to the asking process's channel; both carry a request id. A
worker's domain errors travel as `{code, message, details}` and are raised again on the asking side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from wamd_server.domain import errors

log = logging.getLogger(__name__)

Executor = Callable[[str, UUID, dict[str, Any]], Awaitable[Any]]


def _error_class(code: str) -> type[errors.DomainError]:
    # Subclasses are looked up by their stable code, so a worker's error keeps its HTTP status at the API.
    stack: list[type[errors.DomainError]] = [errors.DomainError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return errors.DomainError


def rebuild_error(payload: dict[str, Any]) -> errors.DomainError:
    code = str(payload.get("code", "error"))
    message = str(payload.get("message", "the worker failed"))
    cls = _error_class(code)
    exc = errors.DomainError.__new__(cls)
    errors.DomainError.__init__(exc, message, payload.get("details"))
    if isinstance(exc, errors.TransportError):
        exc.retryable = bool(payload.get("retryable", True))
    if isinstance(exc, errors.RateLimited):
        exc.retry_after_s = int((payload.get("details") or {}).get("retry_after_s", 1))
    if cls is errors.DomainError:
        exc.code = code
    return exc


class _Listener:
    """One pub/sub subscription with a reconnecting reader task."""

    def __init__(self, redis: Redis, channel: str, handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._redis = redis
        self._channel = channel
        self._handle = handle
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"rpc-listen-{self._channel}")
        await self.ready.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.ready.set()
                    delay = 0.5
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            payload = json.loads(message["data"])
                        except ValueError:
                            log.warning("dropping a malformed message on %s", self._channel)
                            continue
                        await self._handle(payload)
            except (RedisError, OSError) as exc:
                log.warning("rpc channel %s lost (%s); retrying in %.1fs", self._channel, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


class RedisWorkerCommands:
    """The asking side (`WorkerCommands` port)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._node = uuid.uuid4().hex[:12]
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener = _Listener(redis, f"{prefix}:reply:{self._node}", self._answer)

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()

    async def call(self, worker_id: str, op: str, device_id: UUID, args: dict[str, Any], timeout_s: float) -> Any:
        rid = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        request = {
            "rid": rid,
            "reply_to": f"{self._prefix}:reply:{self._node}",
            "op": op,
            "device_id": str(device_id),
            "args": args,
        }
        try:
            receivers = await self._redis.publish(f"{self._prefix}:cmd:{worker_id}", json.dumps(request))
            if not receivers:
                raise errors.Unavailable(
                    f"the worker running this device ({worker_id}) is not answering; "
                    "another worker takes the device over within seconds"
                )
            try:
                answer = await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                raise errors.Unavailable(f"worker {worker_id} did not answer within {timeout_s:.0f}s") from None
        finally:
            self._pending.pop(rid, None)
        if answer.get("ok"):
            return answer.get("result")
        raise rebuild_error(answer.get("error") or {})

    async def _answer(self, payload: dict[str, Any]) -> None:
        future = self._pending.get(str(payload.get("rid")))
        if future is not None and not future.done():
            future.set_result(payload)


class RedisCommandServer:
    """The worker side: runs commands addressed to one worker and answers them."""

    def __init__(self, redis: Redis, prefix: str, worker_id: str, execute: Executor) -> None:
        self._redis = redis
        self._execute = execute
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener = _Listener(redis, f"{prefix}:cmd:{worker_id}", self._request)

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _request(self, payload: dict[str, Any]) -> None:
        # Each command runs on its own: a slow refresh must not hold up a logout of another device.
        task = asyncio.create_task(self._run(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, payload: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"rid": payload.get("rid")}
        try:
            result = await self._execute(str(payload["op"]), UUID(str(payload["device_id"])), payload.get("args") or {})
            answer.update(ok=True, result=result)
        except errors.DomainError as exc:
            error = {"code": exc.code, "message": exc.message, "details": exc.details}
            if isinstance(exc, errors.TransportError):
                error["retryable"] = exc.retryable
            answer.update(ok=False, error=error)
        except (KeyError, ValueError) as exc:
            answer.update(ok=False, error={"code": "invalid_input", "message": f"malformed command: {exc}"})
        except Exception:
            log.exception("device command %s failed", payload.get("op"))
            answer.update(ok=False, error={"code": "internal_error", "message": "the worker failed; see its log"})
        reply_to = payload.get("reply_to")
        if isinstance(reply_to, str):
            with contextlib.suppress(RedisError):
                await self._redis.publish(reply_to, json.dumps(answer, default=str))
