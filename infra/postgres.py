"""PostgreSQL: the schema setup step, ID sequences and the application wired to the event store."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, ProgrammingError, StoredEvent
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
)
from eventsourcing.utils import retry
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

from infra.config import Settings
from ledger.application import Ledger
from projections import schema as read_model
from projections.projector import lock_holder

log = logging.getLogger(__name__)

SEQUENCES = ("customer_id_seq", "loan_id_seq")
# Held (shared) by every draw of a new loan ID and (exclusive) while an import moves the sequence,
# so the import knows exactly which IDs were handed out before it (PostgresIds.reserve_loan_ids_through).
LOAN_IDS_LOCK = 7_301_121
IMPORT_LOCK = 7_301_122  # one import at a time: each checks the loan IDs the ones before it recorded


class PostgresIds:
    """IDs from PostgreSQL sequences; the import moves them past every imported ID."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def _scalar(self, sql: str, *params: object) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(sql, params).fetchone()
            assert row is not None
            return int(row[0])

    def next_customer_id(self) -> int:
        return self._scalar("SELECT nextval('customer_id_seq')")

    def next_loan_id(self) -> int:
        return self.next_loan_ids(1)[0]

    def next_loan_ids(self, count: int) -> list[int]:
        # The lock is released as the statement's transaction ends: it only orders this draw
        # before or after an import's reservation, never in the middle of it.
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT nextval('loan_id_seq') FROM pg_advisory_xact_lock_shared(%s), generate_series(1, %s)",
                (LOAN_IDS_LOCK, count),
            ).fetchall()
        return sorted(int(row[0]) for row in rows)

    def _reserve(self, sequence: str, highest: int) -> int:
        """Move `sequence` to at least `highest`; the value it had before."""
        with self._pool.connection() as conn, conn.transaction():
            if sequence == "loan_id_seq":
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOAN_IDS_LOCK,))
            row = conn.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence}").fetchone()
            before = int(row[0]) if row else 0
            if highest > before:
                conn.execute("SELECT setval(%s::regclass, %s)", (sequence, highest))
            return before

    def reserve_customer_ids_through(self, highest: int) -> None:
        self._reserve("customer_id_seq", highest)

    def reserve_loan_ids_through(self, highest: int) -> int:
        return self._reserve("loan_id_seq", highest)


class PostgresIndex:
    """Which aggregates exist, for thousands of IDs in one query on the event store's primary key."""

    def __init__(self, pool: ConnectionPool, table: str = "ledger_events") -> None:
        self._pool = pool
        # The IDs go in psycopg's binary format (%b): dumping 1,500 of them as a text array took
        # 6.7 ms of CPU a batch of the import, in binary 1.7.
        self._query = f"SELECT originator_id FROM {table} WHERE originator_id = ANY(%b) AND originator_version = 1"

    def existing(self, ids: Collection[UUID]) -> set[UUID]:
        if not ids:
            return set()
        with self._pool.connection() as conn:
            return {row[0] for row in conn.execute(self._query, (list(ids),))}


class PostgresLoans:
    """Imported loans without an aggregate of their own, found through the read model's loans table.

    The import catches the projection up before it asks (infra.importer), and imports run one at a
    time, so every loan recorded before an import is in the table when the import checks its IDs."""

    def __init__(self, pool: ConnectionPool, schema: str = read_model.SCHEMA) -> None:
        self._pool = pool
        table = sql.Identifier(schema, "loans")
        self._owner = sql.SQL("SELECT customer_id FROM {} WHERE loan_id = %s").format(table)
        self._taken = sql.SQL("SELECT loan_id FROM {} WHERE loan_id = ANY(%s)").format(table)

    def owner(self, loan_id: int) -> int | None:
        with self._pool.connection() as conn:
            row = conn.execute(self._owner, (loan_id,)).fetchone()
        return int(row[0]) if row else None

    def taken(self, loan_ids: Collection[int]) -> set[int]:
        if not loan_ids:
            return set()
        with self._pool.connection() as conn:
            return {row[0] for row in conn.execute(self._taken, (list(loan_ids),))}


