"""Queries on the read model: plain SQL, one function per question the API asks.

Date-dependent figures (is a loan current, how many EMIs are due) are computed at read
time from stored facts, so nothing stored goes stale with the calendar.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import cache
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, errors, sql
from psycopg.rows import dict_row

from ledger.policy import LoanFacts
from projections import schema as read_model

_CUSTOMER = """
SELECT customer_id, first_name, last_name, age, phone_number, monthly_income, approved_limit
FROM readmodel.customers WHERE customer_id = %s
"""
_LOAN_FACTS = """
SELECT loan_id, loan_amount, tenure, monthly_installment, start_date, end_date, emis_paid, emis_paid_on_time
FROM readmodel.loans WHERE customer_id = %s
"""
_LOAN = """
SELECT l.loan_id, l.loan_amount, l.interest_rate, l.monthly_installment, l.tenure,
       c.customer_id, c.first_name, c.last_name, c.phone_number, c.age
FROM readmodel.loans l JOIN readmodel.customers c USING (customer_id)
WHERE l.loan_id = %s
"""
_CURRENT_LOANS = """
SELECT loan_id, loan_amount, interest_rate, monthly_installment, tenure - emis_paid AS repayments_left
FROM readmodel.loans
WHERE customer_id = %s AND end_date >= %s AND emis_paid < tenure
ORDER BY loan_id
"""
_IMPORT_JOB = "SELECT * FROM readmodel.import_jobs WHERE job_id = %s"
_LOAN_TERMS = """
SELECT loan_id, customer_id, loan_amount, interest_rate, tenure, monthly_installment, start_date, end_date,
       emis_paid, emis_paid_on_time, source_loan_id
FROM readmodel.loans WHERE loan_id = %s
"""
_REPAYMENTS = "SELECT installment, paid_on, on_time FROM readmodel.repayments WHERE loan_id = %s ORDER BY installment"


@dataclass(frozen=True)
class CustomerProfile:
    customer_id: int
    first_name: str
    last_name: str
    age: int
    phone_number: str
    monthly_income: Decimal
    approved_limit: Decimal


async def customer(conn: AsyncConnection[Any], customer_id: int) -> CustomerProfile | None:
    cur = await conn.execute(_CUSTOMER, (customer_id,))
    row = await cur.fetchone()
    return None if row is None else CustomerProfile(*row)


async def customer_exists(conn: AsyncConnection[Any], customer_id: int) -> bool:
    cur = await conn.execute("SELECT 1 FROM readmodel.customers WHERE customer_id = %s", (customer_id,))
    return await cur.fetchone() is not None


async def loan_facts(conn: AsyncConnection[Any], customer_id: int) -> list[LoanFacts]:
    cur = await conn.execute(_LOAN_FACTS, (customer_id,))
    return [LoanFacts(*row) for row in await cur.fetchall()]


async def loan(conn: AsyncConnection[Any], loan_id: int) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_LOAN, (loan_id,))
    return await cur.fetchone()


async def current_loans(conn: AsyncConnection[Any], customer_id: int, today: date) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_CURRENT_LOANS, (customer_id, today))
    return await cur.fetchall()


async def import_job(conn: AsyncConnection[Any], job_id: UUID) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_IMPORT_JOB, (job_id,))
    return await cur.fetchone()


@cache
def _position_query(events_table: str) -> sql.Composed:
    return sql.SQL("SELECT position, {same} FROM readmodel.tracking t WHERE projection = 'ledger'").format(
        same=read_model.same_store(events_table)
    )


async def projection_position(conn: AsyncConnection[Any], events_table: str = "ledger_events") -> int:
    """The last event of the store `events_table` names that the read model has applied: 0 when
    the read model was made from another store (the store was emptied or recreated, and the
    projector has not yet emptied the read model to replay the new one)."""
    try:
        cur = await conn.execute(_position_query(events_table), (events_table,))
    except errors.UndefinedTable:  # no event store at all (dropped, not yet made again): nothing of it is applied
        return 0
    row = await cur.fetchone()
    return int(row[0]) if row and row[1] else 0


async def loan_terms(conn: AsyncConnection[Any], loan_id: int) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_LOAN_TERMS, (loan_id,))
    return await cur.fetchone()


async def repayments(conn: AsyncConnection[Any], loan_id: int) -> dict[int, tuple[date, bool]]:
    """Recorded repayments by installment number: (paid_on, on_time)."""
    cur = await conn.execute(_REPAYMENTS, (loan_id,))
    return {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
