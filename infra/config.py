"""Configuration from environment variables, with defaults that work on a developer's machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from infra.xlsx_split import SPLIT_SIZE
from ledger.application import Ledger
from ledger.ports import Clock, FixedClock, SystemClock

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    # set by `ledger api` for its worker processes: where they share the projection position they have seen
    api_position_file: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        today = env.get("LEDGER_TODAY")
        return cls(
            database_url=env.get("DATABASE_URL", "postgresql://ledger@127.0.0.1:5432/ledger"),
            redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            today=date.fromisoformat(today) if today else None,
            read_your_writes_timeout=float(env.get("READ_YOUR_WRITES_TIMEOUT", "2.0")),
            projection_poll_seconds=float(env.get("PROJECTION_POLL_SECONDS", "5")),
            import_dir=Path(env.get("IMPORT_DIR", str(REPO_ROOT / "data"))),
            import_batch_size=int(env.get("IMPORT_BATCH_SIZE", "500")),
            projection_page_size=int(env.get("PROJECTION_PAGE_SIZE", "1000")),
            ready_max_lag=int(env.get("READY_MAX_LAG", "1000")),
            ready_stall_seconds=float(env.get("READY_STALL_SECONDS", "60")),
            db_pool_size=int(env.get("DB_POOL_SIZE", "10")),
            query_cache_size=int(env.get("QUERY_CACHE_SIZE", "20000")),
            import_split_size=int(env.get("IMPORT_SPLIT_SIZE", str(SPLIT_SIZE))),
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
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
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
