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
"""


def create(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL(_DDL).format(s=sql.Identifier(schema)))  # type: ignore[arg-type]


def drop(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
