"""`wamd-sim`: the simulated WhatsApp network as a standalone server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from wamd_server.sim.config import SimConfig
from wamd_server.sim.network import SimNetwork
from wamd_server.sim.server import create_sim_app

EXIT_OK = 0
EXIT_CANNOT_LISTEN = 2


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return number


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(prog="wamd-sim", description="Simulated WhatsApp network for wamd.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3100, help="port to listen on (default 3100; 0 = any)")
    parser.add_argument(
        "--qr-ttl", type=_positive, default=defaults.qr_first_s, help="lifetime of the first QR code, seconds"
    )
    parser.add_argument(
        "--qr-next-ttl", type=_positive, default=defaults.qr_next_s, help="lifetime of each next QR code"
    )
    parser.add_argument("--qr-codes", type=_count, default=defaults.qr_codes, help="QR codes per pairing")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    config = SimConfig(qr_first_s=args.qr_ttl, qr_next_s=args.qr_next_ttl, qr_codes=args.qr_codes)
    network = SimNetwork(config)
    runner = web.AppRunner(create_sim_app(network), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            print(f"wamd-sim: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
            return EXIT_CANNOT_LISTEN
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still raises KeyboardInterrupt
                loop.add_signal_handler(sig, stop.set)
        port = runner.addresses[0][1] if runner.addresses else args.port
        print(f"wamd-sim listening on http://{args.host}:{port}", flush=True)
        await stop.wait()
        return EXIT_OK
    finally:
        await runner.cleanup()
        await network.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
