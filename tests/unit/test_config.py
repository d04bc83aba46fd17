"""Configuration from the environment (DESIGN §4): defaults, the URL forms hosting platforms hand out, and one
clear line naming the variable for every bad value."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import platformdirs
import pytest

from wamd_server.config import Config, ConfigError, load_config


def config(tmp_path: Path, **env: str) -> Config:
    return load_config({"WAMD_DATA_DIR": str(tmp_path), **env})


def config_error(tmp_path: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, **env)
    message = str(caught.value)
    assert message and "\n" not in message, message  # one line for the operator
    return message


def test_defaults(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.database_url == f"sqlite+aiosqlite:///{tmp_path / 'wamd.db'}"
    assert not cfg.is_postgres
    assert cfg.redis_url is None
    assert (cfg.host, cfg.port) == ("127.0.0.1", 3000)
    assert cfg.data_dir == tmp_path
    assert cfg.transport == "neonize"
    assert cfg.sim_url is None and not cfg.embedded_sim
    assert cfg.wa_store == str(tmp_path / "whatsmeow.db")
    assert cfg.timezone == ZoneInfo("Asia/Kuala_Lumpur")
    assert (cfg.admin_email, cfg.admin_password) == (None, None)
    assert cfg.log_level == "INFO"
    assert cfg.trust_forwarded is False
    assert cfg.demo is False


def test_the_data_dir_defaults_to_the_users_data_directory() -> None:
    cfg = load_config({})
    assert cfg.data_dir == Path(platformdirs.user_data_dir("wamd", appauthor=False))
    assert cfg.database_url.endswith(str(cfg.data_dir / "wamd.db"))


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg", "POSTGRES"])
def test_postgres_urls_are_normalised(tmp_path: Path, scheme: str) -> None:
    raw = f"{scheme}://wamd:s3cret@db.railway.internal:5432/railway?sslmode=require"
    cfg = config(tmp_path, DATABASE_URL=raw)
    assert cfg.database_url == "postgresql+psycopg://wamd:s3cret@db.railway.internal:5432/railway?sslmode=require"
    assert cfg.is_postgres
    # whatsmeow (Go, lib/pq) keeps its store in the same database by default
    assert cfg.wa_store == "postgres://wamd:s3cret@db.railway.internal:5432/railway?sslmode=require"


def test_sqlite_urls_are_accepted(tmp_path: Path) -> None:
    assert config(tmp_path, DATABASE_URL="sqlite:////var/lib/wamd/x.db").database_url == (
        "sqlite+aiosqlite:////var/lib/wamd/x.db"
    )
    message = config_error(tmp_path, DATABASE_URL="sqlite:x.db")
    assert message.startswith("DATABASE_URL")


def test_db_uri_is_the_fallback(tmp_path: Path) -> None:
    cfg = config(tmp_path, DB_URI="postgres://u@h/db")
    assert cfg.database_url == "postgresql+psycopg://u@h/db"
    both = config(tmp_path, DATABASE_URL="postgres://u@first/db", DB_URI="postgres://u@second/db")
    assert both.database_url == "postgresql+psycopg://u@first/db"
    empty = config(tmp_path, DATABASE_URL="", DB_URI="postgres://u@second/db")
    assert empty.database_url == "postgresql+psycopg://u@second/db"
    assert config_error(tmp_path, DB_URI="mysql://u@h/db").startswith("DB_URI")


@pytest.mark.parametrize(
    "url",
    ["mysql://u:p@h/db", "mongodb+srv://h/db", "just some text", "http://h/db"],
)
def test_unsupported_database_schemes(tmp_path: Path, url: str) -> None:
    message = config_error(tmp_path, DATABASE_URL=url)
    assert message.startswith("DATABASE_URL") and "unsupported" in message


def test_a_postgres_url_needs_a_host(tmp_path: Path) -> None:
    assert config_error(tmp_path, DATABASE_URL="postgres:///db").startswith("DATABASE_URL")
    # libpq keyword form with a host is fine
    assert config(tmp_path, DATABASE_URL="postgresql:///db?host=/run/postgresql").is_postgres


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PORT", "8080", 8080),
        ("PORT", "0", 0),
        ("WAMD_TOKEN_TTL_DAYS", "7", 7),
        ("WAMD_MAX_BODY_MB", "2", 2 * 1024 * 1024),
        ("WAMD_CONNECTS_PER_SECOND", "2.5", 2.5),
    ],
)
def test_numbers(tmp_path: Path, variable: str, value: str, expected: float) -> None:
    cfg = config(tmp_path, **{variable: value})
    field = {
        "PORT": "port",
        "WAMD_TOKEN_TTL_DAYS": "token_ttl_days",
        "WAMD_MAX_BODY_MB": "max_body_bytes",
        "WAMD_CONNECTS_PER_SECOND": "connects_per_second",
    }[variable]
    assert getattr(cfg, field) == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "http"),
        ("PORT", "3000.5"),
        ("PORT", "-1"),
        ("PORT", "65536"),
        ("WAMD_TOKEN_TTL_DAYS", "0"),
        ("WAMD_MAX_BODY_MB", "lots"),
        ("WAMD_CONNECTS_PER_SECOND", "fast"),
        ("WAMD_CONNECTS_PER_SECOND", "0"),
    ],
)
def test_bad_numbers(tmp_path: Path, variable: str, value: str) -> None:
    message = config_error(tmp_path, **{variable: value})
    assert message.startswith(variable)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bools(tmp_path: Path, value: str, expected: bool) -> None:
    assert config(tmp_path, WAMD_TRUST_FORWARDED=value).trust_forwarded is expected


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_bad_bools(tmp_path: Path, value: str) -> None:
    message = config_error(tmp_path, WAMD_TRUST_FORWARDED=value)
    assert message.startswith("WAMD_TRUST_FORWARDED") and value in message


def test_time_zones(tmp_path: Path) -> None:
    assert config(tmp_path, WAMD_TIMEZONE="Europe/Berlin").timezone == ZoneInfo("Europe/Berlin")
    assert config(tmp_path, TZ="America/New_York").timezone == ZoneInfo("America/New_York")
    assert config(tmp_path, TZ=":Asia/Tokyo").timezone == ZoneInfo("Asia/Tokyo")  # glibc's TZ form
    both = config(tmp_path, WAMD_TIMEZONE="Europe/Berlin", TZ="America/New_York")
    assert both.timezone == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WAMD_TIMEZONE": "Mars/Olympus_Mons"}, "WAMD_TIMEZONE"),
        ({"WAMD_TIMEZONE": "Europe"}, "WAMD_TIMEZONE"),
        ({"WAMD_TIMEZONE": "../../etc/passwd"}, "WAMD_TIMEZONE"),
        ({"TZ": "Nowhere/Special"}, "TZ"),
        ({"TZ": "/etc/localtime"}, "TZ"),
    ],
)
def test_unknown_time_zones(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    message = config_error(tmp_path, **env)
    assert message.startswith(f"{variable}:") and "time zone" in message


def test_admin_variables_come_together(tmp_path: Path) -> None:
    cfg = config(tmp_path, WAMD_ADMIN_EMAIL=" Boss@Example.com ", WAMD_ADMIN_PASSWORD="long-enough")
    assert (cfg.admin_email, cfg.admin_password) == ("boss@example.com", "long-enough")
    assert config_error(tmp_path, WAMD_ADMIN_EMAIL="boss@example.com").startswith("WAMD_ADMIN_PASSWORD")
    assert config_error(tmp_path, WAMD_ADMIN_PASSWORD="long-enough").startswith("WAMD_ADMIN_EMAIL")
    assert config_error(tmp_path, WAMD_ADMIN_EMAIL="boss", WAMD_ADMIN_PASSWORD="long-enough").startswith(
        "WAMD_ADMIN_EMAIL"
    )
    short = config_error(tmp_path, WAMD_ADMIN_EMAIL="boss@example.com", WAMD_ADMIN_PASSWORD="pw-1234")
    assert short.startswith("WAMD_ADMIN_PASSWORD") and "pw-1234" not in short  # a password is never echoed


def test_redis_url(tmp_path: Path) -> None:
    assert config(tmp_path, REDIS_URL="redis://default:pw@redis.railway.internal:6379").redis_url == (
        "redis://default:pw@redis.railway.internal:6379"
    )
    assert config(tmp_path, REDIS_URL="rediss://h:6380/1").redis_url == "rediss://h:6380/1"
    assert config(tmp_path, REDIS_URL="").redis_url is None
    for bad in ("localhost:6379", "http://redis:6379", "redis"):
        assert config_error(tmp_path, REDIS_URL=bad).startswith("REDIS_URL")


def test_redis_prefix(tmp_path: Path) -> None:
    assert config(tmp_path).redis_prefix == "wamd"
    assert config(tmp_path, WAMD_REDIS_PREFIX="staging.eu-1").redis_prefix == "staging.eu-1"
    for bad in ("has space", "a:b", "x" * 65):
        assert config_error(tmp_path, WAMD_REDIS_PREFIX=bad).startswith("WAMD_REDIS_PREFIX")


def test_sim_url(tmp_path: Path) -> None:
    cfg = config(tmp_path, WAMD_TRANSPORT="sim", WAMD_SIM_URL="http://127.0.0.1:3100/")
    assert cfg.sim_url == "http://127.0.0.1:3100"
    assert not cfg.embedded_sim
    assert config(tmp_path, WAMD_TRANSPORT="sim").embedded_sim
    for bad in ("127.0.0.1:3100", "ws://127.0.0.1:3100", "ftp://sim"):
        assert config_error(tmp_path, WAMD_SIM_URL=bad).startswith("WAMD_SIM_URL")


def test_transport_names(tmp_path: Path) -> None:
    assert config(tmp_path, WAMD_TRANSPORT=" SIM ").transport == "sim"
    assert config(tmp_path, WAMD_TRANSPORT="my-plugin_2").transport == "my-plugin_2"  # plugins add names
    for bad in ("neo nize", "2fast", "sim!", "x" * 40):
        assert config_error(tmp_path, WAMD_TRANSPORT=bad).startswith("WAMD_TRANSPORT")


def test_log_level(tmp_path: Path) -> None:
    assert config(tmp_path, WAMD_LOG_LEVEL="debug").log_level == "DEBUG"
    assert config_error(tmp_path, WAMD_LOG_LEVEL="loud").startswith("WAMD_LOG_LEVEL")


def test_overrides_keep_the_rest(tmp_path: Path) -> None:
    cfg = config(tmp_path, PORT="4000")
    moved = cfg.with_overrides(port=5000, host="0.0.0.0")
    assert (moved.port, moved.host, moved.database_url) == (5000, "0.0.0.0", cfg.database_url)
    assert cfg.port == 4000


def test_greetings(tmp_path: Path) -> None:
    assert config(tmp_path).greetings == {}
    cfg = config(tmp_path, WAMD_GREETINGS='{"en": {"17:00": "Evening, ", "06:00": "Morning"}, "id": {"00:00": "Halo"}}')
    assert cfg.greetings == {"en": (("06:00", "Morning"), ("17:00", "Evening,")), "id": (("00:00", "Halo"),)}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{en: x}", "is not JSON"),
        ("[]", "must map languages"),
        ('{"English": {"06:00": "Hi"}}', "is not a language code"),
        ('{"en": {}}', "must map start times to texts"),
        ('{"en": {"6am": "Hi"}}', "is not a local time HH:MM"),
        ('{"en": {"24:00": "Hi"}}', "is not a local time HH:MM"),
        ('{"en": {"06:00": " "}}', "needs a text"),
    ],
)
def test_bad_greetings(tmp_path: Path, value: str, says: str) -> None:
    message = config_error(tmp_path, WAMD_GREETINGS=value)
    assert message.startswith("WAMD_GREETINGS") and says in message
