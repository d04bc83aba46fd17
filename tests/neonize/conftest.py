"""Fixtures for the neonize transport: fresh whatsmeow stores (a Postgres database, a SQLite file).

Postgres is reached at WAMD_TEST_PG (an admin URL, database `postgres`), as for the rest of the suite. Each
Postgres store is a database `wamd_nz_<random>`, dropped afterwards (forcibly: whatsmeow never closes the
connection each client opens).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

PG_ADMIN = os.environ.get("WAMD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} ({exc})", pytrace=False)


@pytest.fixture
def pg_store() -> Iterator[str]:
    """A `postgres://` URL (the form whatsmeow's lib/pq takes) of a new, empty database."""
    name = f"wamd_nz_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_ADMIN)
    yield urlunsplit(parts._replace(scheme="postgres", path=f"/{name}"))
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_store(tmp_path: Path) -> str:
    """A path for a SQLite store that does not exist yet (whatsmeow creates it)."""
    return str(tmp_path / "whatsmeow.db")


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue("pg_store" if request.param == "postgres" else "sqlite_store")
    return value