def connect(settings: Settings, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(settings.database_url, connect_timeout=5, **kwargs)  # type: ignore[arg-type]


def setup_schema(settings: Settings) -> None:
    """Create the event store, the ID sequences and the read model, once, before anything runs."""
    Ledger(settings.eventsourcing_env(create_table=True)).close()
    with connect(settings) as conn:
        _compress_events_with_lz4(conn)
        for sequence in SEQUENCES:
            conn.execute(f"CREATE SEQUENCE IF NOT EXISTS {sequence}")
        read_model.create(conn, read_model.SCHEMA)
    log.info("schema ready")


def _compress_events_with_lz4(conn: psycopg.Connection) -> None:
    """An event's JSON state (a customer's whole history: 1.3 KB on average) is compressed as
    PostgreSQL stores it. lz4 does that in half the CPU of the default pglz: about 2 s less of the
    database's time in a 100,000-customer import. Stored events keep the compression they have."""
    column = "SELECT attcompression FROM pg_attribute WHERE attrelid = 'ledger_events'::regclass AND attname = 'state'"
    try:
        with conn.transaction():
            if (conn.execute(column).fetchone() or [None])[0] != "l":  # else no need to lock the table again
                conn.execute("ALTER TABLE ledger_events ALTER COLUMN state SET COMPRESSION lz4")
    except (psycopg.errors.FeatureNotSupported, psycopg.errors.UndefinedColumn) as error:  # no lz4, or before PostgreSQL 14
        log.warning("events stay compressed with pglz: %s", error)


def build_ledger(settings: Settings, pool_size: int = 4, *, check_connections: bool = False) -> tuple[Ledger, ConnectionPool]:
    """The application on PostgreSQL, with sequence IDs and the configured clock. With
    `check_connections` (the worker's), each pooled connection is checked as it is taken (a round
    trip): after a PostgreSQL restart the worker's next import met one the server had closed, and
    waited up to a minute to try again (a review). The API drops its pools' connections itself when
    its listener reconnects, and keeps the round trip off its requests."""
    pool = ConnectionPool(  # sequences and existence checks: single statements, no transaction needed
        settings.database_url,
        min_size=1,
        max_size=pool_size,
        open=True,
        timeout=5,
        kwargs={"connect_timeout": 5, "autocommit": True},
        check=ConnectionPool.check_connection if check_connections else None,
    )
    env = settings.eventsourcing_env()
    if check_connections:
        env["POSTGRES_PRE_PING"] = env["LEDGER_POSTGRES_PRE_PING"] = "y"  # the library's pool, the same way
    try:
        app = Ledger(
            env,
            ids=PostgresIds(pool),
            clock=settings.clock(),
            index=PostgresIndex(pool),
            loans=PostgresLoans(pool),
        )
    except BaseException:  # no connection, say: nothing is left trying to make them
        pool.close()
        raise
    _append_in_binary(app.recorder)
    return app, pool


class LedgerFactory(PostgresFactory):
    """The library's factory, whose connections take every parameter of DATABASE_URL. The library
    passes its pool only the host, port, database, user and password: `?sslmode=verify-full`
    (or `sslrootcert`, `options`, `target_session_attrs`) was dropped, and the events and the
    password went over plain TCP where the URL asked for TLS (a review). The pool has made no
    connection yet: it opens on its first use."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.datastore.pool.conninfo = self.env.get("DATABASE_URL") or ""  # the library's own parameters win


# An aggregate's latest snapshot and its events after it, in one statement (snapshot first).
SELECT_LATEST = (
    "WITH snapshot AS (SELECT originator_version, topic, state FROM {snapshots}"
    " WHERE originator_id = %(id)s ORDER BY originator_version DESC LIMIT 1)"
    " SELECT true, originator_version, topic, state FROM snapshot"
    " UNION ALL SELECT false, originator_version, topic, state FROM {events}"
    " WHERE originator_id = %(id)s AND originator_version > COALESCE((SELECT originator_version FROM snapshot), 0)"
    " ORDER BY 1 DESC, 2"
)
# The same for many aggregates, each through the tables' primary keys (LATERAL, and OFFSET 0 so
# that the planner cannot flatten the events' subquery into a join): on a store just filled by an
# import, with no statistics yet, it chose a hash join over every event, 44 ms a call for 500 IDs
# instead of 8.
SELECT_LATEST_MANY = (
    "WITH ids AS (SELECT DISTINCT id FROM unnest(%(ids)s::uuid[]) AS given(id)),"
    " snapshot AS (SELECT ids.id, s.originator_version, s.topic, s.state FROM ids CROSS JOIN LATERAL"
    " (SELECT originator_version, topic, state FROM {snapshots} WHERE originator_id = ids.id"
    " ORDER BY originator_version DESC LIMIT 1) AS s)"
    " SELECT true, id, originator_version, topic, state FROM snapshot"
    " UNION ALL SELECT false, ids.id, e.originator_version, e.topic, e.state FROM ids"
    " LEFT JOIN snapshot ON snapshot.id = ids.id CROSS JOIN LATERAL"
    " (SELECT originator_version, topic, state FROM {events} WHERE originator_id = ids.id"
    " AND originator_version > COALESCE(snapshot.originator_version, 0) OFFSET 0) AS e"
    " ORDER BY 2, 1 DESC, 3"
)


class OrderedInsertRecorder(PostgresApplicationRecorder):
    """The library's recorder, inserting each save's events in one statement: a stored function
    that takes the table lock, NOTIFYs the library's channel and inserts the events, committed as
    the statement ends.

    The library's insert sends the same steps in a pipeline (BEGIN, SET LOCAL lock_timeout, LOCK
    TABLE, NOTIFY, INSERT, sync, COMMIT), and holds the table's lock from LOCK TABLE to COMMIT,
    across round trips: every save of every process waits its turn behind it. Here the lock lasts
    as long as the function and its commit. Same lock, same order: events still commit in
    notification-ID order, so the projection never passes over one still to commit. (The
    library's own stored function, POSTGRES_ENABLE_DB_FUNCTIONS, takes no lock: off, config.py.)

    `ledger setup` creates the function with the tables. A process that finds it missing (a store
    an earlier version set up) says so, and writes the library's way, looking for the function
    again every FUNCTION_RETRY_SECONDS: once `ledger setup` has made it, saves go through it
    without a restart.
    """

    FUNCTION_RETRY_SECONDS = 60.0

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        function = sql.Identifier(datastore.schema, f"{self.events_table_name}_insert_in_order")
        self.sql_create_statements.append(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {function}(events {schema}.{event}[], lock_timeout text) RETURNS SETOF bigint"
                " LANGUAGE plpgsql AS $body$ BEGIN"
                " PERFORM set_config('lock_timeout', lock_timeout, true);"
                " LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE;"
                " NOTIFY {channel};"
                " RETURN QUERY INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state)"
                " SELECT originator_id, originator_version, topic, state FROM unnest(events) RETURNING notification_id;"
                " END; $body$"
            ).format(
                function=function,
                schema=sql.Identifier(datastore.schema),
                event=sql.Identifier(self.stored_event_type_name),
                table=sql.Identifier(self.events_table_name),
                channel=sql.Identifier(self.channel_name),
            )
        )
        # Its events in psycopg's binary format (%b), as `_append_in_binary` sends the library's; the
        # lock timeout this process was given (POSTGRES_LOCK_TIMEOUT), as the library sets it.
        self._insert_in_order = sql.SQL("SELECT * FROM {}(%b, %s) AS appended_notification_id").format(function).as_string()
        self._lock_timeout = f"{datastore.lock_timeout}s"
        self._function_missing_since: float | None = None  # when the function was last found missing
        self._select_latest: dict[tuple[str, str], str] = {}  # by the snapshots' schema and table
        self._select_latest_many: dict[tuple[str, str], str] = {}

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Undecorated: `Ledger` makes the retries, knowing which inserts were tried again."""
        if not stored_events:
            return None
        missing_since = self._function_missing_since
        if missing_since is not None:
            if time.monotonic() - missing_since < self.FUNCTION_RETRY_SECONDS:
                return self._pipelined(stored_events, **kwargs)
            self._function_missing_since = None  # look again: `ledger setup` may have made it since
        events = [self.construct_pg_stored_event(e.originator_id, e.originator_version, e.topic, e.state) for e in stored_events]
        try:
            with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
                assert conn.autocommit  # the statement commits, and frees the lock, as it ends
                cursor.execute(self._insert_in_order, (events, self._lock_timeout), prepare=True)
                return [int(row[0]) for row in cursor.fetchall()]
        except ProgrammingError as error:
            if not isinstance(error.__cause__, psycopg.errors.UndefinedFunction):
                raise
            log.warning("the event store has no function to insert in order (run `ledger setup`): inserting the library's way")
            self._function_missing_since = time.monotonic()
            return self._pipelined(stored_events, **kwargs)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)  # as the library's select_events
    def select_latest(
        self, originator_id: UUID, snapshots: PostgresAggregateRecorder
    ) -> tuple[StoredEvent | None, list[StoredEvent]]:
        """An aggregate's latest snapshot in `snapshots` (None if it has none) and its events after
        that snapshot, in one statement (so from one moment of the database) and one round trip:
        the library's repository makes two, the snapshot's, then the events'. (Snapshots kept in
        another database are read the library's way.)"""
        if snapshots.datastore is not self.datastore:
            latest = snapshots.select_events(originator_id, desc=True, limit=1)
            snapshot = latest[0] if latest else None
            return snapshot, list(self.select_events(originator_id, gt=snapshot.originator_version if snapshot else None))
        statement = self._latest_statement(self._select_latest, snapshots, SELECT_LATEST)
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(statement, {"id": originator_id}, prepare=True)
            rows = cursor.fetchall()
        stored = [StoredEvent(originator_id, version, topic, bytes(state)) for _, version, topic, state in rows]
        if rows and rows[0][0]:
            return stored[0], stored[1:]
        return None, stored

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_latest_many(
        self, originator_ids: Collection[UUID], snapshots: PostgresAggregateRecorder
    ) -> dict[UUID, tuple[StoredEvent | None, list[StoredEvent]]]:
        """`select_latest` for many aggregates in one statement: those with no event are left out.
        A re-import finds every customer of its file recorded already, and reading them one round
        trip each took most of its time."""
        if snapshots.datastore is not self.datastore:  # read the library's way, one at a time
            each = {i: self.select_latest(i, snapshots) for i in originator_ids}
            return {i: (snapshot, events) for i, (snapshot, events) in each.items() if snapshot is not None or events}
        statement = self._latest_statement(self._select_latest_many, snapshots, SELECT_LATEST_MANY)
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor(row_factory=tuple_row) as cursor:
            # Without statistics (a store just filled) the planner takes each ID for thousands of
            # events, and the cost it sees has PostgreSQL compile the statement (JIT) at every call:
            # up to 94 ms a call, and 3-10 s of a re-import of a million loans (bench/README item 27).
            cursor.execute("SET LOCAL jit = off")
            cursor.execute(statement, {"ids": list(originator_ids)}, prepare=True)
            rows = cursor.fetchall()
        found: dict[UUID, tuple[StoredEvent | None, list[StoredEvent]]] = {}
        for is_snapshot, originator_id, version, topic, state in rows:
            stored = StoredEvent(originator_id, version, topic, bytes(state))
            events = found.setdefault(originator_id, (None, []))[1]
            if is_snapshot:
                found[originator_id] = (stored, events)
            else:
                events.append(stored)
        return found

    def _latest_statement(self, made: dict[tuple[str, str], str], snapshots: PostgresAggregateRecorder, text: str) -> str:
        """`text` for the `snapshots` table (made once for each, kept in `made`)."""
        key = (snapshots.datastore.schema, snapshots.events_table_name)
        statement = made.get(key)
        if statement is None:
            statement = made[key] = (
                sql.SQL(text)
                .format(snapshots=sql.Identifier(*key), events=sql.Identifier(self.datastore.schema, self.events_table_name))
                .as_string()
            )
        return statement

    @property
    def _without_function(self) -> bool:
        """Whether saves go the library's way: the function was missing when last looked for."""
        return self._function_missing_since is not None

    def _pipelined(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        library = PostgresApplicationRecorder.insert_events
        return getattr(library, "__wrapped__", library)(self, stored_events, **kwargs)


def _append_in_binary(recorder: object) -> None:
    """Send the array of new events in psycopg's binary format instead of its text format.

    The library's INSERT passes the events as one array of its composite type with a `%s`
    placeholder, which psycopg dumps as text: every byte of every event's state escaped as hex
    through a regular expression, in Python (a fifth of an import's time). The composite type is
    registered on the library's connections, so psycopg can dump the same array in binary (`%b`).
    """
    statement = getattr(recorder, "insert_events_statement", None)
    if not isinstance(statement, sql.Composed):
        return
    parts = [
        sql.SQL(part.as_string().replace("unnest(%s::", "unnest(%b::")) if isinstance(part, sql.SQL) else part
        for part in statement
    ]
    recorder.insert_events_statement = sql.Composed(parts)  # type: ignore[attr-defined]


@contextlib.contextmanager
def exclusive(settings: Settings, key: int = IMPORT_LOCK, *, wait: bool = False) -> Iterator[psycopg.Connection | None]:
    """Hold a session advisory lock (by default: the one import at a time) while the block runs;
    yields the connection that holds it, or None if someone else holds it (with `wait`, waits for
    it). The lock dies with its connection: a killed worker frees it, and a holder whose host
    vanished frees it within about a minute (`projections.projector.lock_holder`). So a long
    holder checks with `still_held` that its connection is alive, or the lock may be another's."""
    with lock_holder(settings.database_url) as conn:
        if wait:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            acquired = True
        else:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            acquired = bool(row and row[0])
        try:
            yield conn if acquired else None
        finally:
            if acquired:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                except psycopg.OperationalError:  # the session ended, and the lock with it
                    log.warning("the connection holding lock %d was gone when the lock was to be released", key)


def still_held(conn: psycopg.Connection) -> bool:
    """Whether `conn`, which holds an advisory lock, is still alive (the server may have ended its
    session, and its locks went with it)."""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True
