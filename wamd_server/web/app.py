"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from wamd_server.domain.errors import Unauthorized
from wamd_server.web import metrics
from wamd_server.web.context import CTX, ApiContext
from wamd_server.web.errors import error_middleware
from wamd_server.web.hub import HUB, Hub
from wamd_server.web.openapi import build_spec
from wamd_server.web.routes import auth, campaigns, chats, devices, health, leads, media, queue, templates, users
from wamd_server.web.routing import Endpoint, RouteTable, install
from wamd_server.web.ws import routes as ws_routes

CORE_TABLES: tuple[RouteTable, ...] = (
    health.routes,
    auth.routes,
    users.routes,
    devices.routes,
    chats.routes,
    leads.routes,
    templates.routes,
    media.routes,
    campaigns.routes,
    queue.routes,
    ws_routes,
)
OPENAPI = web.AppKey("wamd_openapi", dict)


def create_app(ctx: ApiContext, extra: Sequence[Endpoint] = ()) -> web.Application:
    """Build the API. `extra` holds endpoints from plugins and the in-process simulator's control API."""
    app = web.Application(
        client_max_size=ctx.config.max_body_bytes,
        middlewares=[metrics.metrics_middleware, error_middleware],
    )
    app[CTX] = ctx
    app[metrics.METRICS] = metrics.ApiMetrics()

    async def session_valid(token: str) -> bool:
        try:
            await ctx.auth.user_for_token(token)
        except Unauthorized:
            return False
        return True

    hub = Hub(ctx.user_repo, session_valid)
    app[HUB] = hub

    endpoints = [ep for table in CORE_TABLES for ep in table.endpoints]
    taken = {(ep.method, ep.path) for ep in endpoints}
    for ep in extra:
        if (ep.method, ep.path) in taken:
            raise ValueError(f"route {ep.method} {ep.path} is already taken")
        taken.add((ep.method, ep.path))
        endpoints.append(ep)

    openapi = RouteTable()

    @openapi.get("/api/openapi.json", summary="This API's OpenAPI description", tag="system", auth="public")
    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(request.app[OPENAPI])

    @openapi.get("/metrics", summary="Prometheus metrics", tag="system", auth="public", content_type="text/plain")
    async def prometheus(request: web.Request) -> web.Response:
        return await metrics.metrics_endpoint(request)

    endpoints += openapi.endpoints
    install(app, endpoints)
    app[OPENAPI] = build_spec(endpoints, ctx.version)

    unsubscribe = []

    async def start_hub(_app: web.Application) -> None:
        unsubscribe.append(ctx.bus.subscribe(hub.dispatch))

    async def stop_hub(_app: web.Application) -> None:
        await hub.close_all()
        while unsubscribe:
            unsubscribe.pop()()

    app.on_startup.append(start_hub)
    app.on_shutdown.append(stop_hub)
    return app
