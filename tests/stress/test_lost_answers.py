"""A commit whose answer is lost: the database committed, the connection broke before the client
heard so (a crash or a network break at that moment), and the library's recorder retried the
insert on a fresh connection. The retry conflicts with the first try's own events. Taking that for
a concurrent change booked a second loan for one request, answered 409 to the registration it had
just recorded, and replanned an import batch that was already in. The API and the worker here
reach PostgreSQL through a proxy that drops the answer to chosen commits (tests/stress/netfault.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from infra.stack import free_port
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS
from tests.integration.conftest import wait_healthy, write_xlsx
from tests.stress.conftest import Served, follow
from tests.stress.netfault import CommitAnswerCutter


@pytest.fixture(scope="module")
def cutter(served: Served) -> Iterator[CommitAnswerCutter]:
    cut = CommitAnswerCutter(served.pg.port)
    yield cut
    cut.close()


@pytest.fixture
def cut_api(served: Served, cutter: CommitAnswerCutter) -> Iterator[str]:
    """A third API process whose PostgreSQL connections pass through the cutter."""
    port = free_port()
    served.start(
        "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        as_name="api-cut", DATABASE_URL=cutter.url(served.env["DATABASE_URL"]),
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, lambda: served.log("api-cut"))
        yield base
    finally:
        served.stop("api-cut")


def count_events(served: Served, topic: str) -> int:
    return int(served.scalar(f"SELECT count(*) FROM ledger_events WHERE topic LIKE '%{topic}'"))


def test_a_registration_a_booking_and_a_repayment_whose_commit_answers_are_lost_are_recorded_once_and_answered(
    served: Served, cutter: CommitAnswerCutter, cut_api: str, figures: dict[str, Any]
) -> None:
    body = {"first_name": "Lost", "last_name": "Answer", "age": 41, "monthly_income": 200_000, "phone_number": 9_340_000_001}
    registered_before = count_events(served, "Customer.Registered")
    booked_before = count_events(served, "Loan.Booked")
    repaid_before = count_events(served, "Loan.RepaymentRecorded")
    cuts_before = cutter.cuts
    with httpx.Client(base_url=cut_api, timeout=60) as client:
        cutter.arm()
        registered = client.post("/register", json=body)
        assert cutter.cuts == cuts_before + 1
        assert registered.status_code == 201, registered.text  # was 409: "phone number ... already belongs to a customer"
        customer_id = registered.json()["customer_id"]
        cutter.arm()
        booking = {"customer_id": customer_id, "loan_amount": 100_000, "interest_rate": 14, "tenure": 12}
        booked = client.post("/create-loan", json=booking)
        assert cutter.cuts == cuts_before + 2
        assert booked.status_code == 201, booked.text
        assert booked.json()["loan_approved"] is True
        loan_id = booked.json()["loan_id"]
        cutter.arm()
        paid = client.post(f"/loans/{loan_id}/repayments", json={})
        assert cutter.cuts == cuts_before + 3
        assert paid.status_code == 201, paid.text
        assert paid.json()["installment"] == 1
    assert count_events(served, "Customer.Registered") == registered_before + 1
    assert count_events(served, "Loan.Booked") == booked_before + 1  # was 2 loans for the one request
    assert count_events(served, "Loan.RepaymentRecorded") == repaid_before + 1  # was installments 1 and 2
    assert cutter.appends == cutter.cuts
    served.wait_caught_up()
    with served.client() as client:
        loans = client.get(f"/view-loans/{customer_id}").json()
    assert [(loan["loan_id"], loan["repayments_left"]) for loan in loans] == [(loan_id, 11)]
    figures.update(answers_cut=cutter.cuts - cuts_before, **served.audit())


def test_an_import_whose_every_commit_answer_is_lost_reports_and_records_exactly(
    served: Served, cutter: CommitAnswerCutter, figures: dict[str, Any]
) -> None:
    """A worker whose connections pass through the cutter, every commit's answer lost once: the
    job's start, each batch with its progress, the job's end, and the projection's pages."""
    served.stop("worker")
    cuts_before, appends_before = cutter.cuts, cutter.appends
    cutter.arm(10_000)
    served.start_worker(as_name="worker-cut", DATABASE_URL=cutter.url(served.env["DATABASE_URL"]), IMPORT_BATCH_SIZE="50")
    try:
        with served.client() as client:
            job = follow(client, client.post("/imports").json()["job_id"])
    finally:
        served.stop("worker-cut")
        cuts, appends = cutter.cuts - cuts_before, cutter.appends - appends_before
        cutter.disarm()
        served.start_worker()
    assert job["state"] == "completed", job
    summary = job["summary"]
    assert (summary["customers_imported"], summary["customers_already_present"]) == (300, 0), summary
    assert (summary["loans_imported"], summary["loans_already_present"]) == (782, 0), summary
    assert len(summary["rekeyed_loans"]) == 29
    assert job["rows_done"] == job["total_rows"] == 1082
    assert appends == 1 + 6 + 1, appends  # the job's start, six batches of 50 customers with their loans, its end
    assert cuts > appends  # the projection's pages lost their answers too
    assert served.scalar("SELECT count(*) FROM readmodel.customers WHERE origin = 'imported'") == 300
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'imported'") == 782
    figures.update(answers_cut=cuts, appends_cut=appends, **served.audit())


