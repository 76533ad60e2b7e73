"""Turns the notification log into read-model rows, a page of events per transaction.

Each page's rows and the new tracking position commit together, so an event is
applied exactly once and in order whatever crashes. A PostgreSQL advisory lock lets
one worker at a time advance the projection. The commit also NOTIFYs the new position,
which is how the API learns, without polling, that a command's events are visible.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification
from psycopg import sql
from psycopg.types.json import Jsonb

from ledger.application import Ledger
from ledger.domain import Customer, ImportJob, Loan
from projections import schema as read_model

log = logging.getLogger(__name__)

PROJECTION = "ledger"
NOTIFY_CHANNEL = "ledger_projection"
LOCK_KEY = 7_301_120  # the advisory lock that one projection runner holds at a time
PAGE_SIZE = 1000
REBUILD_PAGE_SIZE = 5000  # a rebuild has no reader waiting on each page: fewer, larger transactions

Progress = Callable[[int, int], None]


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


class _Rows:
    """How rows go into one read-model table: COPY for many, INSERTs for a few."""

    def __init__(self, schema: str, table: str, columns: str) -> None:
        target = sql.SQL("{} ({})").format(sql.Identifier(schema, table), sql.SQL(columns))
        self.copy = sql.SQL("COPY {} FROM STDIN").format(target)
        placeholders = sql.SQL(", ").join(sql.Placeholder() * len(columns.split(",")))
        self.insert = sql.SQL("INSERT INTO {} VALUES ({})").format(target, placeholders)

    def write(self, cur: psycopg.Cursor[Any], rows: Sequence[Sequence[Any]], small: bool) -> None:
        if not rows:
            return
        if small:
            cur.executemany(self.insert, rows)
            return
        with cur.copy(self.copy) as copy:
            for row in rows:
                copy.write_row(row)


@dataclass
class _Page:
    customers: list[list[Any]] = field(default_factory=list)
    loans: list[tuple[Any, ...]] = field(default_factory=list)
    repayments: list[tuple[Any, ...]] = field(default_factory=list)
    jobs: list[DomainEventProtocol[Any]] = field(default_factory=list)
    # customer_id -> position of the page's last loan event for them; loan_id -> of its last repayment
    loan_changes: dict[int, int] = field(default_factory=dict)
    repayment_changes: dict[int, int] = field(default_factory=dict)

    def customer_versions(self) -> tuple[list[int], list[int]]:
        """Stamp the page's new customers with their loans' positions; the rest need an UPDATE."""
        for row in self.customers:
            row[-1] = max(row[-1], self.loan_changes.pop(row[1], 0))
        return list(self.loan_changes), list(self.loan_changes.values())


class Projector:
    def __init__(self, app: Ledger, conninfo: str, schema: str = read_model.SCHEMA, page_size: int = PAGE_SIZE) -> None:
        self.app = app
        self.conninfo = conninfo
        self.schema = schema
        self.page_size = page_size
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
        ).format(s)
        self._tracking = sql.Identifier(schema, "tracking")
        self._jobs = sql.Identifier(schema, "import_jobs")
        self._events_table = f"{app.name.lower()}_events"
        self._state = sql.SQL(
            "SELECT t.position, t.events_table, %s::regclass::oid FROM (SELECT 1) one LEFT JOIN {} t ON t.projection = %s"
        ).format(self._tracking)
        self._track = sql.SQL(
            "INSERT INTO {} (projection, position, events_table) VALUES (%s, %s, %s)"
            " ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position, events_table = EXCLUDED.events_table"
        ).format(self._tracking)
        self._unlock = sql.SQL("SELECT pg_advisory_unlock(%s), (SELECT max(notification_id) FROM {})").format(
            sql.Identifier(self._events_table)
        )
        self._conn: psycopg.Connection | None = None
        self._position = 0
        self._events_oid = 0

    # Running

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.conninfo, connect_timeout=5, autocommit=True)

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
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

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
        position = self._prepare(conn)
        notifications = self._read_page(position)
        if len(notifications) < self.page_size:  # the usual case after a command: one page, no reader thread
            if notifications:
                self.apply_page(conn, notifications)
                if progress is not None:
                    progress(self._position, self._position)
            return len(notifications)
        last = self.app.recorder.max_notification_id() or 0
        applied = 0
        # The next page is read while this one is applied: the database and this process overlap.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection-read") as reader:
            while notifications:
                next_page = reader.submit(self._read_page, notifications[-1].id)
                self.apply_page(conn, notifications)
                applied += len(notifications)
                if progress is not None:
                    progress(self._position, max(last, self._position))
                notifications = next_page.result()
        return applied

    def _read_page(self, after: int) -> Sequence[Notification]:
        return self.app.recorder.select_notifications(start=after, limit=self.page_size, inclusive_of_start=False)

    def position(self, conn: psycopg.Connection) -> int:
        row = conn.execute(
            sql.SQL("SELECT position FROM {} WHERE projection = %s").format(self._tracking), (PROJECTION,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _prepare(self, conn: psycopg.Connection) -> int:
        """Read the position, and check that tracking belongs to this event store: if the store
        was recreated, empty the read model and start again from zero."""
        row = conn.execute(self._state, (self._events_table, PROJECTION)).fetchone()
        assert row is not None
        position, tracked_oid, self._events_oid = row
        if tracked_oid is not None and tracked_oid != self._events_oid:
            log.warning("event store was recreated: emptying read model %s to replay it", self.schema)
            with conn.transaction():  # new tables, as a rebuild makes: the API's kept answers go with the old
                read_model.drop(conn, self.schema)
                read_model.create(conn, self.schema)
            position = None
        self._position = int(position or 0)
        return self._position

    # Applying

    def apply_page(self, conn: psycopg.Connection, notifications: Sequence[Notification]) -> int:
        """Apply one page of notifications and move the tracking position, in one transaction
        (on a connection that holds the lock and has been through `_prepare`)."""
        page = _Page()
        for notification in notifications:
            self._collect(page, self.app.mapper.to_domain_event(notification), notification.id)
        position = notifications[-1].id
        changed_customers, changed_at = page.customer_versions()
        small = len(notifications) <= SMALL_PAGE
        with conn.pipeline() if small else contextlib.nullcontext(), conn.transaction(), conn.cursor() as cur:
            self._customers.write(cur, page.customers, small)
            self._loans.write(cur, page.loans, small)
            if page.repayments:  # after the loans: a loan and its repayments may share a page
                self._repayments.write(cur, [r[:6] for r in page.repayments], small)
                cur.executemany(self._loan_payments, [r[6:] for r in page.repayments])
                cur.execute(self._versions_by_loan, (list(page.repayment_changes), list(page.repayment_changes.values())))
            if changed_customers:
                cur.execute(self._customer_versions, (changed_customers, changed_at))
            for job_event in page.jobs:
                self._apply_job(cur, job_event)
            cur.execute(self._track, (PROJECTION, position, self._events_oid))
            if self.schema == read_model.SCHEMA:
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(position)))
        self._position = position
        return position

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
        elif isinstance(e, ImportJob.Progressed):
            cur.execute(
                sql.SQL("UPDATE {} SET rows_done = %s, issues = issues || %s, updated_at = %s WHERE job_id = %s").format(jobs),
                (e.rows_done, Jsonb(e.issues), when, e.originator_id),
            )
        elif isinstance(e, ImportJob.Completed):
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET state = 'completed', rows_done = total_rows, summary = %s, updated_at = %s WHERE job_id = %s"
                ).format(jobs),
                (Jsonb(e.summary), when, e.originator_id),
            )
        elif isinstance(e, ImportJob.Failed):
            cur.execute(
                sql.SQL("UPDATE {} SET state = 'failed', summary = %s, updated_at = %s WHERE job_id = %s").format(jobs),
                (Jsonb({"error": e.reason}), when, e.originator_id),
            )


def rebuild(app: Ledger, conninfo: str, progress: Progress | None = None) -> int:
    """Replay every event into fresh tables beside the live ones, then swap them in atomically.

    Holds the projection lock throughout, so the live projection pauses (queries keep
    reading the old tables) and resumes on the new ones exactly where the rebuild ended.
    """
    with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            read_model.drop(conn, read_model.REBUILD_SCHEMA)
            read_model.create(conn, read_model.REBUILD_SCHEMA)
            fresh = Projector(app, conninfo, schema=read_model.REBUILD_SCHEMA, page_size=REBUILD_PAGE_SIZE)
            applied = fresh.run_holding_lock(conn, progress)
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
