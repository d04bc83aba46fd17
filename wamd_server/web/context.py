"""What the API handlers use, assembled by the runtime and stored on the aiohttp application."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from wamd_server.config import Config
from wamd_server.domain.ports import Clock, EventBus, UserRepository
from wamd_server.plugin_api.manager import PluginHost
from wamd_server.services.auth import AuthService
from wamd_server.services.campaigns import CampaignService
from wamd_server.services.chats import ChatService
from wamd_server.services.devices import DeviceService
from wamd_server.services.leads import LeadService
from wamd_server.services.media import MediaService
from wamd_server.services.planner import DistributionReports
from wamd_server.services.queue import QueueService
from wamd_server.services.templates import TemplateService
from wamd_server.services.users import UserService


@dataclass
class ApiContext:
    config: Config
    version: str
    auth: AuthService
    users: UserService
    devices: DeviceService
    leads: LeadService
    templates: TemplateService
    media: MediaService
    campaigns: CampaignService
    chats: ChatService
    queue: QueueService
    clock: Clock
    user_repo: UserRepository
    bus: EventBus
    plugins: PluginHost
    db_ok: Callable[[], Awaitable[bool]]
    device_counts: Callable[[], Awaitable[dict[str, int]]]
    transport_name: str
    sim_network: Any = None  # the in-process simulated network, whose control API is then served here
    distribution_reports: DistributionReports | None = None  # lead distribution plugins' reports, for their routes


CTX = web.AppKey("wamd_context", ApiContext)
