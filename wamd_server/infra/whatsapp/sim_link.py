"""Links from the simulator client to a simulated network: in-process, or over the `wamd-sim` WebSocket.

A link carries request frames (answered with a reply frame) and pushes event frames, as docs/simulator.md
describes. `LinkDown` means the link is gone; the transport then re-opens it through its factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from wamd_server.sim.network import SimNetwork

log = logging.getLogger(__name__)

Frame = dict[str, Any]
FrameHandler = Callable[[Frame], Awaitable[None]]
LostHandler = Callable[[], None]

LINK_PATH = "/api/sim/link"


class LinkDown(Exception):
    """The link to the simulator is closed or unreachable."""


class ClientLink(Protocol):
    async def request(self, frame: Frame) -> Frame: ...

    async def close(self) -> None: ...


class LinkFactory(Protocol):
    description: str

    async def open(self, on_frame: FrameHandler, on_lost: LostHandler) -> ClientLink:
        """Open a link; events go to `on_frame` in order, `on_lost` is called once if the link drops by
        itself (not after `close`). Raises `LinkDown` when the simulator cannot be reached."""
        ...

    async def aclose(self) -> None: ...


class InProcessLinks:
    """Links straight into a `SimNetwork` in this process (they never drop)."""

    def __init__(self, network: SimNetwork) -> None:
        self._network = network
        self.description = "in-process simulator"

    async def open(self, on_frame: FrameHandler, on_lost: LostHandler) -> ClientLink:
        return self._network.open_link(on_frame)

    async def aclose(self) -> None:
        return None


class RemoteLinks:
    """Links over WebSocket to a standalone `wamd-sim`, sharing one aiohttp `ClientSession`."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0, heartbeat_s: float = 20.0) -> None:
        self._url = base_url.rstrip("/") + LINK_PATH
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_s = heartbeat_s
        self._session: aiohttp.ClientSession | None = None
        self.description = f"simulator at {base_url}"

    async def open(self, on_frame: FrameHandler, on_lost: LostHandler) -> ClientLink:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._connect_timeout_s):  # a hung simulator must not hang us
                ws = await self._session.ws_connect(
                    self._url,
                    heartbeat=self._heartbeat_s,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    max_msg_size=16 * 1024 * 1024,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise LinkDown(f"cannot reach the simulator at {self._url}: {exc}") from exc
        link = RemoteLink(ws, on_frame, on_lost)
        link.start()
        return link

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class RemoteLink:
    """One WebSocket: requests are matched to replies by `req`; a reader task hands events on in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        self._ws = ws
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def request(self, frame: Frame) -> Frame:
        if self._closing or self._ws.closed:
            raise LinkDown("the simulator link is closed")
        req = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            try:
                await self._ws.send_str(json.dumps({**frame, "req": req}))
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise LinkDown(f"the simulator link failed: {exc}") from exc
            return await future
        finally:
            self._pending.pop(req, None)

    async def close(self) -> None:
        self._closing = True
        await self._ws.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._dispatch(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.info("simulator link read failed: %s", exc)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkDown("the simulator link was lost"))
            if not self._closing:
                self._closing = True
                self._on_lost()

    async def _dispatch(self, data: str) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            log.warning("simulator sent a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        if "re" in frame:
            future = self._pending.get(frame["re"]) if isinstance(frame["re"], int) else None
            if future is not None and not future.done():
                future.set_result(frame)
            elif frame.get("ok") is False:
                log.warning("simulator error without a request: %s", frame.get("error"))
            return
        try:
            await self._on_frame(frame)
        except Exception:
            log.exception("simulator event handler failed")
