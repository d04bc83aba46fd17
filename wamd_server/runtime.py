"""Composition root: builds the server's parts from the configuration and starts and stops them in stages.

storage (engine, migrations) → bus → plugins → device worker (transport, pool, leases) → API. Stopping runs in
reverse, so the API stops taking requests before the sessions close and the database goes last. The role says
which parts run: `serve` all of them, `api` no worker, `worker` no API.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server import __version__
from wamd_server.config import Config, ConfigError
from wamd_server.domain.errors import NotFound
from wamd_server.domain.models import Campaign, Device, Lead, User
from wamd_server.domain.ports import BusEvent, Clock, EventBus, RateLimiter, Transport, WorkerInfo
from wamd_server.infra.bus.local import LocalEventBus
from wamd_server.infra.bus.redis import RedisEventBus
from wamd_server.infra.bus.rpc import RedisCommandServer, RedisWorkerCommands
from wamd_server.infra.db import migrate
from wamd_server.infra.db.campaigns import SqlCampaignRepository
from wamd_server.infra.db.chats import SqlChatRepository
from wamd_server.infra.db.devices import SqlDeviceRepository
from wamd_server.infra.db.engine import create_engine, is_postgres
from wamd_server.infra.db.leader import LeaderLock
from wamd_server.infra.db.leads import SqlLeadRepository
from wamd_server.infra.db.leases import SqlLeaseRepository
from wamd_server.infra.db.locked_batch import LockedBatches
from wamd_server.infra.db.media import SqlMediaRepository
from wamd_server.infra.db.messages import SqlMessageRepository
from wamd_server.infra.db.outbox import NewMessage, SqlOutboxRepository
from wamd_server.infra.db.sessions import SqlSessionStore
from wamd_server.infra.db.tables import devices, media
from wamd_server.infra.db.users import SqlTokenRepository, SqlUserRepository
from wamd_server.infra.ratelimit import MemoryRateLimiter, RedisRateLimiter
from wamd_server.infra.whatsapp import builtin
from wamd_server.plugin_api.manager import PluginHost
from wamd_server.plugin_api.types import CampaignTypeSpec, TransportContext, TransportSpec
from wamd_server.protocol.events import OPTED_IN, OPTED_OUT, OUTBOX_QUEUED
from wamd_server.services.auth import AuthService
from wamd_server.services.campaigns import CampaignService
from wamd_server.services.chats import ChatService
from wamd_server.services.clock import SystemClock
from wamd_server.services.device_pool import DevicePool
from wamd_server.services.device_router import DeviceRouter
from wamd_server.services.devices import DeviceService, scope_of
from wamd_server.services.dispatcher import Dispatcher, DispatchSettings
from wamd_server.services.history import HistoryWriter
from wamd_server.services.hooks import HookCaller
from wamd_server.services.leads import LeadService
from wamd_server.services.media import MediaService
from wamd_server.services.optout import OptOutActions, OptOutPlugin
from wamd_server.services.planner import CampaignPlanner, PlannerLoop
from wamd_server.services.plugin_outbox import PluginOutbox
from wamd_server.services.queue import QueueControl, QueueService
from wamd_server.services.templates import TemplateService
from wamd_server.services.templating import DEFAULT_GREETINGS, render_with_greeting
from wamd_server.services.templating import validate as validate_template
from wamd_server.services.users import UserService
from wamd_server.services.watchdog import WatchdogSettings
from wamd_server.services.worker import DeviceWorker, LeaseTiming
from wamd_server.sim.control import control_routes
from wamd_server.sim.network import SimNetwork
from wamd_server.web.app import create_app
from wamd_server.web.context import ApiContext
from wamd_server.web.extensions import plugin_endpoints, sim_control_endpoints

log = logging.getLogger(__name__)

PLANNER_INTERVAL_S = 1.0


def template_errors(template: str) -> list[str]:
    """Problems that stop a template from being used (warnings such as unknown placeholders do not)."""
    return [issue.message for issue in validate_template(template) if issue.severity == "error"]


class StartupError(Exception):
    """A dependency needed at start is missing or unreachable; str() is the one line for the operator."""


class Role(enum.StrEnum):
    SERVE = "serve"  # API + a device worker in one process (the default)
    API = "api"  # API only; device commands go to worker processes over Redis
    WORKER = "worker"  # a device worker only


def worker_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Runtime:
    config: Config
    role: Role = Role.SERVE
    clock: Clock | None = None  # the system clock unless given (pacing tests run an accelerated one)
    plugins: PluginHost = field(default_factory=PluginHost)
    engine: AsyncEngine | None = None
    bus: EventBus | None = None
    transport: Transport | None = None
    pool: DevicePool | None = None
    worker: DeviceWorker | None = None
    router: DeviceRouter | None = None
    dispatcher: Dispatcher | None = None
    _history: HistoryWriter | None = None
    planner_loop: PlannerLoop | None = None
    sim_network: SimNetwork | None = None
    app: web.Application | None = None
    runner: web.AppRunner | None = None
    port: int | None = None  # the port actually bound (PORT=0 picks a free one)
    device_repo: SqlDeviceRepository | None = None
    _redis: Redis | None = None
    _users: UserService | None = None
    _owns_sim: bool = False  # a network handed in (tests) outlives this runtime
    _commands: RedisWorkerCommands | None = None
    _command_server: RedisCommandServer | None = None
    _unsubscribe: list[Callable[[], None]] = field(default_factory=list)
    _types: dict[str, CampaignTypeSpec] | None = None
    _leader: LeaderLock | None = None
    _listener: socket.socket | None = None  # bound before anything starts, served once the API is built

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        return f"http://{host}:{self.port}"

    @property
    def users(self) -> UserService:
        assert self._users is not None, "runtime not started"
        return self._users

    def check_role(self) -> None:
        """Refuse combinations that cannot work, with a line the operator can act on."""
        cfg = self.config
        if self.role is not Role.SERVE and not cfg.redis_url:
            raise ConfigError(f"REDIS_URL is needed by `wamd-server {self.role.value}`: it carries device commands")
        if self.role is not Role.SERVE and cfg.embedded_sim:
            raise ConfigError(
                "WAMD_SIM_URL is needed with WAMD_TRANSPORT=sim when API and workers run in separate processes "
                "(start `wamd-sim` and point every process at it)"
            )

    async def start(self, *, serve_http: bool = True) -> None:
        cfg = self.config
        self.check_role()
        if serve_http and self.role is not Role.WORKER:
            # A busy port fails the start before a device worker takes any device on.
            self._listener = self._bind()
        await self.open_storage()
        assert self.engine is not None

        if cfg.redis_url:
            self._redis = Redis.from_url(cfg.redis_url)
        self.bus = await self._start_bus()
        self.plugins.register(builtin, name="wamd.builtin.transports")
        self.plugins.load_entry_points()
        clock = self.clock = self.clock or SystemClock()
        user_repo = SqlUserRepository(self.engine)
        device_repo = self.device_repo = SqlDeviceRepository(self.engine)
        leases = SqlLeaseRepository(self.engine)
        self._users = UserService(user_repo, device_repo)
        self._opt_outs = OptOutActions(SqlOutboxRepository(self.engine), self.bus)
        self._greetings = DEFAULT_GREETINGS.with_texts(cfg.greetings)
        if (
            cfg.admin_email
            and cfg.admin_password
            and await self._users.ensure_admin(cfg.admin_email, cfg.admin_password)
        ):
            log.info("created admin %s from WAMD_ADMIN_EMAIL", cfg.admin_email)

        if self.role is not Role.API:
            await self._start_worker(device_repo, leases, clock)
        if self.role is Role.WORKER:
            return

        if self._redis is not None:
            self._commands = RedisWorkerCommands(self._redis, cfg.redis_prefix)
            await self._commands.start()
        router = self.router = DeviceRouter(
            leases, device_repo, local=self.worker, remote=self._commands, timing=LeaseTiming.for_ttl(cfg.lease_ttl_s)
        )
        outbox = SqlOutboxRepository(self.engine)
        media_service = MediaService(SqlMediaRepository(self.engine), clock)
        self._leader = LeaderLock(self.engine)
        self.planner_loop = PlannerLoop(
            CampaignPlanner(
                campaigns=SqlCampaignRepository(self.engine),
                outbox=outbox,
                devices_of=self._campaign_devices,
                plugins=self.plugins,
                bus=self.bus,
                clock=clock,
                render=self._render,
                new_message=NewMessage,
                types=self.campaign_types,
            ),
            self._leader.is_leader,
            PLANNER_INTERVAL_S,
        )
        self.planner_loop.start()
        limiter: RateLimiter = (
            RedisRateLimiter(self._redis, f"{cfg.redis_prefix}:rl") if self._redis is not None else MemoryRateLimiter()
        )
        ctx = ApiContext(
            config=cfg,
            version=__version__,
            auth=AuthService(
                user_repo, SqlTokenRepository(self.engine), limiter, clock, token_ttl=timedelta(days=cfg.token_ttl_days)
            ),
            users=self._users,
            devices=DeviceService(device_repo, router, clock, phone_region=cfg.phone_region),
            leads=LeadService(
                SqlLeadRepository(self.engine),
                device_repo,
                self.bus,
                clock,
                phone_region=cfg.phone_region,
                opt_outs=self._opt_outs,
            ),
            templates=TemplateService(
                SqlLeadRepository(self.engine),
                clock,
                cfg.timezone,
                greetings=self._greetings,
                phone_region=cfg.phone_region,
            ),
            media=media_service,
            campaigns=CampaignService(
                SqlCampaignRepository(self.engine),
                outbox,
                device_repo,
                self.bus,
                clock,
                types=self.campaign_types,
                validate_template=template_errors,
                media_visible=self._media_visible(media_service),
                wake_planner=self.planner_loop.wake.set,
            ),
            queue=QueueService(device_repo, outbox, QueueControl(device_repo, clock), clock, cfg.timezone),
            chats=ChatService(device_repo, SqlChatRepository(self.engine), outbox, NewMessage, router, self.bus, clock),
            clock=clock,
            user_repo=user_repo,
            bus=self.bus,
            plugins=self.plugins,
            db_ok=self.db_ok,
            device_counts=self.device_counts,
            transport_name=cfg.transport,
            sim_network=self.sim_network,
            distribution_reports=outbox,
        )
        extra = plugin_endpoints(await self.plugins.call_flat("wamd_web_routes"))
        if self.sim_network is not None:
            extra += sim_control_endpoints(control_routes(self.sim_network))
        self.app = create_app(ctx, extra)
        if serve_http:
            await self._serve(self.app)

    async def _start_worker(self, device_repo: SqlDeviceRepository, leases: SqlLeaseRepository, clock: Clock) -> None:
        cfg = self.config
        assert self.engine is not None and self.bus is not None
        if cfg.embedded_sim and self.sim_network is None:
            self.sim_network = SimNetwork()
            self._owns_sim = True
        self.transport = await self._build_transport(SqlSessionStore(self.engine))
        held: set[UUID] = set()
        messages = SqlMessageRepository(self.engine)
        hooks = HookCaller(self.plugins, PluginOutbox(SqlOutboxRepository(self.engine), NewMessage, self.bus, clock))
        self.pool = DevicePool(
            transport=self.transport,
            devices=device_repo,
            messages=messages,
            bus=self.bus,
            hooks=hooks,
            clock=clock,
            connects_per_second=cfg.connects_per_second,
            owns=lambda device_id: device_id in held,
        )
        # Locked batches' sends join the chat history a moment later, with the receipts that came meanwhile.
        self._history = HistoryWriter(messages, self.pool.receipts) if is_postgres(self.engine) else None
        self.dispatcher = Dispatcher(
            outbox=SqlOutboxRepository(self.engine),
            devices=device_repo,
            transport=self.transport,
            clock=clock,
            tz=cfg.timezone,
            veto=hooks.before_send,
            suspect=self._send_unacked,
            load_media=self._load_media,
            queue=QueueControl(device_repo, clock),
            settings=DispatchSettings(send_timeout_s=cfg.send_ack_timeout_s),
            # Half the pool's connections at most (it holds twice `db_pool_size`): the rest serve everything else.
            locked=(
                LockedBatches(self.engine, max_open=cfg.db_pool_size, history=self._history)
                if is_postgres(self.engine)
                else None
            ),
            repair_history=self._history is not None,
            greetings=self._greetings,
        )
        self.pool.status_listeners.append(self.dispatcher.device_status)
        self.plugins.register(
            OptOutPlugin(SqlLeadRepository(self.engine), self._opt_outs, clock, cfg.opt_out_words),
            name="wamd.builtin.optout",
        )
        self._unsubscribe.append(self.bus.subscribe(self._outbox_queued))
        info = WorkerInfo(worker_id(), socket.gethostname(), os.getpid(), cfg.worker_capacity)
        watchdog = WatchdogSettings(
            interval_s=cfg.watchdog_interval_s,
            probe_timeout_s=cfg.probe_timeout_s,
            send_ack_timeout_s=cfg.send_ack_timeout_s,
        )
        self.worker = DeviceWorker(
            info, self.pool, leases, LeaseTiming.for_ttl(cfg.lease_ttl_s), held=held, watchdog=watchdog
        )
        await self.worker.start()
        if self._redis is not None:
            self._command_server = RedisCommandServer(self._redis, cfg.redis_prefix, info.id, self.worker.execute)
            await self._command_server.start()
        log.info("device worker %s started (capacity %d)", info.id, info.capacity)

    async def campaign_types(self) -> dict[str, CampaignTypeSpec]:
        """Campaign types from the plugins; a later duplicate name is ignored with a warning."""
        if self._types is None:
            found: dict[str, CampaignTypeSpec] = {}
            for spec in await self.plugins.call_flat("wamd_campaign_types"):
                if not isinstance(spec, CampaignTypeSpec):
                    log.warning("ignoring a campaign type that is not a CampaignTypeSpec: %r", spec)
                elif spec.name in found:
                    log.warning("campaign type %r is offered twice; keeping the first", spec.name)
                else:
                    found[spec.name] = spec
            self._types = found
        return self._types

    def _render(
        self, template: str, lead: Lead, at: datetime, rng: random.Random, language: str
    ) -> tuple[str, str | None]:
        return render_with_greeting(
            template, lead, now=at, tz=self.config.timezone, language=language, rng=rng, greetings=self._greetings
        )

    @staticmethod
    def _media_visible(service: MediaService) -> Callable[[User, UUID], Awaitable[bool]]:
        async def visible(user: User, media_id: UUID) -> bool:
            try:
                await service.get(user, media_id)
            except NotFound:
                return False
            return True

        return visible

    async def _campaign_devices(self, campaign: Campaign) -> list[Device]:
        """A campaign's devices: those it names, else every device its owner may use."""
        assert self.device_repo is not None and self.engine is not None
        owner = await SqlUserRepository(self.engine).get(campaign.user_id)
        if owner is None:
            return []
        scope = scope_of(owner)
        if campaign.device_ids:
            found = [await self.device_repo.get(d, scope) for d in campaign.device_ids]
            return [d for d in found if d is not None]
        return await self.device_repo.list_page(scope, 100_000, None)

    async def _send_unacked(self, device_id: UUID) -> None:
        assert self.pool is not None
        await self.pool.suspect(device_id, f"a send got no server ack within {self.config.send_ack_timeout_s:.0f} s")

    async def _load_media(self, media_id: UUID) -> tuple[bytes, str] | None:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(media.c.data, media.c.mime).where(media.c.id == media_id))).first()
        return (bytes(row.data), str(row.mime)) if row else None

    async def _outbox_queued(self, event: BusEvent) -> None:
        if self.dispatcher is None:
            return
        if event.type == OUTBOX_QUEUED:
            ids = event.data.get("device_ids") or None  # none named: every lane looks
            self.dispatcher.wake([UUID(d) for d in ids] if ids else None)
        elif event.type == OPTED_OUT:
            self.dispatcher.opted_out.add(str(event.data["phone"]))
        elif event.type == OPTED_IN:
            self.dispatcher.opted_out.discard(str(event.data["phone"]))

    async def stop(self) -> None:
        """Stop everything that runs, in reverse order of start; calling it again does nothing."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._listener is not None:  # bound, but the start failed before serving it
            self._listener.close()
            self._listener = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.planner_loop is not None:
            await self.planner_loop.stop()
            self.planner_loop = None
        if self._leader is not None:
            await self._leader.release()
            self._leader = None
        if self.dispatcher is not None:
            await self.dispatcher.close()
            self.dispatcher = None
        if self._history is not None:
            await self._history.close()
            self._history = None
        if self._commands is not None:
            await self._commands.close()
            self._commands = None
        if self._command_server is not None:
            await self._command_server.close()
            self._command_server = None
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        if self.sim_network is not None and self._owns_sim:
            await self.sim_network.close()
            self._owns_sim = False
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    async def db_ok(self) -> bool:
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            log.exception("database health check failed")
            return False
        return True

    async def device_counts(self) -> dict[str, int]:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(devices.c.status, func.count()).group_by(devices.c.status))
            return {status: int(count) for status, count in rows}

    async def open_storage(self) -> list[str]:
        """Connect to the database and apply pending migrations; returns the revisions applied."""
        self.engine = create_engine(self.config.database_url, pool_size=self.config.db_pool_size)
        try:
            pending = await migrate.pending_revisions(self.engine)
            await migrate.upgrade(self.engine)
            return pending
        except OSError as exc:
            raise StartupError(f"cannot reach the database ({redacted(self.config.database_url)}): {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")):
                raise StartupError(
                    f"cannot use the database ({redacted(self.config.database_url)}): {first_line(exc)}"
                ) from exc
            raise

    async def _start_bus(self) -> EventBus:
        if self._redis is None:
            bus: EventBus = LocalEventBus()
        else:
            bus = RedisEventBus(self._redis, channel_prefix=self.config.redis_prefix)
        try:
            await bus.start()
        except Exception as exc:
            raise StartupError(f"cannot reach Redis at {redacted(self.config.redis_url or '')}: {exc}") from exc
        return bus

    async def _build_transport(self, store: SqlSessionStore) -> Transport:
        specs: list[TransportSpec] = [
            s for s in await self.plugins.call_flat("wamd_transports") if isinstance(s, TransportSpec)
        ]
        by_name = {s.name: s for s in specs}
        spec = by_name.get(self.config.transport)
        if spec is None:
            raise ConfigError(
                f"WAMD_TRANSPORT={self.config.transport!r} is not provided by any plugin "
                f"(available: {', '.join(sorted(by_name))})"
            )
        context = TransportContext(config=self.config, session_store=store, sim_network=self.sim_network)
        transport: Transport = spec.create(context)
        return transport

    def _bind(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        return sock

    async def _serve(self, app: web.Application) -> None:
        sock, self._listener = self._listener, None
        if sock is None:
            sock = self._bind()
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        try:
            await web.SockSite(self.runner, sock).start()
        except OSError as exc:
            sock.close()
            await self.runner.cleanup()
            self.runner = None
            raise StartupError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from exc
        self.port = int(sock.getsockname()[1])


def redacted(url: str) -> str:
    """A URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc)
    return text_.strip().splitlines()[0] if text_.strip() else type(exc).__name__