def test_concurrent_bookings_with_lost_answers_among_real_conflicts_book_exactly_what_was_answered(
    served: Served, cutter: CommitAnswerCutter, cut_api: str, figures: dict[str, Any]
) -> None:
    """Eight clients book for four customers at once, so saves conflict for real, while the answers
    to twenty commits are lost: every 201 is one loan, and every loan was answered with a 201."""
    with served.client() as client:
        customers = [
            client.post(
                "/register",
                json={
                    "first_name": "Busy",
                    "last_name": "Lost",
                    "age": 35,
                    "monthly_income": 300_000,
                    "phone_number": 9_340_000_100 + n,
                },
            ).json()["customer_id"]
            for n in range(4)
        ]
    requests = [{"customer_id": customers[n % 4], "loan_amount": 50_000, "interest_rate": 14, "tenure": 12} for n in range(40)]
    cuts_before = cutter.cuts
    cutter.arm(20)
    with httpx.Client(base_url=cut_api, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: client.post("/create-loan", json=body), requests))
    cutter.disarm()
    assert cutter.cuts - cuts_before == 20
    assert sorted({r.status_code for r in responses}) in ([200, 201], [201]), [r.text for r in responses if r.status_code >= 300]
    booked = [r.json()["loan_id"] for r in responses if r.status_code == 201]
    assert len(booked) == len(set(booked))
    ids = ", ".join(str(c) for c in customers)
    stored = served.scalar(
        "SELECT count(*) FROM ledger_events WHERE topic LIKE '%Loan.Booked'"
        f" AND (convert_from(state, 'UTF8')::jsonb ->> 'customer_id')::bigint IN ({ids})"
    )
    assert stored == len(booked)  # no loan stored that no 201 announced, none announced twice
    served.wait_caught_up()
    with served.connect() as conn:
        projected = {row[0] for row in conn.execute(f"SELECT loan_id FROM readmodel.loans WHERE customer_id IN ({ids})")}
    assert projected == set(booked)
    figures.update(requests=len(requests), booked=len(booked), answers_cut=20, **served.audit())


def test_a_booking_cut_off_by_an_outage_at_its_commit_says_it_may_be_recorded_and_its_key_recovers_it(
    served: Served, cutter: CommitAnswerCutter, cut_api: str, figures: dict[str, Any]
) -> None:
    """PostgreSQL goes away just after committing a booking and stays away through the recorder's
    retries: the answer is a 503 that says the loan may be recorded, and it was. The retry with the
    same Idempotency-Key, once the database is back, answers with that loan and books nothing more."""
    with served.client() as client:
        body = {"first_name": "Cut", "last_name": "Off", "age": 52, "monthly_income": 200_000, "phone_number": 9_340_000_200}
        customer_id = client.post("/register", json=body).json()["customer_id"]
    booking = {"customer_id": customer_id, "loan_amount": 80_000, "interest_rate": 14, "tenure": 12}
    key = {"Idempotency-Key": "outage-at-commit-1"}
    booked_before = count_events(served, "Loan.Booked")
    with httpx.Client(base_url=cut_api, timeout=120) as client:
        cutter.arm(outage=True)
        started = time.monotonic()
        try:
            cut_off = client.post("/create-loan", json=booking, headers=key)
        finally:
            cutter.restore()
        waited = time.monotonic() - started
        assert cut_off.status_code == 503, cut_off.text
        error = cut_off.json()["error"]
        assert (error["code"], error["details"]) == ("database_unavailable", {"recorded": "unknown"})
        assert "retry with the same Idempotency-Key" in error["message"]
        assert count_events(served, "Loan.Booked") == booked_before + 1  # it was recorded
        deadline = time.monotonic() + 60
        while (retry := client.post("/create-loan", json=booking, headers=key)).status_code == 503:
            assert time.monotonic() < deadline, retry.text
            time.sleep(0.5)
    assert retry.status_code == 201, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert count_events(served, "Loan.Booked") == booked_before + 1
    served.wait_caught_up()
    with served.client() as client:
        loans = client.get(f"/view-loans/{customer_id}").json()
    assert [loan["loan_id"] for loan in loans] == [retry.json()["loan_id"]]
    figures.update(answered_503_after_s=round(waited, 1), **served.audit())


def cut_off_by_outage(cutter: CommitAnswerCutter, client: httpx.Client, path: str, body: Any, headers: Any = None) -> Any:
    """Send a command whose commit is followed by an outage; return the 503's error body."""
    cutter.arm(outage=True)
    try:
        answer = client.post(path, json=body, headers=headers)
    finally:
        cutter.restore()
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    error = answer.json()["error"]
    assert (error["code"], error["details"]) == ("database_unavailable", {"recorded": "unknown"})
    return error


