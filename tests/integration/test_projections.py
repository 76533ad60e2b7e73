"""Projections on real PostgreSQL: rebuild, atomic pages, the periodic catch-up."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from infra.config import Settings
from infra.postgres import build_ledger
from ledger.policy import LoanRequest
from projections.projector import Projector, rebuild
from tests.integration.conftest import Stack
from tests.integration.test_import import follow, start

TABLES = {
    "customers": "customer_id",
    "loans": "loan_id",
    "repayments": "loan_id, installment",
    "import_jobs": "job_id",
    "tracking": "projection",
}


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {table: conn.execute(f"SELECT * FROM readmodel.{table} ORDER BY {key}").fetchall() for table, key in TABLES.items()}


def wait_until_caught_up(stack: Stack, timeout: float = 30) -> int:
    app, pool = build_ledger(stack.settings)
    try:
        last = app.recorder.max_notification_id() or 0
    finally:
        pool.close()
        app.close()
    position = stack.wait_for("SELECT position FROM readmodel.tracking", last, timeout)
    assert position == last, f"projection stuck at {position} of {last}"
    return last


@pytest.fixture(scope="module")
def history(stack: Stack, client: TestClient) -> None:
    assert follow(client, start(client))["state"] == "completed"
    customer = client.post(
        "/register",
        json={"first_name": "Kai", "last_name": "Sen", "age": 33, "monthly_income": 90_000, "phone_number": 9600000001},
    ).json()
    for amount in (50_000, 60_000):
        booked = client.post(
            "/create-loan",
            json={"customer_id": customer["customer_id"], "loan_amount": amount, "interest_rate": 15, "tenure": 10},
        ).json()
        assert client.post(f"/loans/{booked['loan_id']}/repayments").status_code == 201
    client.post("/loans/5930/repayments")  # an imported loan's next installment
    wait_until_caught_up(stack)


def test_a_rebuild_gives_exactly_the_tables_incremental_projection_gave(stack: Stack, history: None) -> None:
    with stack.connect() as conn:
        incremental = snapshot(conn)
    app, pool = build_ledger(stack.settings)
    try:
        applied = rebuild(app, stack.settings.database_url)
    finally:
        pool.close()
        app.close()
    with stack.connect() as conn:
        rebuilt = snapshot(conn)
    assert applied == incremental["tracking"][0][1]
    assert len(rebuilt["customers"]) == 301 and len(rebuilt["loans"]) == 784 and len(rebuilt["repayments"]) == 3
    assert rebuilt == incremental


def test_a_failed_page_leaves_nothing_half_applied_and_the_next_run_completes_it(stack: Stack, history: None) -> None:
    settings: Settings = stack.settings
    stack.stop_worker()  # nothing else may advance the projection during this test
    app, pool = build_ledger(settings)
    try:
        customer = app.register_customer("Lia", "Roy", 29, "9600000002", Decimal(80_000))
        booking = app.book_loan(customer.customer.customer_id, LoanRequest(Decimal(40_000), Decimal(15), 10))
        loan_id = booking.response["loan_id"]
        with stack.connect() as conn:
            before = snapshot(conn)
            # Something already occupies the loan's row: applying the page must fail as a whole.
            conn.execute(
                "INSERT INTO readmodel.loans VALUES (%s, 1, NULL, 1, 1, 1, 1, '2020-01-01', '2020-02-01', 0, 0, 'blocker')",
                (loan_id,),
            )
        with pytest.raises(psycopg.errors.UniqueViolation), Projector(app, settings.database_url) as projector:
            projector.catch_up()
        with stack.connect() as conn:
            after_failure = snapshot(conn)
            conn.execute("DELETE FROM readmodel.loans WHERE origin = 'blocker'")
        after_failure["loans"] = [row for row in after_failure["loans"] if row[-1] != "blocker"]
        assert after_failure == before  # the customer row of the same page was rolled back too
        with Projector(app, settings.database_url) as projector:
            projector.catch_up()
        with stack.connect() as conn:
            final = snapshot(conn)
        assert len(final["customers"]) == len(before["customers"]) + 1
        assert len(final["loans"]) == len(before["loans"]) + 1
        assert final["tracking"][0][1] == app.recorder.max_notification_id()
    finally:
        pool.close()
        app.close()
        stack.start_worker()


def test_events_written_without_a_trigger_are_projected_by_the_periodic_catch_up(stack: Stack, history: None) -> None:
    app, pool = build_ledger(stack.settings)
    try:
        # The application records events; nobody asks a worker to project them.
        registration = app.register_customer("Ola", "Nwosu", 45, "9600000003", Decimal(70_000))
    finally:
        pool.close()
        app.close()
    started = time.monotonic()
    found = stack.wait_for(
        f"SELECT count(*) FROM readmodel.customers WHERE customer_id = {registration.customer.customer_id}", 1, timeout=15
    )
    assert found == 1, "beat's periodic catch-up did not project the event"
    assert time.monotonic() - started < 15


def test_a_recreated_event_store_empties_the_read_model_instead_of_skipping(stack: Stack, history: None) -> None:
    stack.stop_worker()
    try:
        with stack.connect() as conn:
            conn.execute("ALTER TABLE ledger_events RENAME TO ledger_events_old")
            conn.execute("CREATE TABLE ledger_events (LIKE ledger_events_old INCLUDING ALL)")
            # The new store holds only its first 100 events: fewer than the read model has seen.
            conn.execute("INSERT INTO ledger_events SELECT * FROM ledger_events_old WHERE notification_id <= 100")
            expected = conn.execute(
                "SELECT count(*) FROM ledger_events WHERE topic LIKE '%Customer.HistoryImported' OR topic LIKE '%Customer.Registered'"
            ).fetchone()
        app, pool = build_ledger(stack.settings)
        try:
            with Projector(app, stack.settings.database_url) as projector:
                projector.catch_up()
        finally:
            pool.close()
            app.close()
        with stack.connect() as conn:
            customers = conn.execute("SELECT count(*) FROM readmodel.customers").fetchone()
            position = conn.execute("SELECT position FROM readmodel.tracking").fetchone()
        assert position == (100,)
        assert expected is not None and 0 < expected[0] < 301
        assert customers == expected
    finally:
        stack.start_worker()
