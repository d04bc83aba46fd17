"""The send queue per device: what waits, what went out in the last hour, why a queue is paused."""

from __future__ import annotations

from aiohttp import web

from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import dto
from wamd_server.protocol.events import OUTBOX_QUEUED
from wamd_server.web.context import CTX
from wamd_server.web.inputs import path_id, user_of
from wamd_server.web.routing import RouteTable

routes = RouteTable()


@routes.get(
    "/api/queue",
    summary="Send queue per device (queued, sending, sent last hour, next send, pause)",
    tag="queue",
    response=dto.QueueOut,
)
async def queue(request: web.Request) -> web.Response:
    rows = await request.app[CTX].queue.overview(user_of(request))
    return web.json_response(dto.QueueOut.model_validate({"items": rows}).model_dump(mode="json"))


@routes.post("/api/queue/{id}/pause", summary="Pause a device's send queue", tag="queue", response=dto.Ok)
async def pause(request: web.Request) -> web.Response:
    device_id = path_id(request)
    await request.app[CTX].queue.pause(user_of(request), device_id)
    # Wakes the device's lane: a paced message waiting out its gap goes back to the queue instead of out.
    await request.app[CTX].bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": [str(device_id)]}))
    return web.json_response({"ok": True})


@routes.post("/api/queue/{id}/resume", summary="Resume a device's paused send queue", tag="queue", response=dto.Ok)
async def resume(request: web.Request) -> web.Response:
    device_id = path_id(request)
    await request.app[CTX].queue.resume(user_of(request), device_id)
    await request.app[CTX].bus.publish(BusEvent(OUTBOX_QUEUED, {"device_ids": [str(device_id)]}))
    return web.json_response({"ok": True})
