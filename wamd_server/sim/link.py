"""A client's link to the simulated network, and the device sessions it carries.

Requests are answered directly; events are queued and handed to `on_frame` in order by one short-lived drain
task, so the network never waits on a client and a client never sees its events reordered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from wamd_server.sim.accounts import Frame, LinkedDevice

if TYPE_CHECKING:
    from wamd_server.sim.network import SimNetwork
    from wamd_server.sim.pairing import Pairing

log = logging.getLogger(__name__)

FrameHandler = Callable[[Frame], Awaitable[None]]


class Session:
    """A linked device connected over a link, named by the client's session id (`sid`)."""

    __slots__ = ("device", "link", "sid")

    def __init__(self, link: Link, sid: str, device: LinkedDevice) -> None:
        self.link = link
        self.sid = sid
        self.device = device

    def emit(self, ev: str, **fields: Any) -> None:
        self.link.push({"ev": ev, "sid": self.sid, **fields})

    def push(self, frame: Frame) -> None:
        """Push a frame built for any device, stamped with this session's sid."""
        self.link.push({**frame, "sid": self.sid})


class Link:
    __slots__ = ("_drain_task", "_net", "_on_frame", "_outbox", "closed", "pairings", "sessions")

    def __init__(self, net: SimNetwork, on_frame: FrameHandler) -> None:
        self._net = net
        self._on_frame = on_frame
        self._outbox: deque[Frame] = deque()
        self._drain_task: asyncio.Task[None] | None = None
        self.sessions: dict[str, Session] = {}
        self.pairings: dict[str, Pairing] = {}
        self.closed = False

    async def request(self, frame: Frame) -> Frame:
        """Handle one request frame; returns the reply frame (`{"re", "ok", ...}`)."""
        return await self._net.handle_request(self, frame)

    async def close(self) -> None:
        """Drop every session of this link as disconnected (nobody is logged out) and stop its pairings."""
        if self.closed:
            return
        self._net.detach_link(self)
        self.closed = True
        self._outbox.clear()
        task = self._drain_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self._outbox.append(frame)
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._outbox:
                frame = self._outbox.popleft()
                try:
                    await self._on_frame(frame)
                except Exception:
                    log.exception("link event handler failed on %s", frame.get("ev"))
        finally:
            # No await between the emptiness check and here, so a push cannot slip in unseen.
            self._drain_task = None
