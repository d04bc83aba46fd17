"""`wamd-server` as an operator runs it: the installed console script in a subprocess, configured by the
environment. Bad configuration exits 2 and an unreachable dependency exits 1, each with one line on stderr
and never a traceback."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

from tests.conftest import PG_ADMIN, ServerFactory
from wamd_server.infra.db.migrate import alembic_config

WAMD_SERVER = Path(sys.executable).parent / "wamd-server"
MIGRATIONS = len(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))
CLEARED = ("DATABASE_URL", "DB_URI", "REDIS_URL", "PORT", "HOST", "TZ")


@dataclass
class Exit:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def one_line(self) -> str:
        """The single stderr line of a failed start (and no traceback)."""
        assert "Traceback" not in self.stderr, self.stderr
        assert len(self.error_lines) == 1, self.stderr
        line = self.error_lines[0]
        assert line.startswith("wamd-server: "), line
        return line.removeprefix("wamd-server: ")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("WAMD_")}
    base["WAMD_DATA_DIR"] = str(tmp_path / "data")
    return base


async def wamd_server(env: dict[str, str], *args: str, timeout: float = 60.0) -> Exit:
    proc = await asyncio.create_subprocess_exec(
        str(WAMD_SERVER),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Exit(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def fresh_pg_dsn(pg_url: str) -> Iterator[str]:
    """An empty Postgres database, as the `postgres://` URL a hosting platform hands out."""
    name = f"wamd_cli_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgres://", 1)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_console_script_is_installed() -> None:
    assert WAMD_SERVER.is_file() and os.access(WAMD_SERVER, os.X_OK), WAMD_SERVER


# --- bad configuration: exit 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("PORT", "eighty", "PORT"),
        ("DATABASE_URL", "mysql://root@localhost/wamd", "DATABASE_URL"),
        ("DB_URI", "oracle://h/db", "DB_URI"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL"),
        ("WAMD_SIM_URL", "localhost:3100", "WAMD_SIM_URL"),
        ("WAMD_TRANSPORT", "not a name", "WAMD_TRANSPORT"),
        ("WAMD_TIMEZONE", "Atlantis/Capital", "WAMD_TIMEZONE"),
        ("TZ", "Atlantis/Capital", "TZ"),
        ("WAMD_ADMIN_EMAIL", "boss@example.com", "WAMD_ADMIN_PASSWORD"),  # names the one that is missing
        ("WAMD_TRUST_FORWARDED", "perhaps", "WAMD_TRUST_FORWARDED"),
    ],
)
@pytest.mark.parametrize("command", [[], ["migrate"]], ids=["serve", "migrate"])
async def test_a_bad_variable_exits_2_with_one_line_naming_it(
    env: dict[str, str], variable: str, value: str, named: str, command: list[str]
) -> None:
    result = await wamd_server({**env, variable: value}, *command)
    assert result.code == 2
    assert result.one_line().startswith(named)
    assert result.stdout == ""


async def test_a_bad_port_option_exits_2(env: dict[str, str]) -> None:
    result = await wamd_server(env, "--port", "70000")
    assert result.code == 2
    assert "--port" in result.one_line()


async def test_an_unknown_transport_exits_2_listing_the_available_ones(env: dict[str, str], tmp_path: Path) -> None:
    result = await wamd_server(
        {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}", "WAMD_TRANSPORT": "carrier-pigeon"}
    )
    assert result.code == 2
    line = result.one_line()
    assert "WAMD_TRANSPORT" in line and "carrier-pigeon" in line and "neonize, sim" in line


# --- unreachable dependencies: exit 1 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["migrate"], ["create-user", "--email", "a@example.com", "--password", "password-123"]],
    ids=["serve", "migrate", "create-user"],
)
async def test_an_unreachable_database_exits_1_with_one_line(env: dict[str, str], command: list[str]) -> None:
    url = "postgres://postgres:hunter2@127.0.0.1:1/x"
    result = await wamd_server({**env, "DATABASE_URL": url}, *command)
    assert result.code == 1
    line = result.one_line()
    assert "database" in line and "127.0.0.1:1" in line
    assert "hunter2" not in result.stderr  # the password is not printed


async def test_an_unreachable_redis_exits_1_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    result = await wamd_server(
        {
            **env,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
            "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
            "WAMD_TRANSPORT": "sim",
        }
    )
    assert result.code == 1
    line = result.one_line()
    assert "Redis" in line and "hunter2" not in line


async def test_a_port_in_use_exits_1_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await wamd_server(
            {
                **env,
                "DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
                "WAMD_TRANSPORT": "sim",
                "PORT": str(port),
                "WAMD_LOG_LEVEL": "WARNING",
            }
        )
    assert result.code == 1
    assert f"127.0.0.1:{port}" in result.one_line()
    # It failed before touching anything: no database made, so no device worker took a device on.
    assert not (tmp_path / "w.db").exists()


# --- migrate -------------------------------------------------------------------------------------------------


async def test_migrate_a_fresh_sqlite_file(env: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "new" / "wamd.db"
    first = await wamd_server({**env, "DATABASE_URL": f"sqlite:///{db}"}, "migrate")
    assert (first.code, first.stdout.strip()) == (0, f"database is up to date ({MIGRATIONS} migration(s) applied)"), (
        first
    )
    assert db.is_file()
    again = await wamd_server({**env, "DATABASE_URL": f"sqlite:///{db}"}, "migrate")
    assert (again.code, again.stdout.strip()) == (0, "database is up to date (0 migration(s) applied)"), again


async def test_migrate_postgres(env: dict[str, str], fresh_pg_dsn: str) -> None:
    first = await wamd_server({**env, "DATABASE_URL": fresh_pg_dsn + "?sslmode=disable"}, "migrate")
    assert (first.code, first.stdout.strip()) == (0, f"database is up to date ({MIGRATIONS} migration(s) applied)"), (
        first
    )
    with psycopg.connect(fresh_pg_dsn.replace("postgres://", "postgresql://", 1)) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"alembic_version", "users", "devices", "messages"} <= tables
    again = await wamd_server({**env, "DB_URI": fresh_pg_dsn}, "migrate")
    assert (again.code, again.stdout.strip()) == (0, "database is up to date (0 migration(s) applied)"), again


# --- create-user ---------------------------------------------------------------------------------------------


async def test_create_user_then_log_in_through_a_server(
    env: dict[str, str], database_url: str, make_server: ServerFactory
) -> None:
    env = {**env, "DATABASE_URL": database_url}
    created = await wamd_server(
        env, "create-user", "--email", "Night.Shift@Example.com", "--password", "night-pass-1", "--role", "staff"
    )
    assert created.code == 0, created
    assert created.stdout.startswith("created staff night.shift@example.com (")

    again = await wamd_server(env, "create-user", "--email", "night.shift@example.com", "--password", "other-pass-1")
    assert again.code == 2
    assert "already exists" in again.one_line()

    server = await make_server(database_url)
    token = await server.login("night.shift@example.com", "night-pass-1")
    me = await server.ok("GET", "/api/me", token)
    assert me["email"] == "night.shift@example.com" and me["role"] == "staff"


@pytest.mark.parametrize(
    ("email", "password", "problem"),
    [("not-an-email", "password-123", "email"), ("ok@example.com", "short", "password")],
)
async def test_create_user_with_bad_input_exits_2(
    env: dict[str, str], tmp_path: Path, email: str, password: str, problem: str
) -> None:
    env = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    result = await wamd_server(env, "create-user", "--email", email, "--password", password)
    assert result.code == 2
    assert problem in result.one_line()
    assert result.stdout == ""
