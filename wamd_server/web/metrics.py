"""Prometheus metrics at `GET /metrics` (one registry per application, so tests can run several)."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from wamd_server.domain.models import DeviceStatus
from wamd_server.web.context import CTX
from wamd_server.web.errors import Handler
from wamd_server.web.hub import HUB


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "wamd_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "wamd_http_request_seconds", "HTTP request duration", ["route"], registry=self.registry
        )
        self.ws_connections = Gauge("wamd_ws_connections", "Open WebSocket connections", registry=self.registry)
        self.devices = Gauge("wamd_devices", "Devices by status", ["status"], registry=self.registry)
        self.plugin_failures = Gauge(
            "wamd_plugin_failures", "Plugin hook calls that raised", ["plugin"], registry=self.registry
        )


METRICS = web.AppKey("wamd_metrics", ApiMetrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        # The route's pattern, not the raw path, keeps label cardinality bounded.
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        metrics = request.app[METRICS]
        metrics.requests.labels(request.method, route, str(status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    ctx = request.app[CTX]
    counts = await ctx.device_counts()
    for status in DeviceStatus:
        metrics.devices.labels(status.value).set(counts.get(status.value, 0))
    for plugin, failures in ctx.plugins.failures.items():
        metrics.plugin_failures.labels(plugin).set(failures)
    metrics.ws_connections.set(len(request.app[HUB].connections))
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
