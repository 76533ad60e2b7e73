"""Turns the notification log into read-model rows, a page of events per transaction.

Each page's rows and the new tracking position commit together, so an event is
applied exactly once and in order whatever crashes. A PostgreSQL advisory lock lets
one worker at a time advance the projection. The commit also NOTIFYs the new position,
which is how the API learns, without polling, that a command's events are visible.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import resolve_topic
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger.application import Ledger
from ledger.domain import Customer, ImportJob, Loan
from ledger.mapper import TypedMapper
from projections import schema as read_model

log = logging.getLogger(__name__)

PROJECTION = "ledger"
NOTIFY_CHANNEL = "ledger_projection"
# Just before the position, the customers whose rows the page changed (`changes_notice`). The API
# drops what it kept for them. New customers need not be named: nothing is kept for a customer the
# read model did not have.
CHANGES_CHANNEL = "ledger_projection_changes"
STORE_RECREATED = 0  # the position announced when the event store was recreated and the read model emptied
_CHANGES_LISTED = 7_900  # bytes: a NOTIFY payload holds less than 8,000
LOCK_KEY = 7_301_120  # the advisory lock that one projection runner holds at a time
# A session holding an advisory lock has the server probe its peer: the locks of a worker whose host
# vanishes (power cut, network partition) are freed after about a minute (30 s idle, then 3 probes
# 10 s apart), not the two hours and more of the kernel's defaults. Set per session: they need no
# change to the server's configuration (on a Unix socket they do nothing, and nothing is needed).
_PROBE_PEER = (
    "SELECT set_config('tcp_keepalives_idle', '30', false), set_config('tcp_keepalives_interval', '10', false),"
    " set_config('tcp_keepalives_count', '3', false)"
)
PAGE_SIZE = 1000
REBUILD_PAGE_SIZE = 5000  # a rebuild has no reader waiting on each page: fewer, larger transactions


def events_table(app: Ledger | type[Ledger]) -> str:
    """The table that holds the application's events (the library's default name)."""
    return f"{app.name.lower()}_events"


Progress = Callable[[int, int], None]
# A row of the event store, as a page of notifications reads it (in psycopg's binary format:
# the library's select_notifications reads each state as hex text and builds a dict a row, which
# took two thirds of a rebuild's reading).
Stored = tuple[int, UUID, int, str, bytes]  # notification_id, originator_id, originator_version, topic, state

# The events that change the read model; the others (phone claims, file links, idempotency
# records, `Loan.Opened`) are never decoded.
_PROJECTED = (
    Customer.Registered,
    Customer.HistoryImported,
    Customer.HistoryExtended,
    Customer.Imported,
    Loan.Booked,
    Loan.Imported,
    Loan.RepaymentRecorded,
    ImportJob.Event,
)


def changes_notice(position: int, customer_ids: Iterable[int]) -> str:
    """ "<position> <id>,<id>,...", or "<position> *" (anyone) when the list would not fit a NOTIFY."""
    listed = ",".join(map(str, customer_ids))
    return f"{position} {listed if len(listed) <= _CHANGES_LISTED else '*'}"


@cache
def _projected(topic: str) -> type | None:
    cls = resolve_topic(topic)
    return cls if issubclass(cls, _PROJECTED) else None


def _loan_row(e: Any, customer_id: int, origin: str) -> tuple[Any, ...]:
    """A loan's row from `Loan.Booked`, (older imports) `Loan.Imported`, or the `LoanTerms` a
    customer's `HistoryImported` / `HistoryExtended` carries. `Loan.Opened` adds no row: the
    loan's row came with its customer's history."""
    return (
        e.loan_id,
        customer_id,
        getattr(e, "source_loan_id", None),
        e.amount,
        e.interest_rate,
        e.tenure,
        e.monthly_installment,
        e.start_date,
        e.end_date,
        getattr(e, "emis_paid", 0),
        getattr(e, "emis_paid_on_time", 0),
        origin,
    )


def _customer_row(e: Any, origin: str, position: int) -> list[Any]:
    return [
        getattr(e, "source_customer_id", None),
        e.customer_id,
        e.first_name,
        e.last_name,
        e.age,
        e.phone_number,
        e.monthly_income,
        e.approved_limit,
        origin,
        e.timestamp,
        position,
    ]


def _repayment_row(e: Any) -> tuple[Any, ...]:
    """The repayments row, then the loan's new counts (the last 3 fields, for its UPDATE)."""
    return (e.loan_id, e.installment, e.paid_on, e.due_date, e.on_time, e.amount, e.emis_paid, e.emis_paid_on_time, e.loan_id)


