"""Answers kept between requests follow every change to the customer and every change of date.

Each scenario first asks (so the API keeps the answer), then changes something, then asks again
on the same app: a stale answer would fail the second question.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from projections.projector import rebuild
from tests.integration.conftest import TODAY, Stack

_phones = iter(range(9_500_100_000, 9_500_200_000))


class MovableClock:
    def __init__(self, today: date) -> None:
        self.now = today

    def today(self) -> date:
        return self.now


@pytest.fixture(scope="module")
def clock() -> MovableClock:
    return MovableClock(TODAY)


@pytest.fixture(scope="module")
def client(stack: Stack, clock: MovableClock) -> Iterator[TestClient]:
    with TestClient(create_app(stack.settings, clock=clock), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(autouse=True)
def today_again(clock: MovableClock) -> Iterator[None]:
    yield
    clock.now = TODAY


def new_customer(client: TestClient, income: int = 200_000) -> int:
    body = {"first_name": "Meera", "last_name": "Das", "age": 41, "monthly_income": income, "phone_number": next(_phones)}
    response = client.post("/register", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["customer_id"])


def book(client: TestClient, customer_id: int, amount: int = 60_000, tenure: int = 3) -> int:
    body = {"customer_id": customer_id, "loan_amount": amount, "interest_rate": 16, "tenure": tenure}
    response = client.post("/create-loan", json=body)
    assert response.status_code == 201 and response.json()["loan_approved"], response.text
    return int(response.json()["loan_id"])


def inputs(client: TestClient, customer_id: int) -> dict[str, Any]:
    body = {"customer_id": customer_id, "loan_amount": 10_000, "interest_rate": 16, "tenure": 6}
    response = client.post("/check-eligibility", json=body)
    assert response.status_code == 200, response.text
    return response.json()["credit_score_breakdown"]["inputs"]  # type: ignore[no-any-return]


def version(stack: Stack, customer_id: int) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT version FROM readmodel.customers WHERE customer_id = %s", (customer_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_customers_version_is_the_position_of_their_last_event(stack: Stack, client: TestClient) -> None:
    customer_id = new_customer(client)
    registered = version(stack, customer_id)
    loan_id = book(client, customer_id)
    booked = version(stack, customer_id)
    assert client.post(f"/loans/{loan_id}/repayments", json={}).status_code == 201
    repaid = version(stack, customer_id)
    other = new_customer(client)
    assert 0 < registered < booked < repaid < version(stack, other)
    assert version(stack, customer_id) == repaid  # someone else's events leave it alone
    with stack.connect() as conn:
        tracking = conn.execute("SELECT position FROM readmodel.tracking").fetchone()
    assert tracking is not None and repaid <= tracking[0]


def test_eligibility_and_loans_follow_a_booking_and_a_repayment(client: TestClient) -> None:
    customer_id = new_customer(client)
    assert inputs(client, customer_id)["loans_taken"] == 0
    assert client.get(f"/view-loans/{customer_id}").json() == []
    assert client.get(f"/customers/{customer_id}").json()["current_loans"] == 0

    loan_id = book(client, customer_id, amount=60_000, tenure=3)
    assert inputs(client, customer_id)["loans_taken"] == 1
    assert inputs(client, customer_id)["current_debt"] == 60_000
    (listed,) = client.get(f"/view-loans/{customer_id}").json()
    assert listed["loan_id"] == loan_id and listed["repayments_left"] == 3
    assert client.get(f"/customers/{customer_id}").json()["current_loans"] == 1

    assert client.post(f"/loans/{loan_id}/repayments", json={}).status_code == 201
    assert client.get(f"/view-loans/{customer_id}").json()[0]["repayments_left"] == 2


def test_answers_follow_the_calendar_with_no_event_in_between(client: TestClient, clock: MovableClock) -> None:
    customer_id = new_customer(client)
    book(client, customer_id, amount=60_000, tenure=3)
    assert len(client.get(f"/view-loans/{customer_id}").json()) == 1
    assert inputs(client, customer_id)["current_loans"] == 1
    assert inputs(client, customer_id)["emis_due"] == 0

    clock.now = TODAY + timedelta(days=62)  # two installments fall due
    assert inputs(client, customer_id)["emis_due"] == 2
    clock.now = TODAY + timedelta(days=120)  # past the end date: no longer a current loan
    assert client.get(f"/view-loans/{customer_id}").json() == []
    assert inputs(client, customer_id)["current_loans"] == 0
    assert inputs(client, customer_id)["loans_taken"] == 1


def test_a_rebuild_replaces_every_kept_answer(stack: Stack, client: TestClient) -> None:
    """A rebuild replays the same events, so versions come back the same: the kept answers must
    still be dropped, or a rebuild could not repair a damaged read model."""
    customer_id = new_customer(client)
    loan_id = book(client, customer_id)
    with stack.connect() as conn:  # damage the read model, then let the API keep the wrong answer
        conn.execute("DELETE FROM readmodel.loans WHERE loan_id = %s", (loan_id,))
    assert client.get(f"/view-loans/{customer_id}").json() == []
    assert inputs(client, customer_id)["loans_taken"] == 0

    app = stack.ledger()
    try:
        rebuild(app, stack.settings.database_url)
    finally:
        app.close()
    assert [loan["loan_id"] for loan in client.get(f"/view-loans/{customer_id}").json()] == [loan_id]
    assert inputs(client, customer_id)["loans_taken"] == 1