def until_answered(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Repeat a request while the API still answers 503 (it reconnects after the outage)."""
    deadline = time.monotonic() + 60
    while (answer := client.request(method, path, **kwargs)).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    return answer


def test_a_keyed_registration_and_an_unkeyed_booking_cut_off_by_outages_say_how_to_recover(
    served: Served, cutter: CommitAnswerCutter, cut_api: str, figures: dict[str, Any]
) -> None:
    body = {"first_name": "Keyed", "last_name": "Outage", "age": 44, "monthly_income": 150_000, "phone_number": 9_340_000_300}
    key = {"Idempotency-Key": "register-at-outage-1"}
    registered_before = count_events(served, "Customer.Registered")
    with httpx.Client(base_url=cut_api, timeout=120) as client:
        error = cut_off_by_outage(cutter, client, "/register", body, key)
        assert "retry with the same Idempotency-Key" in error["message"]
        assert count_events(served, "Customer.Registered") == registered_before + 1  # it was recorded
        again = until_answered(client, "POST", "/register", json=body, headers=key)
        assert again.status_code == 201, again.text  # the customer, not 409 phone_number_taken
        assert again.headers["Idempotent-Replayed"] == "true"
        customer_id = again.json()["customer_id"]
        assert again.json()["phone_number"] == body["phone_number"]
        assert count_events(served, "Customer.Registered") == registered_before + 1

        booking = {"customer_id": customer_id, "loan_amount": 60_000, "interest_rate": 14, "tenure": 12}
        error = cut_off_by_outage(cutter, client, "/create-loan", booking)
        assert f"look at GET /customers/{customer_id}/history, which reads the event store" in error["message"]
        history = until_answered(client, "GET", f"/customers/{customer_id}/history")
        assert history.status_code == 200, history.text
        assert [event["type"] for event in history.json()].count("Customer.LoanBooked") == 1  # it was recorded
    figures.update(**served.audit())


def test_an_import_cut_off_by_a_database_outage_resumes_by_itself_once_the_database_is_back(
    served: Served, cutter: CommitAnswerCutter, figures: dict[str, Any]
) -> None:
    """Beat, which queues unfinished imports again every minute, is stopped: only the import task
    itself can take the job up again once PostgreSQL answers."""
    imports = Path(served.env["IMPORT_DIR"])
    people = [[700_000 + n, "Out", f"Age{n}", 40, 9_500_000_000 + n, 60_000, 2_200_000] for n in range(200)]
    loans = [
        [700_000 + n, 800_000 + 2 * n + k, 100_000, 12, 10, 8_800, 3, date(2025, 1, 1), date(2026, 1, 1)]
        for n in range(200)
        for k in range(2)
    ]
    files = {
        "customers_file": write_xlsx(imports / "outage_customers.xlsx", CUSTOMER_COLUMNS, people).name,
        "loans_file": write_xlsx(imports / "outage_loans.xlsx", LOAN_COLUMNS, loans).name,
    }
    served.stop("beat")
    served.stop("worker")
    served.start_worker(as_name="worker-cut", DATABASE_URL=cutter.url(served.env["DATABASE_URL"]), IMPORT_BATCH_SIZE="5")
    try:
        with served.client() as client:
            # The outage starts at the import's 20th save of 41 (its start, then 40 batches of 5
            # customers): its answer lost, then every connection refused. Armed before the import
            # starts, on its saves alone: a 600-row import takes a fraction of a second, and a cut
            # armed while it runs could miss it, or fall on a page of the read model instead.
            cutter.arm(outage=True, appends_only=True, skip=19)
            job_id = client.post("/imports", json=files).json()["job_id"]
            deadline = time.monotonic() + 60
            while not cutter.down:
                assert time.monotonic() < deadline, client.get(f"/imports/{job_id}").json()
                time.sleep(0.01)
            rows_at_outage = client.get(f"/imports/{job_id}").json()["rows_done"]
            time.sleep(3)  # PostgreSQL is away for 3 s
            cutter.restore()
            job = follow(client, job_id, timeout=90)
    finally:
        served.stop("worker-cut")
        served.start_worker()
        served.start("beat")
    assert job["state"] == "completed", job
    summary = job["summary"]  # the whole job's, what it recorded before the outage included
    assert (summary["customers_imported"], summary["customers_already_present"]) == (200, 0), summary
    assert (summary["loans_imported"], summary["loans_already_present"]) == (400, 0), summary
    assert job["rows_done"] == job["total_rows"] == 600
    assert served.scalar("SELECT count(*) FROM readmodel.customers WHERE customer_id BETWEEN 700000 AND 700199") == 200
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE loan_id BETWEEN 800000 AND 800399") == 400
    figures.update(rows_done_at_outage=rows_at_outage, **served.audit())
