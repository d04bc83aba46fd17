"""The standalone simulator's web app: control API, the link WebSocket and a health check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from wamd_server.sim.accounts import Frame
from wamd_server.sim.control import PREFIX, Handler, control_routes, error_response
from wamd_server.sim.link import Link
from wamd_server.sim.network import SimNetwork

log = logging.getLogger(__name__)

NETWORK_KEY = web.AppKey("sim_network", SimNetwork)
_SOCKETS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sim_link_sockets")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own errors (unknown route, wrong method, ...) with the JSON error envelope."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)


async def _health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _link_socket(request: web.Request) -> web.StreamResponse:
    """One link per WebSocket. Requests run concurrently (a slow send does not hold up the others); one
    writer task sends replies and events in the order they were produced."""
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    request.app[_SOCKETS_KEY].add(ws)
    outgoing: asyncio.Queue[Frame] = asyncio.Queue()

    async def on_frame(frame: Frame) -> None:
        outgoing.put_nowait(frame)

    link = request.app[NETWORK_KEY].open_link(on_frame)
    writer = asyncio.create_task(_write(ws, outgoing))
    handlers: set[asyncio.Task[None]] = set()
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = _parse(msg.data)
            if frame is None:
                outgoing.put_nowait(
                    {"re": None, "ok": False, "error": {"code": "bad_json", "message": "not a JSON object"}}
                )
                continue
            task = asyncio.create_task(_answer(link, frame, outgoing))
            handlers.add(task)
            task.add_done_callback(handlers.discard)
    finally:
        request.app[_SOCKETS_KEY].discard(ws)
        await link.close()
        for task in list(handlers):
            task.cancel()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    return ws


def _parse(data: str) -> Frame | None:
    try:
        frame = json.loads(data)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


async def _answer(link: Link, frame: Frame, outgoing: asyncio.Queue[Frame]) -> None:
    outgoing.put_nowait(await link.request(frame))


async def _write(ws: web.WebSocketResponse, outgoing: asyncio.Queue[Frame]) -> None:
    while True:
        frame = await outgoing.get()
        try:
            await ws.send_str(json.dumps(frame))
        except (ConnectionError, RuntimeError):
            return  # the socket is closing; the reader loop ends the link


async def _close_sockets(app: web.Application) -> None:
    sockets = app[_SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"simulator shutting down")


def create_sim_app(network: SimNetwork) -> web.Application:
    """The `wamd-sim` web app over `network` (the caller owns the network and closes it)."""
    app = web.Application(middlewares=[_json_errors])
    app[NETWORK_KEY] = network
    app[_SOCKETS_KEY] = set()
    app.router.add_get("/api/health", _health)
    app.router.add_get(f"{PREFIX}/link", _link_socket)
    for method, path, handler in control_routes(network):
        app.router.add_route(method, path, handler)
    app.on_shutdown.append(_close_sockets)
    return app