SMALL_PAGE = 50  # pages up to this many events are written in one pipeline, without COPY
_NULL = "\\N"  # COPY's text for NULL


# gc=False: the garbage collector need not track these (they hold no cycles, only strings, numbers
# and a list of loans), which makes decoding a million loans take 1.0 µs each instead of 1.7.
class _LoanText(msgspec.Struct, gc=False):
    """A loan in a stored `Customer.HistoryImported` state (`LoanTerms`), with its numbers and
    dates left as the strings the mapper wrote: PostgreSQL parses them as it parses psycopg's."""

    loan_id: int
    amount: str
    interest_rate: str
    tenure: int
    monthly_installment: str
    start_date: str
    end_date: str
    emis_paid: int = 0
    emis_paid_on_time: int = 0
    source_loan_id: int | None = None


class _HistoryText(msgspec.Struct, gc=False):
    """The fields of a stored `Customer.HistoryImported` state that the read model keeps."""

    timestamp: str
    customer_id: int
    first_name: str
    last_name: str
    age: int
    phone_number: str
    monthly_income: str
    approved_limit: str
    loans: list[_LoanText]
    source_customer_id: int | None = None


_history_text = msgspec.json.Decoder(_HistoryText)


def _jsonb(value: Any) -> Jsonb:
    # msgspec writes JSON about 8 times as fast as json.dumps: a big import's summary is megabytes.
    return Jsonb(value, dumps=msgspec.json.encode)


class _Rows:
    """How rows go into one read-model table: COPY for many, INSERTs for a few."""

    def __init__(self, schema: str, table: str, columns: str) -> None:
        self.columns = columns
        target = sql.SQL("{} ({})").format(sql.Identifier(schema, table), sql.SQL(columns))
        self.copy = sql.SQL("COPY {} FROM STDIN").format(target)
        placeholders = sql.SQL(", ").join(sql.Placeholder() * len(columns.split(",")))
        self.insert = sql.SQL("INSERT INTO {} VALUES ({})").format(target, placeholders)

    def write(self, cur: psycopg.Cursor[Any], rows: Sequence[Sequence[Any]], small: bool, text: Sequence[str] = ()) -> None:
        """Write `rows`, and `text`: lines already in COPY's text format (pages of COPY only)."""
        if not rows and not text:
            return
        if small:
            assert not text, "a page of INSERTs has no COPY text"
            cur.executemany(self.insert, rows)
            return
        with cur.copy(self.copy) as copy:
            if text:
                copy.write("".join(text))
            for row in rows:
                copy.write_row(row)


@dataclass
class _Page:
    """A page of events as the rows it writes."""

    position: int  # the page's last notification ID
    size: int  # its events, projected or not
    last: tuple[UUID, int] | None = None  # the aggregate and version of the event at `position`
    customers: list[list[Any]] = field(default_factory=list)
    loans: list[tuple[Any, ...]] = field(default_factory=list)
    repayments: list[tuple[Any, ...]] = field(default_factory=list)
    jobs: list[DomainEventProtocol[Any]] = field(default_factory=list)
    customer_text: list[str] = field(default_factory=list)  # rows as COPY text lines
    loan_text: list[str] = field(default_factory=list)
    # customer_id -> position of the page's last loan event for them; loan_id -> of its last repayment
    loan_changes: dict[int, int] = field(default_factory=dict)
    repayment_changes: dict[int, int] = field(default_factory=dict)

    @property
    def small(self) -> bool:
        return self.size <= SMALL_PAGE

    def customer_versions(self) -> tuple[list[int], list[int]]:
        """Stamp the page's new customers with their loans' positions; the rest need an UPDATE."""
        for row in self.customers:
            row[-1] = max(row[-1], self.loan_changes.pop(row[1], 0))
        return list(self.loan_changes), list(self.loan_changes.values())


