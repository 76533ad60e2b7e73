"""Configuration from environment variables, with defaults that work on a developer's machine."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from infra.xlsx_split import SPLIT_SIZE
from ledger.application import Ledger
from ledger.ports import Clock, FixedClock, SystemClock

REPO_ROOT = Path(__file__).resolve().parent.parent


# Set by `ledger run` for the worker it starts, when it said itself that the worker runs as root.
RUN_NOTED_ROOT = "LEDGER_RUN_NOTED_ROOT"


class ConfigError(ValueError):
    """A setting that cannot be used: its message names the variable and what it takes."""


def _setting(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name) or default  # set but empty (compose passes `${NAME:-}`): the default


def _whole(env: Mapping[str, str], name: str, default: int, least: int) -> int:
    text = _setting(env, name, str(default)).strip()
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, got {value}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, least: float, *, above: bool = False) -> float:
    text = _setting(env, name, str(default)).strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < least or (above and value == least):
        raise ConfigError(f"{name} must be {'above' if above else 'at least'} {least:g} seconds, got {text}")
    return value


def _today(env: Mapping[str, str]) -> date | None:
    text = env.get("LEDGER_TODAY", "").strip()
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        raise ConfigError(f"LEDGER_TODAY must be an ISO date (2026-11-22) or empty, got {text!r}") from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(env: Mapping[str, str]) -> int:
    """LOG_LEVEL: the least severe lines logged (WARNING leaves out every request's access line)."""
    text = _setting(env, "LOG_LEVEL", "INFO").strip()
    if text.upper() not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return int(logging.getLevelName(text.upper()))


def _database_url(env: Mapping[str, str]) -> str:
    url = _setting(env, "DATABASE_URL", "postgresql://ledger@127.0.0.1:5432/ledger")
    # libpq ends the user and password at the first '@' (or the user at a '/'): one more '@' before
    # the parameters, from a password not percent-encoded, would put the rest of the password in
    # the host or database name, and in messages.
    scheme, _, rest = url.partition("://")
    unencoded_at = scheme in ("postgresql", "postgres") and rest.split("?", 1)[0].count("@") > 1
    try:
        conninfo_to_dict(url)
        parsed = True
    except psycopg.ProgrammingError:  # its message and the URL may hold the password: neither is shown
        parsed = False
    if unencoded_at or not parsed:
        raise ConfigError(
            "DATABASE_URL is not a PostgreSQL URL or connection string (postgresql://user:password@host:5432/database;"
            " a password with '@', ':', '/', '#' or '%' must be percent-encoded)"
        )
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    today: date | None
    read_your_writes_timeout: float
    projection_poll_seconds: float
    import_dir: Path
    import_batch_size: int
    projection_page_size: int
    ready_max_lag: int
    db_pool_size: int
    ready_stall_seconds: float = 60.0  # behind with no progress this long: /ready says not ready
    query_cache_size: int = 20_000  # customers whose answers each API process keeps; 0 keeps none
    import_split_size: int = SPLIT_SIZE  # sheet XML bytes from which a helper process reads half
    log_level: int = logging.INFO
    worker_max_memory_mb: int = 200  # a worker's pool process whose peak passed this is replaced after its task; 0: never
    # set by `ledger api` for its worker processes: where they share the projection position they have seen
    api_position_file: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """The settings, each checked: a value that cannot be used raises ConfigError naming it.
        A variable set but empty takes its default."""
        env = os.environ
        return cls(
            database_url=_database_url(env),
            redis_url=_setting(env, "REDIS_URL", "redis://127.0.0.1:6379/0"),
            today=_today(env),
            read_your_writes_timeout=_seconds(env, "READ_YOUR_WRITES_TIMEOUT", 2.0, 0),
            # Beat sends a catch-up this often: a tiny interval floods the queue.
            projection_poll_seconds=_seconds(env, "PROJECTION_POLL_SECONDS", 5, 0.1),
            import_dir=Path(_setting(env, "IMPORT_DIR", str(REPO_ROOT / "data"))),
            import_batch_size=_whole(env, "IMPORT_BATCH_SIZE", 500, 1),
            projection_page_size=_whole(env, "PROJECTION_PAGE_SIZE", 1000, 1),
            ready_max_lag=_whole(env, "READY_MAX_LAG", 1000, 0),
            ready_stall_seconds=_seconds(env, "READY_STALL_SECONDS", 60, 0, above=True),
            db_pool_size=_whole(env, "DB_POOL_SIZE", 10, 1),
            query_cache_size=_whole(env, "QUERY_CACHE_SIZE", 20_000, 0),
            import_split_size=_whole(env, "IMPORT_SPLIT_SIZE", SPLIT_SIZE, 0),  # 0: every sheet split
            log_level=log_level(env),
            worker_max_memory_mb=_whole(env, "WORKER_MAX_MEMORY_MB", 200, 0),
            api_position_file=env.get("LEDGER_API_POSITION_FILE") or None,
        )

    def clock(self) -> Clock:
        return FixedClock(self.today) if self.today else SystemClock()

    def eventsourcing_env(self, create_table: bool = False) -> dict[str, str]:
        """The eventsourcing library's settings: the event store's from DATABASE_URL, and the ones
        the ledger's own SQL relies on, pinned.

        The library reads its settings from the process environment too, and an application's
        name before the plain one (`LEDGER_POSTGRES_SCHEMA` before `POSTGRES_SCHEMA`). Each is
        given here under both names, so a variable meant for something else (`POSTGRES_SCHEMA` or
        `LEDGER_POSTGRES_DBNAME` in a deployment's environment) cannot move the events away from
        the database and tables that the projection, the ID sequences and the insert function
        use. The library's tuning settings not given here (`POSTGRES_LOCK_TIMEOUT`,
        `POSTGRES_MAX_OVERFLOW`, ...) still come from the environment.
        """
        parts = conninfo_to_dict(self.database_url)
        settings = {
            # The library's factory, its connections made with every parameter of DATABASE_URL.
            "PERSISTENCE_MODULE": "infra.postgres:LedgerFactory",
            "DATABASE_URL": self.database_url,
            "POSTGRES_DBNAME": str(parts.get("dbname", "ledger")),
            "POSTGRES_HOST": str(parts.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(parts.get("port", "5432")),
            "POSTGRES_USER": str(parts.get("user", "ledger")),
            "POSTGRES_PASSWORD": str(parts.get("password", "")),
            "POSTGRES_GET_PASSWORD_TOPIC": "",  # the password is the URL's, not a function's
            "POSTGRES_POOL_SIZE": str(self.db_pool_size),
            "POSTGRES_CONNECT_TIMEOUT": "2",
            # The tables in the search path's schema, keyed by UUIDs: what the SQL of infra.postgres
            # and projections.projector names.
            "POSTGRES_SCHEMA": "",
            "ORIGINATOR_ID_TYPE": "uuid",
            # No ping before each use (a round trip per command): a connection broken by a server
            # restart fails once and the recorder retries on a fresh one, and the API re-checks
            # every pooled connection when its LISTEN connection comes back (api/app.py).
            "POSTGRES_PRE_PING": "n",
            # Inserts take the table lock, so events commit in notification-ID order and the
            # projection, which reads past its position, never passes over one still to commit.
            # The library's stored-function insert takes no lock: pinned off.
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            # Each save's events in one statement that takes the same lock (infra.postgres).
            "APPLICATION_RECORDER_TOPIC": "infra.postgres:OrderedInsertRecorder",
            "CREATE_TABLE": "y" if create_table else "n",
        }
        return settings | {f"{Ledger.name.upper()}_{key}": value for key, value in settings.items()}
