"""Configuration from the environment, validated once at start.

Every problem is reported as one `ConfigError` line naming the variable; the CLI prints it and exits with 2.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import time
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import platformdirs

TRANSPORT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # built-in: neonize, sim; plugins may add more
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A bad configuration value; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Config:
    database_url: str  # SQLAlchemy async URL (postgresql+psycopg:// or sqlite+aiosqlite://)
    redis_url: str | None
    host: str
    port: int
    data_dir: Path
    transport: str
    sim_url: str | None
    wa_store: str  # whatsmeow store: a postgres:// URL or a SQLite file path
    timezone: ZoneInfo
    admin_email: str | None
    admin_password: str | None
    connects_per_second: float
    log_level: str
    trust_forwarded: bool
    token_ttl_days: int
    max_body_bytes: int
    redis_prefix: str = "wamd"
    lease_ttl_s: float = 10.0
    worker_capacity: int = 1000
    phone_region: str = "MY"
    watchdog_interval_s: float = 30.0
    probe_timeout_s: float = 10.0
    send_ack_timeout_s: float = 30.0
    db_pool_size: int = 10
    opt_out_words: tuple[str, ...] = ("STOP", "BERHENTI", "UNSUBSCRIBE", "STOP ALL", "BERHENTI LANGGAN")
    # `{greeting}` texts by language: (local start "HH:MM", text) ascending; languages not given keep the defaults.
    greetings: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    demo: bool = False

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def embedded_sim(self) -> bool:
        """The simulated network runs inside this process (its control API is then served here)."""
        return self.transport == "sim" and self.sim_url is None

    def with_overrides(self, **values: object) -> Config:
        return replace(self, **values)  # type: ignore[arg-type]


def normalise_database_url(raw: str, variable: str) -> str:
    """Accept the URL forms hosting platforms hand out and return the SQLAlchemy async form."""
    scheme = raw.split(":", 1)[0].lower()
    rest = raw[len(scheme) :]
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+asyncpg", "postgresql+psycopg2"):
        if not urlsplit("postgresql" + rest).hostname and "host=" not in rest:
            raise ConfigError(f"{variable}: a Postgres URL needs a host, e.g. postgresql://user:pw@host:5432/db")
        return "postgresql+psycopg" + rest
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        if not rest.startswith(":///"):
            raise ConfigError(f"{variable}: a SQLite URL looks like sqlite:///path/to/file.db")
        return "sqlite+aiosqlite" + rest
    raise ConfigError(f"{variable}: unsupported database URL scheme {scheme!r} (use postgres:// or sqlite:///)")


def whatsmeow_store_for(database_url: str, data_dir: Path) -> str:
    """Default whatsmeow store: the same Postgres (lib/pq URL form), else a SQLite file beside our data."""
    if database_url.startswith("postgresql"):
        return "postgres" + database_url[len("postgresql+psycopg") :]
    return str(data_dir / "whatsmeow.db")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _words(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    words = tuple(w.strip() for w in raw.split(",") if w.strip())
    if not words:
        raise ConfigError(f"{name} must list at least one word, separated by commas")
    return words


def _greetings(env: Mapping[str, str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """`WAMD_GREETINGS`: JSON, language -> {"HH:MM": text}, e.g. {"en": {"06:00": "Morning", "17:00": "Evening"}}."""
    name, raw = "WAMD_GREETINGS", env.get("WAMD_GREETINGS")
    if raw is None or not raw.strip():
        return {}
    example = 'e.g. {"en": {"06:00": "Good morning", "17:00": "Good evening"}}'
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not JSON ({exc.msg}); {example}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{name} must map languages to their greetings; {example}")
    greetings: dict[str, tuple[tuple[str, str], ...]] = {}
    for language, slots in parsed.items():
        if not re.fullmatch(r"[a-z]{2,8}", language):
            raise ConfigError(f"{name}: {language!r} is not a language code such as ms or en")
        if not isinstance(slots, dict) or not slots:
            raise ConfigError(f"{name}: the greetings of {language!r} must map start times to texts; {example}")
        pairs = []
        for start, text in slots.items():
            try:
                at = time.fromisoformat(start) if re.fullmatch(r"[0-9]{2}:[0-9]{2}", start) else None
            except ValueError:
                at = None
            if at is None:
                raise ConfigError(f"{name}: {language} start {start!r} is not a local time HH:MM")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{name}: {language} {start} needs a text")
            pairs.append((start, text.strip()))
        greetings[language] = tuple(sorted(pairs))
    return greetings


def _timezone(env: Mapping[str, str]) -> ZoneInfo:
    name, raw = "WAMD_TIMEZONE", env.get("WAMD_TIMEZONE")
    if not raw:
        name, raw = "TZ", env.get("TZ")
    raw = (raw or "Asia/Kuala_Lumpur").lstrip(":")
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory such as "Europe" in tzdata
        raise ConfigError(f"{name}: unknown time zone {raw!r} (use an IANA name like Asia/Kuala_Lumpur)") from None


def load_config(env: Mapping[str, str] | None = None, *, demo: bool = False) -> Config:
    env = os.environ if env is None else env

    data_dir = Path(env.get("WAMD_DATA_DIR") or platformdirs.user_data_dir("wamd", appauthor=False)).expanduser()

    raw_db = env.get("DATABASE_URL") or env.get("DB_URI")
    db_var = "DATABASE_URL" if env.get("DATABASE_URL") else "DB_URI"
    database_url = normalise_database_url(raw_db, db_var) if raw_db else f"sqlite+aiosqlite:///{data_dir / 'wamd.db'}"

    redis_url = env.get("REDIS_URL") or None
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {redis_url!r}")

    transport = (env.get("WAMD_TRANSPORT") or "neonize").strip().lower()
    if not TRANSPORT_NAME.match(transport):
        raise ConfigError(f"WAMD_TRANSPORT must be a transport name such as neonize or sim, got {transport!r}")

    sim_url = (env.get("WAMD_SIM_URL") or "").rstrip("/") or None
    if sim_url and urlsplit(sim_url).scheme not in ("http", "https"):
        raise ConfigError(f"WAMD_SIM_URL must be an http:// URL of a running wamd-sim, got {sim_url!r}")

    admin_email = env.get("WAMD_ADMIN_EMAIL") or None
    admin_password = env.get("WAMD_ADMIN_PASSWORD") or None
    if bool(admin_email) != bool(admin_password):
        missing = "WAMD_ADMIN_PASSWORD" if admin_email else "WAMD_ADMIN_EMAIL"
        raise ConfigError(f"{missing} must be set together with the other WAMD_ADMIN_* variable")
    if admin_email and "@" not in admin_email:
        raise ConfigError(f"WAMD_ADMIN_EMAIL is not an email address: {admin_email!r}")
    if admin_password and len(admin_password) < 8:
        raise ConfigError("WAMD_ADMIN_PASSWORD must be at least 8 characters")

    log_level = (env.get("WAMD_LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"WAMD_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    redis_prefix = env.get("WAMD_REDIS_PREFIX") or "wamd"
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", redis_prefix):
        raise ConfigError(f"WAMD_REDIS_PREFIX may hold only letters, digits, '_', '.', '-', got {redis_prefix!r}")
    phone_region = (env.get("WAMD_PHONE_REGION") or "MY").upper()
    if not re.match(r"^[A-Z]{2}$", phone_region):
        raise ConfigError(f"WAMD_PHONE_REGION must be a two-letter country code such as MY, got {phone_region!r}")

    host = env.get("HOST") or "127.0.0.1"
    return Config(
        database_url=database_url,
        redis_url=redis_url,
        host=host,
        port=_int(env, "PORT", 3000, 0, 65535),
        data_dir=data_dir,
        transport=transport,
        sim_url=sim_url,
        wa_store=env.get("WAMD_WA_STORE") or whatsmeow_store_for(database_url, data_dir),
        timezone=_timezone(env),
        admin_email=admin_email.strip().lower() if admin_email else None,
        admin_password=admin_password,
        connects_per_second=_float(env, "WAMD_CONNECTS_PER_SECOND", 50.0, 0.1, 10_000.0),
        log_level=log_level,
        trust_forwarded=_bool(env, "WAMD_TRUST_FORWARDED", False),
        token_ttl_days=_int(env, "WAMD_TOKEN_TTL_DAYS", 30, 1, 3650),
        max_body_bytes=_int(env, "WAMD_MAX_BODY_MB", 20, 1, 1024) * 1024 * 1024,
        redis_prefix=redis_prefix,
        lease_ttl_s=_float(env, "WAMD_LEASE_TTL_S", 10.0, 1.0, 600.0),
        worker_capacity=_int(env, "WAMD_WORKER_CAPACITY", 1000, 1, 100_000),
        phone_region=phone_region,
        watchdog_interval_s=_float(env, "WAMD_WATCHDOG_INTERVAL_S", 30.0, 0.1, 3600.0),
        probe_timeout_s=_float(env, "WAMD_PROBE_TIMEOUT_S", 10.0, 0.1, 600.0),
        send_ack_timeout_s=_float(env, "WAMD_SEND_ACK_TIMEOUT_S", 30.0, 1.0, 3600.0),
        db_pool_size=_int(env, "WAMD_DB_POOL_SIZE", 10, 1, 500),
        opt_out_words=_words(
            env, "WAMD_OPT_OUT_WORDS", ("STOP", "BERHENTI", "UNSUBSCRIBE", "STOP ALL", "BERHENTI LANGGAN")
        ),
        greetings=_greetings(env),
        demo=demo,
    )
