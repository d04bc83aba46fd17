"""Composition root: builds the server's parts from the configuration and starts and stops them in stages.

storage (engine, migrations) → bus → plugins → transport → device pool → API. Stopping runs in reverse, so
the API stops taking requests before the sessions close and the database goes last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server import __version__
from wamd_server.config import Config, ConfigError
from wamd_server.domain.ports import EventBus, RateLimiter, Transport
from wamd_server.infra.bus.local import LocalEventBus
from wamd_server.infra.bus.redis import RedisEventBus
from wamd_server.infra.db import migrate
from wamd_server.infra.db.devices import SqlDeviceRepository
from wamd_server.infra.db.engine import create_engine
from wamd_server.infra.db.messages import SqlMessageRepository
from wamd_server.infra.db.sessions import SqlSessionStore
from wamd_server.infra.db.tables import devices
from wamd_server.infra.db.users import SqlTokenRepository, SqlUserRepository
from wamd_server.infra.ratelimit import MemoryRateLimiter, RedisRateLimiter
from wamd_server.infra.whatsapp import builtin
from wamd_server.plugin_api.manager import PluginHost
from wamd_server.plugin_api.types import TransportContext, TransportSpec
from wamd_server.services.auth import AuthService
from wamd_server.services.clock import SystemClock
from wamd_server.services.device_pool import DevicePool
from wamd_server.services.devices import DeviceService
from wamd_server.services.hooks import HookCaller
from wamd_server.services.users import UserService
from wamd_server.sim.control import control_routes
from wamd_server.sim.network import SimNetwork
from wamd_server.web.app import create_app
from wamd_server.web.context import ApiContext
from wamd_server.web.extensions import plugin_endpoints, sim_control_endpoints

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A dependency needed at start is missing or unreachable; str() is the one line for the operator."""


@dataclass
class Runtime:
    config: Config
    plugins: PluginHost = field(default_factory=PluginHost)
    engine: AsyncEngine | None = None
    bus: EventBus | None = None
    transport: Transport | None = None
    pool: DevicePool | None = None
    sim_network: SimNetwork | None = None
    app: web.Application | None = None
    runner: web.AppRunner | None = None
    port: int | None = None  # the port actually bound (PORT=0 picks a free one)
    device_repo: SqlDeviceRepository | None = None
    _redis: Redis | None = None
    _users: UserService | None = None
    _owns_sim: bool = False  # a network handed in (tests) outlives this runtime

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        return f"http://{host}:{self.port}"

    @property
    def users(self) -> UserService:
        assert self._users is not None, "runtime not started"
        return self._users

    async def start(self, *, serve_http: bool = True, reconnect: bool = True) -> None:
        cfg = self.config
        await self.open_storage()
        assert self.engine is not None

        self.bus = await self._start_bus()
        limiter: RateLimiter = MemoryRateLimiter()
        if cfg.redis_url:
            self._redis = Redis.from_url(cfg.redis_url)
            limiter = RedisRateLimiter(self._redis)

        self.plugins.register(builtin, name="wamd.builtin.transports")
        self.plugins.load_entry_points()
        clock = SystemClock()
        user_repo = SqlUserRepository(self.engine)
        device_repo = self.device_repo = SqlDeviceRepository(self.engine)
        self._users = UserService(user_repo, device_repo)
        if (
            cfg.admin_email
            and cfg.admin_password
            and await self._users.ensure_admin(cfg.admin_email, cfg.admin_password)
        ):
            log.info("created admin %s from WAMD_ADMIN_EMAIL", cfg.admin_email)

        if cfg.embedded_sim and self.sim_network is None:
            self.sim_network = SimNetwork()
            self._owns_sim = True
        self.transport = await self._build_transport(SqlSessionStore(self.engine))
        self.pool = DevicePool(
            transport=self.transport,
            devices=device_repo,
            messages=SqlMessageRepository(self.engine),
            bus=self.bus,
            hooks=HookCaller(self.plugins),
            clock=clock,
            connects_per_second=cfg.connects_per_second,
        )
        await self.pool.start(reconnect=reconnect)

        ctx = ApiContext(
            config=cfg,
            version=__version__,
            auth=AuthService(
                user_repo, SqlTokenRepository(self.engine), limiter, clock, token_ttl=timedelta(days=cfg.token_ttl_days)
            ),
            users=self._users,
            devices=DeviceService(device_repo, self.pool, clock),
            user_repo=user_repo,
            bus=self.bus,
            plugins=self.plugins,
            db_ok=self.db_ok,
            device_counts=self.device_counts,
            transport_name=cfg.transport,
            sim_network=self.sim_network,
        )
        extra = plugin_endpoints(await self.plugins.call_flat("wamd_web_routes"))
        if self.sim_network is not None:
            extra += sim_control_endpoints(control_routes(self.sim_network))
        self.app = create_app(ctx, extra)
        if serve_http:
            await self._serve(self.app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.pool is not None:
            await self.pool.stop()
        if self.sim_network is not None and self._owns_sim:
            await self.sim_network.close()
        if self.bus is not None:
            await self.bus.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self.engine is not None:
            await self.engine.dispose()

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
        self.engine = create_engine(self.config.database_url)
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
        if not self.config.redis_url:
            bus: EventBus = LocalEventBus()
        else:
            bus = RedisEventBus(self.config.redis_url)
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

    async def _serve(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise StartupError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from exc
        addresses: list[Any] = self.runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.config.port


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
