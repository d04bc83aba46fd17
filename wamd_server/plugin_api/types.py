"""Values plugins hand to the core. Plain dataclasses, so the plugin contract pulls in no framework."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Auth = Literal["public", "user", "admin"]


@dataclass(frozen=True)
class WebRoute:
    """An HTTP route a plugin adds. `handler` is an aiohttp handler (`async def h(request) -> Response`).

    `path` must start with `/api/`; the core adds authentication per `auth` (the caller's
    :class:`~wamd_server.domain.models.User` is then at ``request[wamd_server.web.routing.USER]``), JSON error
    envelopes, and lists the route in `/api/openapi.json`.
    """

    method: str
    path: str
    handler: Callable[..., Awaitable[Any]]
    auth: Auth = "user"
    summary: str = ""
    tag: str = "plugins"


@dataclass(frozen=True)
class TransportContext:
    """What a transport factory receives: the validated configuration and shared services."""

    config: Any  # wamd_server.config.Config
    session_store: Any  # wamd_server.domain.ports.SessionStore
    sim_network: Any = None  # the in-process simulated network, when one runs


@dataclass(frozen=True)
class TransportSpec:
    """A WhatsApp transport selectable with `WAMD_TRANSPORT=<name>`."""

    name: str
    create: Callable[[TransportContext], Any]  # returns a wamd_server.domain.ports.Transport
    description: str = ""


@dataclass(frozen=True)
class CampaignTypeSpec:
    """A campaign type offered at `GET /api/campaign-types` (the built-in one is `broadcast`).

    `plan(campaign, ctx)` turns a due campaign into outbox messages through `ctx`
    (:class:`wamd_server.services.planner.PlanContext`): pages of target leads, the devices that may send,
    lead distribution, template rendering, and `enqueue`. It must be idempotent (it runs again if the planner
    stopped half-way; `enqueue` skips what exists). Returns the number of messages it queued.
    """

    name: str
    title: str
    description: str = ""
    options_schema: dict[str, Any] = field(default_factory=dict)  # JSON schema of the campaign's `options`
    plan: Callable[[Any, Any], Awaitable[int]] | None = None