class Projector:
    """Projects the event store into the read model in `schema`.

    With `bulk_load`, the schema's tables were set up for a bulk load
    (`read_model.create(..., bulk=True)`, without their indexes): the load is finished, and the
    indexes built, before the first page that updates rows by key, or by `finish_bulk_load`.
    """

    def __init__(
        self, app: Ledger, conninfo: str, schema: str = read_model.SCHEMA, page_size: int = PAGE_SIZE, *, bulk_load: bool = False
    ) -> None:
        self.app = app
        self.conninfo = conninfo
        self.schema = schema
        self.page_size = page_size
        self.bulk_load = bulk_load
        s = sql.Identifier(schema)
        # Rows go in by COPY: many times faster than INSERTs for the pages of an import or a rebuild.
        # A page of a few events (after a command) goes in by INSERTs sent in one pipeline instead:
        # COPY costs round trips of its own, and a pipeline sends the whole transaction at once.
        self._customers = _Rows(
            schema,
            "customers",
            "source_customer_id, customer_id, first_name, last_name, age, phone_number,"
            " monthly_income, approved_limit, origin, recorded_at, version",
        )
        self._loans = _Rows(
            schema,
            "loans",
            "loan_id, customer_id, source_loan_id, loan_amount, interest_rate, tenure,"
            " monthly_installment, start_date, end_date, emis_paid, emis_paid_on_time, origin",
        )
        self._repayments = _Rows(schema, "repayments", "loan_id, installment, paid_on, due_date, on_time, amount")
        self._loan_payments = sql.SQL("UPDATE {}.loans SET emis_paid = %s, emis_paid_on_time = %s WHERE loan_id = %s").format(s)
        self._customer_versions = sql.SQL(
            "UPDATE {0}.customers c SET version = v.position"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v (customer_id, position)"
            " WHERE c.customer_id = v.customer_id AND c.version < v.position"
        ).format(s)
        self._versions_by_loan = sql.SQL(
            "UPDATE {0}.customers c SET version = v.position"
            " FROM (SELECT l.customer_id, max(r.position) AS position"
            "       FROM unnest(%s::bigint[], %s::bigint[]) AS r (loan_id, position)"
            "       JOIN {0}.loans l USING (loan_id) GROUP BY l.customer_id) v"
            " WHERE c.customer_id = v.customer_id AND c.version < v.position"
            " RETURNING c.customer_id"
        ).format(s)
        self._tracking = sql.Identifier(schema, "tracking")
        self._jobs = sql.Identifier(schema, "import_jobs")
        self._job_progressed = sql.SQL(
            "UPDATE {} SET rows_done = %s, issues = issues || %s, updated_at = %s WHERE job_id = %s"
        ).format(self._jobs)
        self._events_table = events_table(app)
        self._page = sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {}"
            " WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(sql.Identifier(self._events_table))
        self._state = sql.SQL(
            "SELECT t.position, {same}, %s::regclass::oid FROM (SELECT 1) one LEFT JOIN {} t ON t.projection = %s"
        ).format(self._tracking, same=read_model.same_store(self._events_table))
        self._track = sql.SQL(
            "INSERT INTO {} (projection, position, events_table, originator_id, originator_version, identified_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position,"
            " events_table = EXCLUDED.events_table, originator_id = EXCLUDED.originator_id,"
            " originator_version = EXCLUDED.originator_version, identified_at = EXCLUDED.identified_at"
        ).format(self._tracking)
        # A page of a few new customers and loans (what commands record) is one statement, its own
        # transaction: the rows, the customers' versions, the tracking position and the notices
        # together. Its rows come as JSON arrays, which PostgreSQL reads as each column's text.
        # As seven statements and more in a pipeline, psycopg's work for each was most of the
        # worker's share of a booking (bench/README.md, item 19).
        self._live = schema == read_model.SCHEMA  # the API listens to this schema's notices
        notices = sql.SQL("pg_notify(%s, %s), pg_notify(%s, %s)" if self._live else "NULL")
        self._small_page = sql.SQL(
            "WITH customers AS ("
            "INSERT INTO {0}.customers ({customer_columns})"
            " SELECT (r->>0)::bigint, (r->>1)::bigint, r->>2, r->>3, (r->>4)::integer, r->>5,"
            " (r->>6)::numeric, (r->>7)::numeric, r->>8, (r->>9)::timestamptz, (r->>10)::bigint"
            " FROM jsonb_array_elements(%s) r"
            "), loans AS ("
            "INSERT INTO {0}.loans ({loan_columns})"
            " SELECT (r->>0)::bigint, (r->>1)::bigint, (r->>2)::bigint, (r->>3)::numeric, (r->>4)::numeric,"
            " (r->>5)::integer, (r->>6)::numeric, (r->>7)::date, (r->>8)::date, (r->>9)::integer,"
            " (r->>10)::integer, r->>11"
            " FROM jsonb_array_elements(%s) r"
            # The versions as a pipelined page updates them: over `unnest`, whose row count the
            # planner reads from the arrays (a join over JSON rows it would plan for 100 of them,
            # scanning every customer).
            "), versions AS ({versions}), tracked AS ({track}) SELECT {notices}"
        ).format(
            s,
            customer_columns=sql.SQL(self._customers.columns),
            loan_columns=sql.SQL(self._loans.columns),
            versions=self._customer_versions,
            track=self._track,
            notices=notices,
        )
        self._last = sql.SQL("SELECT max(notification_id) FROM {}").format(sql.Identifier(self._events_table))
        self._unlock = sql.SQL("SELECT pg_advisory_unlock(%s), ({})").format(self._last)
        self._conn: psycopg.Connection | None = None
        self._position = 0
        self._events_oid = 0

    # Running

    def connect(self) -> psycopg.Connection:
        return lock_holder(self.conninfo)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def catch_up(self, progress: Progress | None = None, *, wait: bool = False) -> int | None:
        """Apply every event not yet applied. None when another runner holds the lock; with `wait`,
        wait for the lock instead, so every event recorded before the call is applied on return.

        The connection stays open between calls (a new one costs more than a small page);
        after any error it is closed, which also frees the lock, and the next call reconnects.
        """
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            try:
                return self._catch_up(self._conn, progress, wait)
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:  # a fresh connection failed too: the database is away
                    raise
                # The kept connection may have died with a server restart: once more, on a new one.
            except psycopg.errors.UndefinedColumn:
                self.close()
                if attempt == 2:
                    raise
                # Tables made by an earlier version (its rebuild, during a rolling deploy) lack a
                # column this one reads: add what is missing (the DDL only adds), then once more.
                log.warning("the read model %s lacks columns this version needs: adding them", self.schema, exc_info=True)
                with self.connect() as conn:
                    read_model.create(conn, self.schema)
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def catch_up_if_behind(self) -> int | None:
        """`catch_up`, unless the store holds no event past what this projector applied last (one
        query on the kept connection, where a catch-up with nothing to do costs four)."""
        if self._conn is not None and not self._conn.closed:
            try:
                last = self._conn.execute(self._last).fetchone()
            except psycopg.OperationalError:
                self.close()  # `catch_up` says whether the database is away
            else:
                if last is None or last[0] is None or last[0] <= self._position:
                    return 0
        return self.catch_up()

    def _catch_up(self, conn: psycopg.Connection, progress: Progress | None, wait: bool = False) -> int | None:
        applied = 0
        while True:
            if wait:
                conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                wait = False
            else:
                locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
                if not (locked and locked[0]):
                    return None if applied == 0 else applied
            try:
                applied += self._run_locked(conn, progress)
            finally:
                row = conn.execute(self._unlock, (LOCK_KEY,)).fetchone()
            # A trigger that arrived while we held the lock found it busy and left
            # its events to us: look once more now that the lock is free.
            if row is None or row[1] is None or self._position >= row[1]:
                return applied

    def run_holding_lock(self, conn: psycopg.Connection, progress: Progress | None = None) -> int:
        """Catch up on a connection that already holds the lock (the rebuild does)."""
        return self._run_locked(conn, progress)

    def _run_locked(self, conn: psycopg.Connection, progress: Progress | None) -> int:
        page = self._read_page(conn, self._prepare(conn))
        if page is None or page.size < self.page_size:  # the usual case after a command: one page, no reader thread
            if page is not None:
                self.apply_page(conn, page)
                if progress is not None:
                    progress(self._position, self._position)
            return 0 if page is None else page.size
        last = self.app.recorder.max_notification_id() or 0
        applied = 0
        # The next page is read and decoded, on a connection of its own, while this one is
        # written: the database and this process overlap.
        with self.connect() as reading, ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection-read") as reader:
            while page is not None:
                next_page = reader.submit(self._read_page, reading, page.position)
                self.apply_page(conn, page)
                applied += page.size
                if progress is not None:
                    progress(self._position, max(last, self._position))
                page = next_page.result()
        return applied

    def _read_page(self, conn: psycopg.Connection, after: int) -> _Page | None:
        stored: list[Stored] = conn.execute(self._page, (after, self.page_size), binary=True).fetchall()  # type: ignore[assignment]
        return self.collect(stored) if stored else None

    def position(self, conn: psycopg.Connection) -> int:
        row = conn.execute(
            sql.SQL("SELECT position FROM {} WHERE projection = %s").format(self._tracking), (PROJECTION,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _prepare(self, conn: psycopg.Connection) -> int:
        """Read the position, and check that tracking belongs to this event store: if the store
        was recreated, empty the read model and start again from zero."""
        row = conn.execute(self._state, (self._events_table, self._events_table, PROJECTION)).fetchone()
        assert row is not None
        position, same, self._events_oid = row
        if position is not None and not same:
            log.warning(
                "the event store no longer holds the events the read model was made from: emptying %s to replay it", self.schema
            )
            with conn.transaction():  # new tables, as a rebuild makes: the API's kept answers go with the old
                read_model.drop(conn, self.schema)
                read_model.create(conn, self.schema)
                if self._live:  # a position no changes notice describes: drop them all
                    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(STORE_RECREATED)))
            position = None
        self._position = int(position or 0)
        return self._position

    # Applying

    def collect(self, stored: Sequence[Stored]) -> _Page:
        """A page of stored events (in notification order) as the rows it writes."""
        page = _Page(stored[-1][0], len(stored), (stored[-1][1], stored[-1][2]))
        for notification_id, originator_id, originator_version, topic, state in stored:
            kind = _projected(topic)
            if kind is None:
                continue
            if kind is Customer.HistoryImported and not page.small and self._copy_text(page, state, notification_id):
                continue
            event = self.app.mapper.to_domain_event(StoredEvent(originator_id, originator_version, topic, state))
            self._collect(page, event, notification_id)
        return page

    def apply_page(self, conn: psycopg.Connection, page: _Page) -> int:
        """Write one page and move the tracking position, in one transaction (on a connection
        that holds the lock and has been through `_prepare`)."""
        position, small = page.position, page.small
        changed = set(page.loan_changes)
        changed_customers, changed_at = page.customer_versions()
        identity = (*page.last, position) if page.last else (None, None, None)
        if small and conn.autocommit and not (page.repayments or page.jobs or self.bulk_load):
            notices = (CHANGES_CHANNEL, changes_notice(position, changed), NOTIFY_CHANNEL, str(position)) if self._live else ()
            conn.execute(
                self._small_page,
                (
                    _jsonb(page.customers),
                    _jsonb(page.loans),
                    changed_customers,
                    changed_at,
                    PROJECTION,
                    position,
                    self._events_oid,
                    *identity,
                    *notices,
                ),
            )
            self._position = position
            return position
        finish_load = self.bulk_load and bool(page.repayments or changed_customers)
        with conn.pipeline() if small else contextlib.nullcontext(), conn.transaction(), conn.cursor() as cur:
            if finish_load:  # the UPDATEs below find their rows by key
                self._finish_bulk_load(conn)
            self._customers.write(cur, page.customers, small, page.customer_text)
            self._loans.write(cur, page.loans, small, page.loan_text)
            if page.repayments:  # after the loans: a loan and its repayments may share a page
                self._repayments.write(cur, [r[:6] for r in page.repayments], small)
                cur.executemany(self._loan_payments, [r[6:] for r in page.repayments])
                # Its own cursor: in a pipeline, `cur` may still be receiving the results of the
                # statements before, and its fetch would take one of those for this one's.
                with conn.cursor() as returning:
                    returning.execute(
                        self._versions_by_loan, (list(page.repayment_changes), list(page.repayment_changes.values()))
                    )
                    changed.update(row[0] for row in returning.fetchall())
            if changed_customers:
                cur.execute(self._customer_versions, (changed_customers, changed_at))
            self._apply_jobs(cur, page.jobs)
            cur.execute(self._track, (PROJECTION, position, self._events_oid, *identity))
            if self._live:
                cur.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, changes_notice(position, changed)))
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(position)))
        self._position = position
        if finish_load:
            self.bulk_load = False
        return position

    def finish_bulk_load(self, conn: psycopg.Connection) -> None:
        """Build the indexes a bulk load left out, unless a page needed them already."""
        if self.bulk_load:
            with conn.transaction():
                self._finish_bulk_load(conn)
            self.bulk_load = False

    def _finish_bulk_load(self, conn: psycopg.Connection) -> None:
        log.info("building the indexes of read model %s", self.schema)
        read_model.finish_bulk_load(conn, self.schema)

    def _copy_text(self, page: _Page, state: bytes, position: int) -> bool:
        """Add a stored `Customer.HistoryImported` state's customer and loans to the page as COPY
        text, straight from its JSON: decoding each loan's Decimals and dates, and having psycopg
        format them again, was most of a rebuild's time. False when the state must go through
        its domain event instead: JSON the mapper would not decode by the class's types (the
        library's tagged JSON, or a later version of the event to upcast), or a string with a JSON
        escape (a tab, a newline or a backslash would need COPY's escaping; no other string can
        hold them).
        """
        mapper = self.app.mapper
        typed = isinstance(mapper, TypedMapper) and mapper.typed_json(Customer.HistoryImported, state)
        if not typed or b"\\" in state:
            return False
        try:
            e = _history_text.decode(state)
        except msgspec.MsgspecError:
            return False  # the domain event's decoding says what is wrong with it
        customer_id = e.customer_id
        source_id = _NULL if e.source_customer_id is None else e.source_customer_id
        page.customer_text.append(
            f"{source_id}\t{customer_id}\t{e.first_name}\t{e.last_name}\t{e.age}\t{e.phone_number}\t"
            f"{e.monthly_income}\t{e.approved_limit}\timported\t{e.timestamp}\t{position}\n"
        )
        page.loan_text += [
            f"{t.loan_id}\t{customer_id}\t{_NULL if t.source_loan_id is None else t.source_loan_id}\t{t.amount}\t"
            f"{t.interest_rate}\t{t.tenure}\t{t.monthly_installment}\t{t.start_date}\t{t.end_date}\t"
            f"{t.emis_paid}\t{t.emis_paid_on_time}\timported\n"
            for t in e.loans
        ]
        return True

    @staticmethod
    def _collect(page: _Page, event: DomainEventProtocol[Any], position: int) -> None:
        if isinstance(event, Customer.Registered):
            page.customers.append(_customer_row(event, "registered", position))
        elif isinstance(event, Customer.HistoryImported):
            page.customers.append(_customer_row(event, "imported", position))
            page.loans += [_loan_row(terms, event.customer_id, "imported") for terms in event.loans]
        elif isinstance(event, Customer.HistoryExtended):
            page.loans += [_loan_row(terms, event.customer_id, "imported") for terms in event.loans]
            page.loan_changes[event.customer_id] = position
        elif isinstance(event, Customer.Imported):  # older imports: the loans come as Loan.Imported
            page.customers.append(_customer_row(event, "imported", position))
        elif isinstance(event, Loan.Booked):
            page.loans.append(_loan_row(event, event.customer_id, "booked"))
            page.loan_changes[event.customer_id] = position
        elif isinstance(event, Loan.Imported):
            page.loans.append(_loan_row(event, event.customer_id, "imported"))
            page.loan_changes[event.customer_id] = position
        elif isinstance(event, Loan.RepaymentRecorded):
            page.repayments.append(_repayment_row(event))
            page.repayment_changes[event.loan_id] = position
        elif isinstance(event, ImportJob.Event):
            page.jobs.append(event)

    def _apply_jobs(self, cur: psycopg.Cursor, events: list[DomainEventProtocol[Any]]) -> None:
        """Apply import job events in order. A run of one job's progress reports is one UPDATE to
        its last count, with their issues in order: a big import reports hundreds of times."""
        run: list[Any] | None = None  # job ID, rows done, issues, time of a run of progress reports
        for e in events:
            if run is not None and not (isinstance(e, ImportJob.Progressed) and e.originator_id == run[0]):
                self._apply_progress(cur, *run)
                run = None
            if not isinstance(e, ImportJob.Progressed):
                self._apply_job(cur, e)
                continue
            if run is None:
                run = [e.originator_id, 0, [], None]
            run[1], run[3] = e.rows_done, e.timestamp
            run[2].extend(e.issues)
        if run is not None:
            self._apply_progress(cur, *run)

    def _apply_progress(self, cur: psycopg.Cursor, job_id: Any, rows_done: int, issues: list[Any], when: datetime) -> None:
        cur.execute(self._job_progressed, (rows_done, _jsonb(issues), when, job_id))

    def _apply_job(self, cur: psycopg.Cursor, e: Any) -> None:
        jobs = self._jobs
        when: datetime = e.timestamp
        if isinstance(e, ImportJob.Requested):
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (job_id, state, customers_file, loans_file, requested_at, updated_at)"
                    " VALUES (%s, 'queued', %s, %s, %s, %s)"
                ).format(jobs),
                (e.originator_id, e.customers_file, e.loans_file, when, when),
            )
        elif isinstance(e, ImportJob.Started):
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET state = 'running', total_rows = %s, rows_done = 0, issues = '[]',"
                    " summary = '{{}}', updated_at = %s WHERE job_id = %s"
                ).format(jobs),
                (e.total_rows, when, e.originator_id),
            )
        elif isinstance(e, ImportJob.Completed):
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET state = 'completed', rows_done = total_rows, summary = %s, updated_at = %s WHERE job_id = %s"
                ).format(jobs),
                (_jsonb(e.summary), when, e.originator_id),
            )
        elif isinstance(e, ImportJob.Failed):
            cur.execute(
                sql.SQL("UPDATE {} SET state = 'failed', summary = %s, updated_at = %s WHERE job_id = %s").format(jobs),
                (_jsonb({"error": e.reason}), when, e.originator_id),
            )


