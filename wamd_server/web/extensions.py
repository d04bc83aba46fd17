"""Endpoints that come from outside the core: plugins' routes and the in-process simulator's control API."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from wamd_server.plugin_api.types import WebRoute
from wamd_server.web.routing import Endpoint

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
SimRoute = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def plugin_endpoints(routes: Sequence[object]) -> list[Endpoint]:
    endpoints = []
    for route in routes:
        if not isinstance(route, WebRoute):
            log.warning("ignoring a plugin route that is not a WebRoute: %r", route)
            continue
        method = route.method.upper()
        if method not in METHODS or not route.path.startswith("/api/"):
            log.warning(
                "ignoring plugin route %s %s: needs a method in %s and a path under /api/",
                route.method,
                route.path,
                sorted(METHODS),
            )
            continue
        endpoints.append(
            Endpoint(
                method=method,
                path=route.path,
                handler=_named(route.handler, route.path),
                summary=route.summary or route.path,
                tag=route.tag,
                auth=route.auth,
            )
        )
    return endpoints


def _named(handler: Callable[..., Awaitable[Any]], path: str) -> Callable[[web.Request], Awaitable[Any]]:
    """The handler itself, or a named wrapper for one without `__name__` (a `functools.partial`, a callable
    object): the OpenAPI operation id is built from the handler's name."""
    if getattr(handler, "__name__", None):
        return handler

    async def plugin_route(request: web.Request) -> Any:
        return await handler(request)

    plugin_route.__name__ = "plugin_" + (re.sub(r"\W+", "_", path).strip("_") or "route")
    return plugin_route


SIM_SUMMARIES = {
    "/api/sim/scan": "Simulator: a phone scans a QR code",
    "/api/sim/pair-code": "Simulator: a phone enters a pairing code",
    "/api/sim/send": "Simulator: a contact writes to an account",
    "/api/sim/inbox/{phone}": "Simulator: what a phone received",
    "/api/sim/inbox-counts": "Simulator: how many distinct messages each phone received",
    "/api/sim/unlink": "Simulator: unlink devices from the phone",
    "/api/sim/faults": "Simulator: inject faults (disconnect, ban, failures, latency, not on WhatsApp)",
    "/api/sim/read": "Simulator: a phone reads what a contact sent (read receipts)",
    "/api/sim/reset": "Simulator: forget everything",
    "/api/sim/stats": "Simulator: connections, double connections, deliveries",
    "/api/sim/qr/{sid}": "Simulator: the current QR code of a pairing session",
}


def sim_control_endpoints(routes: Sequence[SimRoute]) -> list[Endpoint]:
    """The simulator's control API, for admins only (it can link phones and inject faults)."""
    return [
        Endpoint(
            method=method,
            path=path,
            handler=handler,
            tag="simulator",
            auth="admin",
            summary=SIM_SUMMARIES.get(path, "Simulated WhatsApp network control"),
        )
        for method, path, handler in routes
    ]
