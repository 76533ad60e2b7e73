"""Many requests at once against uvicorn with 2 processes: the rules hold, nothing is lost or doubled."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx2 as httpx

from tests.stress.conftest import Served


def register(served: Served, phone: int, income: int = 100_000) -> dict[str, Any]:
    with served.client() as client:
        response = client.post(
            "/register",
            json={"first_name": "Con", "last_name": "Current", "age": 40, "monthly_income": income, "phone_number": phone},
        )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_fifty_concurrent_bookings_never_break_the_50_percent_rule_or_the_limit(served: Served, figures: dict[str, Any]) -> None:
    customer = register(served, 9_300_000_001, income=100_000)  # 50% of income: 50,000; limit 3,600,000
    request = {"customer_id": customer["customer_id"], "loan_amount": 300_000, "interest_rate": 12, "tenure": 36}
    with served.client() as client, ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: client.post("/create-loan", json=request), range(50)))
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 201) for s in statuses), statuses
    booked = [r.json() for r in responses if r.status_code == 201]
    refused = [r.json() for r in responses if r.status_code == 200]
    assert all(b["loan_approved"] and b["loan_id"] for b in booked)
    assert all(not r["loan_approved"] and r["loan_id"] is None for r in refused)
    assert 1 <= len(booked) < 50  # each fits alone (EMI 9,964.29), not all together
    with served.connect() as conn:
        rows = conn.execute(
            "SELECT loan_id, loan_amount, monthly_installment FROM readmodel.loans WHERE customer_id = %s",
            (customer["customer_id"],),
        ).fetchall()
    # Every booked response is a loan in the read model, with the installment it announced.
    assert {b["loan_id"]: Decimal(str(b["monthly_installment"])) for b in booked} == {r[0]: r[2] for r in rows}
    emi_total = sum(r[2] for r in rows)
    amount_total = sum(r[1] for r in rows)
    assert emi_total <= Decimal(50_000)
    assert amount_total <= Decimal(3_600_000)
    figures.update(requests=50, booked=len(booked), refused=len(refused), emi_total=emi_total, **served.audit())


def test_concurrent_registrations_with_one_phone_number_admit_exactly_one(served: Served, figures: dict[str, Any]) -> None:
    body = {"first_name": "Same", "last_name": "Phone", "age": 33, "monthly_income": 50_000, "phone_number": "9300000002"}
    with served.client() as client, ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: client.post("/register", json=body), range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 19, statuses
    assert served.scalar("SELECT count(*) FROM readmodel.customers WHERE phone_number = '9300000002'") == 1
    figures.update(requests=20, registered=statuses.count(201), conflicts=statuses.count(409), **served.audit())


def test_an_idempotency_key_sent_concurrently_books_once_and_answers_alike(served: Served, figures: dict[str, Any]) -> None:
    customer = register(served, 9_300_000_003, income=200_000)
    request = {"customer_id": customer["customer_id"], "loan_amount": 100_000, "interest_rate": 14, "tenure": 12}
    headers = {"Idempotency-Key": "stress-key-1"}
    with served.client() as client, ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: client.post("/create-loan", json=request, headers=headers), range(20)))
        again = client.post("/create-loan", json=request, headers=headers)
        reused = client.post("/create-loan", json={**request, "loan_amount": 100_001}, headers=headers)
    assert {r.status_code for r in responses} == {201}
    assert len({r.text for r in responses}) == 1
    assert again.status_code == 201 and again.json() == responses[0].json()
    assert reused.status_code == 422
    assert "different request" in reused.json()["error"]["message"]
    loans = served.scalar(f"SELECT count(*) FROM readmodel.loans WHERE customer_id = {customer['customer_id']}")
    assert loans == 1
    figures.update(requests=22, loans_booked=loans, **served.audit())


def test_every_answer_after_a_command_includes_it_whichever_process_reads(served: Served, figures: dict[str, Any]) -> None:
    """The API's processes keep their answers and serve them without a query. Eight clients each
    book, repay and read their own customer, every request on a new connection (so either process
    may take it): each read after a command's answer must include that command, in view-loans,
    view-loan and check-eligibility alike, though the read before it was kept."""
    customers = [register(served, 9_300_100_000 + n, income=500_000)["customer_id"] for n in range(8)]
    headers = {"Connection": "close"}

    def follow_one(customer_id: int) -> int:
        reads = 0
        booked: dict[int, int] = {}  # loan ID -> repayments left

        def read_and_check(client: httpx.Client) -> None:
            nonlocal reads
            for _ in range(2):
                listed = client.get(f"/view-loans/{customer_id}", headers=headers).json()
                assert {loan["loan_id"]: loan["repayments_left"] for loan in listed} == booked
                body = {"customer_id": customer_id, "loan_amount": 1_000, "interest_rate": 12, "tenure": 6}
                answer = client.post("/check-eligibility", json=body, headers=headers).json()
                assert answer["credit_score_breakdown"]["inputs"]["loans_taken"] == len(booked)
                assert client.get(f"/view-loan/{max(booked)}", headers=headers).status_code == 200
                reads += 3

        with served.client() as client:
            for _ in range(6):
                request = {"customer_id": customer_id, "loan_amount": 20_000, "interest_rate": 12, "tenure": 12}
                response = client.post("/create-loan", json=request, headers=headers)
                assert response.status_code == 201, response.text
                booked[response.json()["loan_id"]] = 12
                read_and_check(client)  # kept from here on, until a notice names the customer
                loan_id = min(booked)
                assert client.post(f"/loans/{loan_id}/repayments", json={}, headers=headers).status_code == 201
                booked[loan_id] -= 1
                read_and_check(client)
        return reads

    with ThreadPoolExecutor(len(customers)) as pool:
        reads = sum(pool.map(follow_one, customers))
    figures.update(clients=len(customers), commands=len(customers) * 12, reads_checked=reads, **served.audit())


def test_eighty_readiness_probes_at_once_are_all_answered_and_commands_go_on(served: Served, figures: dict[str, Any]) -> None:
    """Each /ready pinged Celery's workers on a thread, holding one of its ten pooled broker
    connections while it waited for another: twenty at once hung an API process for good, and
    every command after them waited for ever (a review)."""
    with served.client(timeout=30) as client, ThreadPoolExecutor(80) as pool:
        probes = list(pool.map(lambda _: client.get("/ready"), range(80)))
        # Then commands, which trigger the projection through the same broker connections, on both processes.
        customers = [register(served, 9_400_000_000 + n) for n in range(6)]
        booked = [
            client.post(
                "/create-loan",
                json={"customer_id": c["customer_id"], "loan_amount": 10_000, "interest_rate": 14, "tenure": 6},
            )
            for c in customers
        ]
    assert [p.status_code for p in probes] == [200] * 80, {p.status_code: p.text for p in probes}
    assert {p.json()["checks"]["worker"]["detail"] for p in probes} == {"a worker answered"}
    assert [b.status_code for b in booked] == [201] * 6, [b.text for b in booked]
    figures.update(probes=80, bookings=6, **served.audit())
