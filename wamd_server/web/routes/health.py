"""Liveness and readiness: `GET /api/health`."""

from __future__ import annotations

from aiohttp import web

from wamd_server.protocol import dto
from wamd_server.web.context import CTX
from wamd_server.web.routing import RouteTable

routes = RouteTable()


@routes.get("/api/health", summary="Server health", tag="system", auth="public", response=dto.Health)
async def health(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    db_ok = await ctx.db_ok()
    bus_ok = await ctx.bus.ping()
    body = dto.Health(
        status="ok" if db_ok and bus_ok else "degraded",
        db="ok" if db_ok else "error",
        bus=ctx.bus.kind if bus_ok else "error",
        version=ctx.version,
        transport=ctx.transport_name,
    )
    return web.json_response(body.model_dump(mode="json"), status=200 if body.status == "ok" else 503)
