"""`wamd-server`: run the server (or the demo), apply migrations, create users."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wamd_server import __version__
from wamd_server.config import Config, ConfigError, load_config
from wamd_server.gc_tuning import freeze_startup_objects, tune_for_server

if TYPE_CHECKING:
    from wamd_server.runtime import Role

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wamd-server", description="wamd: WhatsApp multi-device server (configuration: environment variables)"
    )
    parser.add_argument("--version", action="version", version=f"wamd {__version__}")
    parser.add_argument("--demo", action="store_true", help="throw-away demo on SQLite and the simulated network")
    parser.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: PORT or 3000)")
    parser.add_argument(
        "--workers", type=int, metavar="K", help="run K device worker processes beside the API (needs REDIS_URL)"
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="API, planners and an in-process device worker (the default)")
    serve.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--host", help=argparse.SUPPRESS)
    serve.add_argument("--port", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    sub.add_parser("api", help="the API only; device workers run as `wamd-server worker` (needs REDIS_URL)")
    worker = sub.add_parser("worker", help="a device worker process (needs REDIS_URL)")
    worker.add_argument("--capacity", type=int, metavar="N", help="most devices this worker runs (default 1000)")
    sub.add_parser("migrate", help="apply database migrations and exit")
    create = sub.add_parser("create-user", help="create a user (admin or staff)")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True)
    create.add_argument("--role", choices=("admin", "staff"), default="staff")
    create.add_argument("--name", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(demo=args.demo)
        if args.host:
            config = config.with_overrides(host=args.host)
        if args.port is not None:
            if not 0 <= args.port <= 65535:
                raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
            config = config.with_overrides(port=args.port)
        capacity = getattr(args, "capacity", None)
        if capacity is not None:
            if capacity < 1:
                raise ConfigError(f"--capacity must be at least 1, got {capacity}")
            config = config.with_overrides(worker_capacity=capacity)
        if args.workers is not None and not 1 <= args.workers <= 64:
            raise ConfigError(f"--workers must be between 1 and 64, got {args.workers}")
    except ConfigError as exc:
        print(f"wamd-server: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log_level)

    from wamd_server.runtime import Role, StartupError  # after config: importing the runtime loads the server stack

    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(config))
        if args.command == "create-user":
            return asyncio.run(_create_user(config, args))
        if args.command == "worker":
            return asyncio.run(_worker(config))
        if args.demo:
            return _demo(config)
        if args.command == "api":
            return asyncio.run(_serve(config, Role.API))
        if args.workers:
            return asyncio.run(_serve(config, Role.API, workers=args.workers))
        return asyncio.run(_serve(config, Role.SERVE))
    except (StartupError, ConfigError) as exc:
        print(f"wamd-server: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_STARTUP
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiohttp's access log is noisy at INFO for a server with WebSocket clients and health probes.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _stop_signal() -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not stopped.done():
            stopped.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop)
    return stopped


async def _serve(config: Config, role: Role, *, workers: int = 0) -> int:
    from wamd_server.runtime import Role, Runtime
    from wamd_server.supervisor import WorkerSupervisor

    tune_for_server()
    runtime = Runtime(config, role)
    if workers:
        runtime.check_role()  # before starting anything: --workers needs Redis (and a standalone simulator)
    supervisor = WorkerSupervisor(workers, config.worker_capacity) if workers else None
    stopped = _stop_signal()
    try:
        await runtime.start()
        if supervisor is not None:
            await supervisor.start()
        freeze_startup_objects()
        logging.getLogger("wamd").info(
            "wamd %s listening on %s (transport %s, bus %s, %s)",
            __version__,
            runtime.url,
            config.transport,
            "redis" if config.redis_url else "local",
            f"{workers} worker processes" if workers else ("no worker" if role is Role.API else "in-process worker"),
        )
        await stopped
    finally:
        if supervisor is not None:
            await supervisor.stop()
        await runtime.stop()
    return 0


async def _worker(config: Config) -> int:
    from wamd_server.runtime import Role, Runtime

    tune_for_server()
    runtime = Runtime(config, Role.WORKER)
    stopped = _stop_signal()
    try:
        await runtime.start()
        freeze_startup_objects()
        await stopped
    finally:
        await runtime.stop()
    return 0


def _demo(config: Config) -> int:
    from wamd_server.demo import demo_config, run_demo
    from wamd_server.runtime import Runtime

    data_dir = Path(tempfile.mkdtemp(prefix="wamd-demo-"))
    try:

        async def go() -> None:
            await run_demo(Runtime(demo_config(config, data_dir)), lambda text: print(text, flush=True), _stop_signal())

        asyncio.run(go())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


async def _migrate(config: Config) -> int:
    from wamd_server.runtime import Runtime

    runtime = Runtime(config)
    try:
        applied = await runtime.open_storage()
    finally:
        await runtime.stop()
    print(f"database is up to date ({len(applied)} migration(s) applied)")
    return 0


async def _create_user(config: Config, args: argparse.Namespace) -> int:
    from wamd_server.domain.errors import DomainError
    from wamd_server.domain.models import Role
    from wamd_server.infra.db.devices import SqlDeviceRepository
    from wamd_server.infra.db.users import SqlUserRepository
    from wamd_server.runtime import Runtime
    from wamd_server.services.users import UserService

    runtime = Runtime(config)
    try:
        await runtime.open_storage()
        assert runtime.engine is not None
        users = UserService(SqlUserRepository(runtime.engine), SqlDeviceRepository(runtime.engine))
        try:
            user = await users.create(args.email, args.password, Role(args.role), args.name)
        except DomainError as exc:
            print(f"wamd-server: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
    finally:
        await runtime.stop()
    print(f"created {user.role.value} {user.email} ({user.id})")
    return 0
