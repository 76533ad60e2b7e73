"""Turns the notification log into read-model rows, a page of events per transaction.

Each page's rows and the new tracking position commit together, so an event is
applied exactly once and in order whatever crashes. A PostgreSQL advisory lock lets
one worker at a time advance the projection. The commit also NOTIFYs the new position,
which is how the API learns, without polling, that a command's events are visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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

Progress = Callable[[int, int], None]


def _loan_row(e: Any, origin: str) -> tuple[Any, ...]:
    return (
        e.loan_id,
        e.customer_id,
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


def _customer_row(e: Any, origin: str) -> tuple[Any, ...]:
    return (
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
    )


def _repayment_row(e: Any) -> tuple[Any, ...]:
    """The repayments row, then the loan's new counts (the last 3 fields, for its UPDATE)."""
    return (e.loan_id, e.installment, e.paid_on, e.due_date, e.on_time, e.amount, e.emis_paid, e.emis_paid_on_time, e.loan_id)


def _copy(cur: psycopg.Cursor[Any], statement: sql.Composed, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        with cur.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)


@dataclass
class _Page:
    customers: list[tuple[Any, ...]]
    loans: list[tuple[Any, ...]]
    repayments: list[tuple[Any, ...]]
    jobs: list[DomainEventProtocol[Any]]


class Projector:
    def __init__(self, app: Ledger, conninfo: str, schema: str = read_model.SCHEMA, page_size: int = PAGE_SIZE) -> None:
        self.app = app
        self.conninfo = conninfo
        self.schema = schema
        self.page_size = page_size
        s = sql.Identifier(schema)
        # Rows go in by COPY: many times faster than INSERTs for the pages of an import or a rebuild.
        self._copy_customers = sql.SQL(
            "COPY {}.customers (source_customer_id, customer_id, first_name, last_name, age, phone_number,"
            " monthly_income, approved_limit, origin, recorded_at) FROM STDIN"
        ).format(s)
        self._copy_loans = sql.SQL(
            "COPY {}.loans (loan_id, customer_id, source_loan_id, loan_amount, interest_rate, tenure,"
            " monthly_installment, start_date, end_date, emis_paid, emis_paid_on_time, origin) FROM STDIN"
        ).format(s)
        self._copy_repayments = sql.SQL(
            "COPY {}.repayments (loan_id, installment, paid_on, due_date, on_time, amount) FROM STDIN"
        ).format(s)
        self._loan_payments = sql.SQL("UPDATE {}.loans SET emis_paid = %s, emis_paid_on_time = %s WHERE loan_id = %s").format(s)
        self._tracking = sql.Identifier(schema, "tracking")
        self._jobs = sql.Identifier(schema, "import_jobs")

    # Running

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.conninfo, connect_timeout=5)

    def catch_up(self, progress: Progress | None = None) -> int | None:
        """Apply every event not yet applied. None when another runner holds the lock."""
        applied = 0
        with self.connect() as conn:
            conn.autocommit = True
            while True:
                locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
                if not (locked and locked[0]):
                    return None if applied == 0 else applied
                try:
                    applied += self._run_locked(conn, progress)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                # A trigger that arrived while we held the lock found it busy and left
                # its events to us: look once more now that the lock is free.
                if self.position(conn) >= (self.app.recorder.max_notification_id() or 0):
                    return applied

    def run_holding_lock(self, conn: psycopg.Connection, progress: Progress | None = None) -> int:
        """Catch up on a connection that already holds the lock (the rebuild does)."""
        return self._run_locked(conn, progress)

    def _run_locked(self, conn: psycopg.Connection, progress: Progress | None) -> int:
        self._check_event_store(conn)
        position = self.position(conn)
        last = self.app.recorder.max_notification_id() or 0
        if last - position <= self.page_size:  # the usual case after a command: one page, no reader thread
            notifications = self._read_page(position, last)
            if notifications:
                self.apply_page(conn, notifications)
                if progress is not None:
                    progress(notifications[-1].id, last)
            return len(notifications)
        applied = 0
        # The next page is read while this one is applied: the database and this process overlap.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection-read") as reader:
            next_page = reader.submit(self._read_page, position, last)
            while True:
                notifications = next_page.result()
                if not notifications:
                    break
                position = notifications[-1].id
                next_page = reader.submit(self._read_page, position, last)
                self.apply_page(conn, notifications)
                applied += len(notifications)
                if progress is not None:
                    progress(position, last)
        return applied

    def _read_page(self, after: int, last: int) -> Sequence[Notification]:
        if after >= last:
            return []
        return self.app.recorder.select_notifications(start=after, limit=self.page_size, inclusive_of_start=False)

    def position(self, conn: psycopg.Connection) -> int:
        row = conn.execute(
            sql.SQL("SELECT position FROM {} WHERE projection = %s").format(self._tracking), (PROJECTION,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _events_table_oid(self, conn: psycopg.Connection) -> int:
        table = f"{self.app.name.lower()}_events"
        row = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()
        assert row is not None
        return int(row[0])

    def _check_event_store(self, conn: psycopg.Connection) -> None:
        """Tracking belongs to one event store: if the store was recreated, start again from zero."""
        row = conn.execute(
            sql.SQL("SELECT events_table FROM {} WHERE projection = %s").format(self._tracking), (PROJECTION,)
        ).fetchone()
        if row is not None and int(row[0]) != self._events_table_oid(conn):
            log.warning("event store was recreated: emptying read model %s to replay it", self.schema)
            with conn.transaction():
                for table in read_model.TABLES:
                    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(self.schema, table)))

    # Applying

    def apply_page(self, conn: psycopg.Connection, notifications: Sequence[Notification]) -> int:
        """Apply one page of notifications and move the tracking position, in one transaction."""
        page = _Page([], [], [], [])
        for notification in notifications:
            self._collect(page, self.app.mapper.to_domain_event(notification))
        position = notifications[-1].id
        with conn.transaction(), conn.cursor() as cur:
            _copy(cur, self._copy_customers, page.customers)
            _copy(cur, self._copy_loans, page.loans)
            if page.repayments:  # after the loans: a loan and its repayments may share a page
                _copy(cur, self._copy_repayments, [r[:6] for r in page.repayments])
                cur.executemany(self._loan_payments, [r[6:] for r in page.repayments])
            for job_event in page.jobs:
                self._apply_job(cur, job_event)
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (projection, position, events_table) VALUES (%s, %s, %s)"
                    " ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position,"
                    " events_table = EXCLUDED.events_table"
                ).format(self._tracking),
                (PROJECTION, position, self._events_table_oid(conn)),
            )
            if self.schema == read_model.SCHEMA:
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(position)))
        return position

    @staticmethod
    def _collect(page: _Page, event: DomainEventProtocol[Any]) -> None:
        if isinstance(event, Customer.Registered):
            page.customers.append(_customer_row(event, "registered"))
        elif isinstance(event, Customer.Imported):
            page.customers.append(_customer_row(event, "imported"))
        elif isinstance(event, Loan.Booked):
            page.loans.append(_loan_row(event, "booked"))
        elif isinstance(event, Loan.Imported):
            page.loans.append(_loan_row(event, "imported"))
        elif isinstance(event, Loan.RepaymentRecorded):
            page.repayments.append(_repayment_row(event))
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
            fresh = Projector(app, conninfo, schema=read_model.REBUILD_SCHEMA)
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
    Projector(app, conninfo).catch_up()
    return applied