def lock_holder(conninfo: str) -> psycopg.Connection:
    """An autocommit connection for a session that holds advisory locks (see _PROBE_PEER)."""
    conn = psycopg.connect(conninfo, connect_timeout=5, autocommit=True)
    try:
        conn.execute(_PROBE_PEER)
    except BaseException:
        conn.close()
        raise
    return conn


def rebuild(app: Ledger, conninfo: str, progress: Progress | None = None, page_size: int = REBUILD_PAGE_SIZE) -> int:
    """Replay every event into fresh tables beside the live ones, then swap them in atomically.

    The fresh tables are filled without their indexes, which are built once the rows are in
    (or before the first page that updates rows by key).

    Holds the projection lock throughout, so the live projection pauses (queries keep
    reading the old tables) and resumes on the new ones exactly where the rebuild ended.
    """
    with lock_holder(conninfo) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            read_model.drop(conn, read_model.REBUILD_SCHEMA)
            read_model.create(conn, read_model.REBUILD_SCHEMA, bulk=True)
            fresh = Projector(app, conninfo, schema=read_model.REBUILD_SCHEMA, page_size=page_size, bulk_load=True)
            applied = fresh.run_holding_lock(conn, progress)
            fresh.finish_bulk_load(conn)
            position = fresh.position(conn)
            with conn.transaction():
                read_model.drop(conn, read_model.SCHEMA)
                conn.execute(
                    sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                        sql.Identifier(read_model.REBUILD_SCHEMA), sql.Identifier(read_model.SCHEMA)
                    )
                )
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(position)))
            log.info("rebuilt the read model from %d events", applied)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    # Catch-ups triggered during the rebuild found the lock taken and left their events to us.
    with Projector(app, conninfo) as live:
        live.catch_up()
    return applied
