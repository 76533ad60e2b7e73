"""The read-model tables. All live in one PostgreSQL schema, tracking position included,
so a rebuild can build a fresh schema beside the live one and swap it in atomically."""

from __future__ import annotations

import psycopg
from psycopg import sql

SCHEMA = "readmodel"
REBUILD_SCHEMA = "readmodel_rebuild"

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.customers (
    customer_id     bigint PRIMARY KEY,
    first_name      text NOT NULL,
    last_name       text NOT NULL,
    age             integer NOT NULL,
    phone_number    text NOT NULL,
    monthly_income  numeric NOT NULL,
    approved_limit  numeric NOT NULL,
    origin          text NOT NULL,
    recorded_at     timestamptz NOT NULL
);
ALTER TABLE {s}.customers ADD COLUMN IF NOT EXISTS source_customer_id bigint;
-- The position of the last event that changed the customer or their loans: what query caches key on.
ALTER TABLE {s}.customers ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS {s}.loans (
    loan_id             bigint PRIMARY KEY,
    customer_id         bigint NOT NULL,
    source_loan_id      bigint,
    loan_amount         numeric NOT NULL,
    interest_rate       numeric NOT NULL,
    tenure              integer NOT NULL,
    monthly_installment numeric NOT NULL,
    start_date          date NOT NULL,
    end_date            date NOT NULL,
    emis_paid           integer NOT NULL,
    emis_paid_on_time   integer NOT NULL,
    origin              text NOT NULL
);
CREATE INDEX IF NOT EXISTS loans_customer_id_idx ON {s}.loans (customer_id);
CREATE TABLE IF NOT EXISTS {s}.repayments (
    loan_id         bigint NOT NULL,
    installment     integer NOT NULL,
    paid_on         date NOT NULL,
    due_date        date NOT NULL,
    on_time         boolean NOT NULL,
    amount          numeric NOT NULL,
    PRIMARY KEY (loan_id, installment)
);
CREATE TABLE IF NOT EXISTS {s}.import_jobs (
    job_id          uuid PRIMARY KEY,
    state           text NOT NULL,
    customers_file  text NOT NULL,
    loans_file      text NOT NULL,
    total_rows      integer NOT NULL DEFAULT 0,
    rows_done       integer NOT NULL DEFAULT 0,
    issues          jsonb NOT NULL DEFAULT '[]',
    summary         jsonb NOT NULL DEFAULT '{{}}',
    requested_at    timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.tracking (
    projection      text PRIMARY KEY,
    position        bigint NOT NULL,
    events_table    oid NOT NULL
);
-- The event at `position` (its aggregate and version): whether the store still holds it tells a
-- store emptied or replaced (the read model must be replayed) from one dumped and restored
-- (a new table OID, the same events: the read model still holds).
ALTER TABLE {s}.tracking ADD COLUMN IF NOT EXISTS originator_id uuid;
ALTER TABLE {s}.tracking ADD COLUMN IF NOT EXISTS originator_version bigint;
-- Where that event is: a projector of an earlier version moves `position` and leaves the three alone.
ALTER TABLE {s}.tracking ADD COLUMN IF NOT EXISTS identified_at bigint;
"""


# How a bulk load (a rebuild) sets the large tables up, and what it does once its rows are in.
# Without their indexes a million loans go in by COPY in about 2 s instead of 10, and building the
# loans' two indexes afterwards takes under 1 s. Autovacuum would scan the tables while they fill
# (over a second of a 2-core machine's CPU in a rebuild of a million loans): it gets them at the end.
_BULK_TABLES = ("customers", "loans", "repayments")
_BULK_LOAD = (
    ("ALTER TABLE {s}.customers DROP CONSTRAINT customers_pkey", "ALTER TABLE {s}.customers ADD PRIMARY KEY (customer_id)"),
    ("ALTER TABLE {s}.loans DROP CONSTRAINT loans_pkey", "ALTER TABLE {s}.loans ADD PRIMARY KEY (loan_id)"),
    ("DROP INDEX {s}.loans_customer_id_idx", "CREATE INDEX loans_customer_id_idx ON {s}.loans (customer_id)"),
    (
        "ALTER TABLE {s}.repayments DROP CONSTRAINT repayments_pkey",
        "ALTER TABLE {s}.repayments ADD PRIMARY KEY (loan_id, installment)",
    ),
    *(
        (f"ALTER TABLE {{s}}.{table} SET (autovacuum_enabled = false)", f"ALTER TABLE {{s}}.{table} RESET (autovacuum_enabled)")
        for table in _BULK_TABLES
    ),
)


def _run(conn: psycopg.Connection, statement: str, schema: str) -> None:
    conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)))  # type: ignore[arg-type]


def create(conn: psycopg.Connection, schema: str, *, bulk: bool = False) -> None:
    """The tables. With `bulk`, set up for a bulk load: the large tables come without their
    indexes or autovacuum, until `finish_bulk_load` (which must run before anything looks a row
    up by key)."""
    _run(conn, _DDL, schema)
    if bulk:
        for set_up, _ in _BULK_LOAD:
            _run(conn, set_up, schema)


def finish_bulk_load(conn: psycopg.Connection, schema: str) -> None:
    """Build the indexes `create(..., bulk=True)` left out and give the tables to autovacuum."""
    for _, finish in _BULK_LOAD:
        _run(conn, finish, schema)


def drop(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def same_store(events_table: str, tracking: str = "t") -> sql.Composable:
    """SQL for whether the tracking row `tracking` was made from the store in `events_table` (whose
    name is also the query's first parameter): the store still holds the event tracking names
    (the one at its position when a projector of this version last moved it), the same aggregate
    at the same version. An emptied store, one recreated or truncated (its IDs
    counting from 1 again), does not; one dumped and restored does, under a new table OID. A row
    written before it recorded that event (or at position 0) compares the table's OID instead."""
    t = sql.Identifier(tracking)
    return sql.SQL(
        "CASE WHEN {t}.identified_at IS NULL THEN {t}.events_table IS NOT DISTINCT FROM to_regclass(%s)::oid"
        " ELSE EXISTS (SELECT 1 FROM {events} e WHERE e.notification_id = {t}.identified_at"
        " AND e.originator_id = {t}.originator_id AND e.originator_version = {t}.originator_version) END"
    ).format(t=t, events=sql.Identifier(events_table))
