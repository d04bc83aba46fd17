"""Running `wamd-server` and `wamd-sim` as real processes, the way an operator does."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN_EMAIL, truncate_all

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    output: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)

    async def wait_http(self, url: str, timeout: float = START_TIMEOUT) -> float:
        """Poll `url` until it answers 200; returns seconds since the process started."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.args[0]} exited with {self.proc.returncode}:\n{self.text()}")
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return time.monotonic() - self.started_at
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{url} did not answer within {timeout}s:\n{self.text()}")


def wamd_sim(port: int, log_dir: Path, *extra: str) -> Process:
    return Process([str(BIN / "wamd-sim"), "--port", str(port), *extra], {}, log_dir / f"wamd-sim-{port}.log")


def wamd_server(env: dict[str, str], log_dir: Path, *args: str) -> Process:
    return Process([str(BIN / "wamd-server"), *args], env, log_dir / f"wamd-server-{env.get('PORT', 'demo')}.log")


@dataclass
class Stack:
    """A standalone `wamd-sim` on a clean Postgres, and the environment of `wamd-server` processes using it with
    Redis (`api_port` is free for the API)."""

    sim: Process
    sim_url: str
    api_port: int
    env: dict[str, str]


async def start_stack(tmp_path: Path, pg_url: str, redis_url: str, prefix: str, **extra: str) -> Stack:
    truncate_all(pg_url)
    sim_port, api_port = free_port(), free_port()
    sim = wamd_sim(sim_port, tmp_path)
    sim.start()
    sim_url = f"http://127.0.0.1:{sim_port}"
    await sim.wait_http(sim_url + "/api/health")
    env = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "WAMD_REDIS_PREFIX": f"{prefix}-{secrets.token_hex(3)}",
        "WAMD_TRANSPORT": "sim",
        "WAMD_SIM_URL": sim_url,
        "PORT": str(api_port),
        "WAMD_ADMIN_EMAIL": ADMIN_EMAIL,
        "WAMD_ADMIN_PASSWORD": secrets.token_urlsafe(12),
        **extra,
    }
    return Stack(sim, sim_url, api_port, env)
