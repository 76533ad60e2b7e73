"""Answers kept between requests follow every change to the customer and every change of date.

Each scenario first asks (so the API keeps the answer), then changes something, then asks again
on the same app: a stale answer would fail the second question. A kept answer is served without
asking the database, so what drops it is the projection's notices (api.querycache).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from api.app import create_app
from api.endpoints import Services
from api.readyourwrites import PositionWatcher
from projections import views
from projections.projector import CHANGES_CHANNEL, NOTIFY_CHANNEL, rebuild
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
    # The rebuild's notice reaches the API's listener a moment after the rebuild commits.
    eventually(lambda: [loan["loan_id"] for loan in client.get(f"/view-loans/{customer_id}").json()], [loan_id])
    assert inputs(client, customer_id)["loans_taken"] == 1


def eventually(ask: Callable[[], object], expected: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (answer := ask()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer == expected


def test_a_process_whose_notices_lag_reads_the_database(stack: Stack, tmp_path: Path) -> None:
    """Two processes of one server share a position file, as `ledger api`'s do. One answers a
    booking; the other, whose listener has not caught up (here: stopped), must not serve what it
    kept from before, or a client booking through one and reading through the other would miss
    the loan."""
    position_file = tmp_path / "position"
    position_file.write_bytes(bytes(8))
    settings = dataclasses.replace(stack.settings, api_position_file=str(position_file))
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as lagging,
        TestClient(create_app(settings), raise_server_exceptions=False) as other,
    ):
        customer_id = new_customer(other)
        first = book(other, customer_id)
        eventually(lambda: [loan["loan_id"] for loan in lagging.get(f"/view-loans/{customer_id}").json()], [first])
        assert inputs(lagging, customer_id)["loans_taken"] == 1  # both answers now kept by `lagging`
        watcher = services_of(lagging).watcher
        lagging.portal.call(watcher.stop)  # its notices stop here
        second = book(other, customer_id)
        assert watcher.position < services_of(other).watcher.position
        assert [loan["loan_id"] for loan in lagging.get(f"/view-loans/{customer_id}").json()] == [first, second]
        assert inputs(lagging, customer_id)["loans_taken"] == 2
        assert lagging.get(f"/view-loan/{second}").status_code == 200


def services_of(client: TestClient) -> Services:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    return services


def test_the_projection_names_the_customers_each_page_changed(stack: Stack, client: TestClient) -> None:
    """Each commit of the projection NOTIFYs the customers it changed, then its position: a
    booking names its customer, and so does a repayment (found through the loan)."""
    customer_id = new_customer(client)
    with psycopg.connect(stack.settings.database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANGES_CHANNEL}")
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        loan_id = book(client, customer_id)
        assert client.post(f"/loans/{loan_id}/repayments", json={}).status_code == 201
        notices = [(n.channel, n.payload) for n in listener.notifies(timeout=1.0)]
    assert len(notices) == 4, notices
    for (changes, described), (positions, position) in zip(notices[::2], notices[1::2], strict=True):
        assert (changes, positions) == (CHANGES_CHANNEL, NOTIFY_CHANNEL)
        assert described == f"{position} {customer_id}"


def test_notices_that_never_arrive_are_caught_by_the_listeners_check(stack: Stack) -> None:
    """A position the notices have not reached by the next check (a second later) counts as
    lost: everything kept is dropped and the listener moves to the read model's position."""

    async def check_twice() -> tuple[list[object], int, int]:
        drops: list[object] = []
        watcher = PositionWatcher(stack.settings.database_url, on_change=drops.append)
        async with await psycopg.AsyncConnection.connect(stack.settings.database_url, autocommit=True) as conn:
            position = await views.projection_position(conn)
            assert position > 0
            watcher.position = position - 1  # the notice for the last page has not come (yet)
            await watcher._check(conn)
            first = list(drops)
            await watcher._check(conn)  # still not: lost
        return [first, drops], watcher.position, position

    (after_first, after_second), moved_to, position = asyncio.run(check_twice())
    assert after_first == []  # a notice can be on its way at the first check
    assert after_second == [None] and moved_to == position


def test_the_listener_stops_even_when_a_cancellation_is_lost(stack: Stack) -> None:
    """Python 3.11's `asyncio.wait_for` (inside the database driver, say) can return a result that
    was ready instead of raising the cancellation it got. An API process whose listener then went
    on listening never finished its shutdown (seen once under `make run`)."""

    class LosesOneCancellation(PositionWatcher):
        lost = 0
        checking = asyncio.Event()

        async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
            self.checking.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if self.lost:
                    raise
                self.lost += 1  # swallowed, as the bug does

    async def start_and_stop() -> tuple[int, bool]:
        watcher = LosesOneCancellation(stack.settings.database_url)
        await watcher.start()
        await asyncio.wait_for(watcher.checking.wait(), 10)
        stopping = asyncio.create_task(watcher.stop())
        await asyncio.wait({stopping}, timeout=5)  # waits without cancelling it
        stopped = stopping.done()
        assert watcher._task is not None
        for task in (stopping, watcher._task):  # leave nothing running either way
            task.cancel()
        await asyncio.wait({stopping, watcher._task}, timeout=5)
        return watcher.lost, stopped

    assert asyncio.run(start_and_stop()) == (1, True)
