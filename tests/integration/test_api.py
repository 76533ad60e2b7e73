"""The HTTP API against real PostgreSQL, Redis and a Celery worker."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

import pytest
from starlette.testclient import TestClient

from ledger.policy import monthly_installment
from projections.projector import LOCK_KEY
from tests.integration.conftest import Stack

_phones = itertools.count(9_800_000_001)


def register(client: TestClient, income: int = 100_000, **overrides: Any) -> dict[str, Any]:
    body = {"first_name": "Asha", "last_name": "Iyer", "age": 30, "monthly_income": income, "phone_number": next(_phones)}
    body.update(overrides)
    response = client.post("/register", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def loan_body(customer_id: int, amount: float = 100_000, rate: float = 14, tenure: int = 12) -> dict[str, Any]:
    return {"customer_id": customer_id, "loan_amount": amount, "interest_rate": rate, "tenure": tenure}


JSON = {"Content-Type": "application/json"}


def count_rows(stack: Stack, table: str) -> int:
    with stack.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM readmodel.{table}").fetchone()
        events = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
    assert row is not None and events is not None
    return int(row[0]) * 1_000_000 + int(events[0])


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error  # type: ignore[no-any-return]


# Register


def test_register_returns_the_customer_with_the_approved_limit_rounded_to_a_lakh(client: TestClient) -> None:
    response = client.post(
        "/register",
        json={"first_name": "Ravi", "last_name": "Kumar", "age": 28, "monthly_income": 12500, "phone_number": "9812345678"},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "Ravi Kumar"
    assert body["age"] == 28
    assert body["monthly_income"] == 12500
    assert body["approved_limit"] == 500_000  # 36 x 12,500 = 450,000: a half, rounded up
    assert body["phone_number"] == 9812345678
    assert isinstance(body["customer_id"], int)


def test_register_accepts_monthly_salary_as_an_alias(client: TestClient) -> None:
    response = client.post(
        "/register",
        json={"first_name": "Mia", "last_name": "Das", "age": 41, "monthly_salary": 40_000, "phone_number": next(_phones)},
    )
    assert response.status_code == 201
    assert response.json()["monthly_income"] == 40_000
    assert response.json()["approved_limit"] == 1_400_000


def test_a_phone_number_belongs_to_one_customer(stack: Stack, client: TestClient) -> None:
    first = register(client, phone_number=9_700_000_000)
    before = count_rows(stack, "customers")
    again = client.post(
        "/register",
        json={"first_name": "Other", "last_name": "Person", "age": 50, "monthly_income": 10_000, "phone_number": "9700000000"},
    )
    error = assert_error(again, 409, "phone_number_taken")
    assert "9700000000" in error["message"]
    assert count_rows(stack, "customers") == before
    assert first["phone_number"] == 9_700_000_000


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"age": 17}, "age"),
        ({"age": 101}, "age"),
        ({"age": "30"}, "age"),
        ({"age": 30.5}, "age"),
        ({"monthly_income": 0}, "monthly_income"),
        ({"monthly_income": -5}, "monthly_income"),
        ({"monthly_income": "5000"}, "monthly_income"),
        ({"monthly_income": True}, "monthly_income"),
        ({"phone_number": 123456789}, "phone_number"),
        ({"phone_number": "1234567890123456"}, "phone_number"),
        ({"phone_number": "98765x4321"}, "phone_number"),
        ({"first_name": "   "}, "first_name"),
        ({"first_name": "x" * 101}, "first_name"),
        ({"last_name": None}, "last_name"),
        ({"phone_number": "9876543210\n"}, "phone_number"),
        ({"first_name": "a\x85b"}, "first_name"),
    ],
)
def test_register_rejects_bad_fields_field_by_field(stack: Stack, client: TestClient, change: dict[str, Any], field: str) -> None:
    body = {"first_name": "A", "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": next(_phones)}
    body.update(change)
    before = count_rows(stack, "customers")
    error = assert_error(client.post("/register", json=body), 400, "validation_error")
    assert [d["field"] for d in error["details"]] == [field]
    assert count_rows(stack, "customers") == before


def test_register_reports_every_missing_field(client: TestClient) -> None:
    error = assert_error(client.post("/register", json={}), 400, "validation_error")
    assert {d["field"] for d in error["details"]} == {"first_name", "last_name", "age", "monthly_income", "phone_number"}


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[1,2]", b"null", b'"text"', b"{'a': 1}", b"\xff\xfe", b'{"first_name": "\xff\xfe"}', b"[" * 1000 + b"]" * 1000],
)
def test_malformed_json_is_a_400(client: TestClient, body: bytes) -> None:
    for path in ("/register", "/check-eligibility", "/create-loan"):
        assert_error(client.post(path, content=body, headers=JSON), 400, "malformed_json")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_not_declared_as_json_is_a_415_and_changes_nothing(
    stack: Stack, client: TestClient, content_type: str | None
) -> None:
    """A browser sends these to any site without a CORS preflight: a page an operator opened
    booked a loan with a text/plain body (a review)."""
    customer = register(client, income=200_000)
    before = count_rows(stack, "loans")
    body = json.dumps(loan_body(customer["customer_id"], 10_000, 15, 6)).encode()
    sent = client.post("/create-loan", content=body, headers={} if content_type is None else {"Content-Type": content_type})
    error = assert_error(sent, 415, "unsupported_media_type")
    assert error["message"].startswith("send the body as JSON, with Content-Type: application/json")
    assert count_rows(stack, "loans") == before
    for declared in ("application/json", "Application/JSON; charset=utf-8", "application/problem+json"):
        assert client.post("/check-eligibility", content=body, headers={"Content-Type": declared}).status_code == 200, declared
    # No body, nothing to declare: a repayment's body is optional.
    loan = client.post("/create-loan", json=loan_body(customer["customer_id"], 10_000, 15, 6)).json()["loan_id"]
    assert client.post(f"/loans/{loan}/repayments").status_code == 201


def test_a_misspelt_or_repeated_field_is_a_400_and_changes_nothing(stack: Stack, client: TestClient) -> None:
    """A misspelt optional field was dropped without a word: {"paidOn": ...} recorded a repayment
    paid today, for good, and {"customer_file": ...} imported the bundled files. Of a field given
    twice, the last value was taken (a review)."""
    customer = register(client, income=200_000)
    loan = client.post("/create-loan", json=loan_body(customer["customer_id"], 10_000, 15, 6)).json()["loan_id"]
    before = count_rows(stack, "repayments") + count_rows(stack, "import_jobs")
    error = assert_error(client.post(f"/loans/{loan}/repayments", json={"paidOn": "2026-11-01"}), 400, "validation_error")
    assert error["details"] == [{"field": "paidOn", "message": "Unknown field; the fields are paid_on"}]
    misspelt = {"customer_file": "customer_data.xlsx", "loan_file": "loan_data.xlsx"}
    error = assert_error(client.post("/imports", json=misspelt), 400, "validation_error")
    assert [d["field"] for d in error["details"]] == ["customer_file", "loan_file"]
    twice = b'{"customer_id": %d, "loan_amount": 10000, "interest_rate": 15, "tenure": 6, "loan_amount": 900000}'
    error = assert_error(
        client.post("/create-loan", content=twice % customer["customer_id"], headers=JSON), 400, "validation_error"
    )
    assert error["details"] == [{"field": "loan_amount", "message": "This field is given more than once"}]
    assert count_rows(stack, "repayments") + count_rows(stack, "import_jobs") == before
    assert [row["loan_id"] for row in client.get(f"/view-loans/{customer['customer_id']}").json()] == [loan]


# Check eligibility and create loan


def test_a_new_customer_is_approved_at_twelve_percent_or_more(client: TestClient) -> None:
    customer = register(client, income=100_000)
    response = client.post("/check-eligibility", json=loan_body(customer["customer_id"], 100_000, 10, 12))
    assert response.status_code == 200
    body = response.json()
    assert body["approval"] is True
    assert body["credit_score"] == 40
    assert body["interest_rate"] == 10
    assert body["corrected_interest_rate"] == 12
    assert body["monthly_installment"] == 8884.88  # 100,000 at 12% over 12 months
    assert "message" not in body
    breakdown = body["credit_score_breakdown"]
    assert breakdown["base"] == 40
    assert breakdown["inputs"]["loans_taken"] == 0


def test_affordability_and_limit_rules_refuse_with_a_reason(client: TestClient) -> None:
    customer = register(client, income=20_000)  # limit 700,000; half of income 10,000
    too_dear = client.post("/check-eligibility", json=loan_body(customer["customer_id"], 200_000, 14, 12)).json()
    assert too_dear["approval"] is False
    assert "50% of monthly income" in too_dear["message"]
    too_big = client.post("/check-eligibility", json=loan_body(customer["customer_id"], 800_000, 14, 600)).json()
    assert too_big["approval"] is False
    assert "approved limit" in too_big["message"]


def test_create_loan_books_what_check_eligibility_approves_and_it_is_visible_at_once(client: TestClient) -> None:
    customer = register(client, income=150_000)
    request = loan_body(customer["customer_id"], 250_000, 13.5, 24)
    eligibility = client.post("/check-eligibility", json=request).json()
    created = client.post("/create-loan", json=request)
    assert created.status_code == 201
    booked = created.json()
    assert booked["loan_approved"] is eligibility["approval"] is True
    assert booked["monthly_installment"] == eligibility["monthly_installment"]
    assert created.headers["X-Read-Model"] == "current"
    # Read-your-writes: no waiting, no retrying.
    loan = client.get(f"/view-loan/{booked['loan_id']}")
    assert loan.status_code == 200
    assert loan.json() == {
        "loan_id": booked["loan_id"],
        "customer": {
            "id": customer["customer_id"],
            "first_name": "Asha",
            "last_name": "Iyer",
            "phone_number": customer["phone_number"],
            "age": 30,
        },
        "loan_amount": 250_000,
        "interest_rate": 13.5,
        "monthly_installment": float(monthly_installment(Decimal(250_000), Decimal("13.5"), 24)),
        "tenure": 24,
    }
    loans = client.get(f"/view-loans/{customer['customer_id']}").json()
    assert loans == [
        {
            "loan_id": booked["loan_id"],
            "loan_amount": 250_000,
            "interest_rate": 13.5,
            "monthly_installment": booked["monthly_installment"],
            "repayments_left": 24,
        }
    ]


def test_a_loan_is_booked_at_the_corrected_rate(client: TestClient) -> None:
    customer = register(client, income=100_000)
    booked = client.post("/create-loan", json=loan_body(customer["customer_id"], 100_000, 8, 12)).json()
    assert booked["loan_approved"] is True
    assert booked["monthly_installment"] == 8884.88
    assert client.get(f"/view-loan/{booked['loan_id']}").json()["interest_rate"] == 12


def test_a_refused_loan_books_nothing(stack: Stack, client: TestClient) -> None:
    customer = register(client, income=10_000)
    before = count_rows(stack, "loans")
    refused = client.post("/create-loan", json=loan_body(customer["customer_id"], 300_000, 14, 12))
    assert refused.status_code == 200
    body = refused.json()
    assert body["loan_id"] is None
    assert body["loan_approved"] is False
    assert "Loan not approved" in body["message"]
    assert count_rows(stack, "loans") == before
    assert client.get(f"/view-loans/{customer['customer_id']}").json() == []


def test_a_loan_whose_emi_only_pays_the_interest_is_refused_and_books_nothing(stack: Stack, client: TestClient) -> None:
    customer = register(client, income=50_000)
    before = count_rows(stack, "loans")
    balloon = loan_body(customer["customer_id"], 100, 12, 600)  # EMI 1.00, the first month's interest 1.00
    eligibility = client.post("/check-eligibility", json=balloon).json()
    assert (eligibility["approval"], eligibility["monthly_installment"]) == (False, 1)
    assert "the monthly installment (1.00) would only pay the first month's interest (1.00)" in eligibility["message"]
    refused = client.post("/create-loan", json=balloon)
    assert refused.status_code == 200
    assert (refused.json()["loan_id"], refused.json()["message"]) == (None, eligibility["message"])
    assert count_rows(stack, "loans") == before
    repaid = client.post("/create-loan", json=loan_body(customer["customer_id"], 1000, 12, 600))  # EMI 10.03
    assert (repaid.status_code, repaid.json()["loan_approved"]) == (201, True)


def test_a_loan_whose_emi_rounds_to_zero_is_refused_and_books_nothing(stack: Stack, client: TestClient) -> None:
    customer = register(client, income=50_000)
    before = count_rows(stack, "loans")
    tiny = loan_body(customer["customer_id"], 0.01, 12, 600)
    eligibility = client.post("/check-eligibility", json=tiny).json()
    assert eligibility["approval"] is False
    assert eligibility["monthly_installment"] == 0
    assert "too small to repay in cents over 600 months" in eligibility["message"]
    refused = client.post("/create-loan", json=tiny)
    assert refused.status_code == 200
    assert refused.json()["loan_id"] is None
    assert refused.json()["message"] == eligibility["message"]
    assert count_rows(stack, "loans") == before


def test_numbers_spelled_with_many_zeros_are_stored_plainly_and_the_read_model_goes_on(client: TestClient) -> None:
    # JSON may spell 12,500 with 16,400 zeros after the point. Stored as given, PostgreSQL's
    # numeric (16,383 decimals at most) refused it, and the projection stopped at that event:
    # every later command answered X-Read-Model: behind. (Other spellings: tests/unit.)
    phone = next(_phones)
    body = b'{"first_name": "Zero", "last_name": "Pad", "age": 30, "monthly_income": 12500.%s, "phone_number": %d}'
    registered = client.post("/register", content=body % (b"0" * 16_400, phone), headers=JSON)
    assert registered.status_code == 201, registered.text
    assert registered.headers["X-Read-Model"] == "current"
    customer_id = registered.json()["customer_id"]
    assert client.get(f"/customers/{customer_id}").json()["monthly_income"] == 12500
    request = b'{"customer_id": %d, "loan_amount": 1000.%s, "interest_rate": 12.%s, "tenure": 10}'
    created = client.post("/create-loan", content=request % (customer_id, b"0" * 16_400, b"0" * 16_400), headers=JSON)
    assert created.status_code == 201, created.text
    assert created.headers["X-Read-Model"] == "current"
    loan = client.get(f"/view-loan/{created.json()['loan_id']}").json()
    assert (loan["loan_amount"], loan["interest_rate"]) == (1000, 12)
    after = client.post(
        "/register",
        json={"first_name": "Next", "last_name": "One", "age": 40, "monthly_income": 9000, "phone_number": next(_phones)},
    )
    assert after.headers["X-Read-Model"] == "current"  # and the commands after them are projected too


def test_later_bookings_see_the_earlier_ones(client: TestClient) -> None:
    customer = register(client, income=30_000)  # half of income: 15,000
    first = client.post("/create-loan", json=loan_body(customer["customer_id"], 100_000, 12, 12)).json()
    second = client.post("/create-loan", json=loan_body(customer["customer_id"], 100_000, 12, 12)).json()
    assert first["loan_approved"] is True
    assert second["loan_approved"] is False  # 8,884.88 twice exceeds 15,000
    eligibility = client.post("/check-eligibility", json=loan_body(customer["customer_id"], 100_000, 12, 12)).json()
    assert eligibility["approval"] is False
    assert eligibility["credit_score_breakdown"]["inputs"]["current_loans"] == 1


def test_idempotency_key_replays_the_first_response_and_books_once(stack: Stack, client: TestClient) -> None:
    customer = register(client, income=200_000)
    request = loan_body(customer["customer_id"], 100_000, 15, 6)
    headers = {"Idempotency-Key": f"order-{customer['customer_id']}"}
    first = client.post("/create-loan", json=request, headers=headers)
    loans_after_first = count_rows(stack, "loans")
    second = client.post("/create-loan", json=request, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert count_rows(stack, "loans") == loans_after_first
    other = client.post("/create-loan", json={**request, "tenure": 7}, headers=headers)
    error = assert_error(other, 422, "idempotency_key_reused")
    assert "different request" in error["message"]


def test_two_idempotency_keys_on_one_request_are_refused_and_book_nothing(stack: Stack, client: TestClient) -> None:
    """The first header was used and the second ignored: a later request under the second key,
    with another body, booked a second loan instead of a 422 (from a review)."""
    customer = register(client, income=200_000)
    request = loan_body(customer["customer_id"], 100_000, 15, 6)
    loans_before = count_rows(stack, "loans")
    both = client.post(
        "/create-loan", json=request, headers=[("Idempotency-Key", "first-key"), ("Idempotency-Key", "second-key")]
    )
    error = assert_error(both, 400, "validation_error")
    assert error["message"] == "send one Idempotency-Key header, not 2"
    assert count_rows(stack, "loans") == loans_before
    long_key = client.post("/create-loan", json=request, headers={"Idempotency-Key": "k" * 256})
    assert assert_error(long_key, 400, "validation_error")["message"].startswith("Idempotency-Key must be 1 to 255 printable")


def test_an_idempotency_key_is_the_same_key_without_the_spaces_around_it(stack: Stack, client: TestClient) -> None:
    """ "retry-42", "retry-42 " and "retry-42<tab>" were three keys, and booked three loans: spaces
    and tabs around a header's value are not part of it, and a proxy may trim them (a review)."""
    customer = register(client, income=200_000)
    request = loan_body(customer["customer_id"], 100_000, 15, 6)
    loans_before = count_rows(stack, "loans")
    answers = [
        client.post("/create-loan", json=request, headers=[("Idempotency-Key", key)])
        for key in (f"retry-{customer['customer_id']}", f"retry-{customer['customer_id']} ", f"retry-{customer['customer_id']}\t")
    ]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert len({a.json()["loan_id"] for a in answers}) == 1
    assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true", "true"]
    assert count_rows(stack, "loans") // 1_000_000 == loans_before // 1_000_000 + 1  # one loan (and its events)
    # The length is the key's, without the spaces; what is not printable ASCII is refused.
    padded = client.post("/create-loan", json=request, headers=[("Idempotency-Key", "k" + " " * 300)])
    assert padded.status_code == 201 and padded.headers.get("Idempotent-Replayed") is None  # "k", a new key
    for bad in ("café".encode(), b"a\xa0", b"\x85"):  # UTF-8, and two bytes Python's strip() took for spaces
        refused = client.post("/create-loan", json=request, headers=[("Idempotency-Key", bad)])
        assert assert_error(refused, 400, "validation_error")["message"].startswith("Idempotency-Key must be 1 to 255 printable")


def test_a_replay_waits_for_the_read_model_as_the_first_answer_does(stack: Stack, client: TestClient) -> None:
    # A client whose first answer was lost (or came back behind) retries with its key, then views.
    customer = register(client, income=200_000)
    request = loan_body(customer["customer_id"], 100_000, 15, 6)
    headers = {"Idempotency-Key": f"lost-{customer['customer_id']}"}
    with stack.connect() as held:
        held.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))  # no projection runs meanwhile
        first = client.post("/create-loan", json=request, headers=headers)
        assert first.status_code == 201 and first.headers["X-Read-Model"] == "behind"
        held.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    replay = client.post("/create-loan", json=request, headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["X-Read-Model"] == "current"
    assert client.get(f"/view-loan/{replay.json()['loan_id']}").status_code == 200
    # A registration's replay too.
    body = {"first_name": "Ira", "last_name": "Das", "age": 33, "monthly_income": 45_000, "phone_number": next(_phones)}
    keyed = {"Idempotency-Key": f"register-{body['phone_number']}"}
    with stack.connect() as held:
        held.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        assert client.post("/register", json=body, headers=keyed).headers["X-Read-Model"] == "behind"
        held.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    again = client.post("/register", json=body, headers=keyed)
    assert again.headers["X-Read-Model"] == "current"
    assert client.get(f"/customers/{again.json()['customer_id']}").status_code == 200


def test_a_registration_sent_again_with_its_idempotency_key_answers_with_the_same_customer(
    stack: Stack, client: TestClient
) -> None:
    body = {"first_name": "Ira", "last_name": "Sen", "age": 33, "monthly_income": 45_000, "phone_number": next(_phones)}
    headers = {"Idempotency-Key": f"register-{body['phone_number']}"}
    first = client.post("/register", json=body, headers=headers)
    customers_after_first = count_rows(stack, "customers")
    second = client.post("/register", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert count_rows(stack, "customers") == customers_after_first
    assert_error(client.post("/register", json={**body, "age": 34}, headers=headers), 422, "idempotency_key_reused")
    assert_error(client.post("/register", json=body), 409, "phone_number_taken")  # no key: a second registration


@pytest.mark.parametrize("path", ["/check-eligibility", "/create-loan"])
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"customer_id": 0}, "customer_id"),
        ({"customer_id": "1"}, "customer_id"),
        ({"customer_id": 2**64}, "customer_id"),
        ({"loan_amount": 0}, "loan_amount"),
        ({"loan_amount": "100"}, "loan_amount"),
        ({"interest_rate": -1}, "interest_rate"),
        ({"interest_rate": 100.5}, "interest_rate"),
        ({"tenure": 0}, "tenure"),
        ({"tenure": 601}, "tenure"),
        ({"tenure": 12.5}, "tenure"),
    ],
)
def test_loan_requests_reject_bad_fields(client: TestClient, path: str, change: dict[str, Any], field: str) -> None:
    error = assert_error(client.post(path, json={**loan_body(1), **change}), 400, "validation_error")
    assert [d["field"] for d in error["details"]] == [field]


@pytest.mark.parametrize("path", ["/check-eligibility", "/create-loan"])
def test_unknown_customer_is_a_404(client: TestClient, path: str) -> None:
    assert_error(client.post(path, json=loan_body(987_654_321)), 404, "customer_not_found")


# Views


def test_view_loan_and_view_loans_errors(client: TestClient) -> None:
    assert_error(client.get("/view-loan/987654321"), 404, "loan_not_found")
    assert_error(client.get("/view-loan/abc"), 400, "validation_error")
    assert_error(client.get("/view-loan/-3"), 400, "validation_error")
    for too_large in ("/view-loan/9223372036854775808", "/view-loan/99999999999999999999999"):  # said "not a positive integer"
        assert assert_error(client.get(too_large), 400, "validation_error")["message"] == (
            "loan_id must be a positive integer of at most 9223372036854775807"
        )
    assert client.get("/view-loan/9223372036854775807").status_code == 404
    assert_error(client.get("/view-loans/987654321"), 404, "customer_not_found")
    customer = register(client)
    assert client.get(f"/view-loans/{customer['customer_id']}").json() == []
    # Leading zeros: the same number at any length (one of 20 characters was refused, a review).
    for path in (f"/view-loans/0{customer['customer_id']}", f"/view-loans/{customer['customer_id']:020d}"):
        assert client.get(path).json() == [], path
    for zeros in ("/view-loan/0", "/view-loan/" + "0" * 5000, "/view-loan/" + "0" * 5000 + "9" * 20):
        assert_error(client.get(zeros), 400, "validation_error")


# Paths, methods, documents


@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_every_path_is_served_with_a_trailing_slash_and_under_api(client: TestClient, prefix: str, slash: str) -> None:
    registered = client.post(
        f"{prefix}/register{slash}",
        json={"first_name": "P", "last_name": "V", "age": 30, "monthly_income": 90_000, "phone_number": next(_phones)},
    )
    assert registered.status_code == 201
    customer_id = registered.json()["customer_id"]
    assert client.post(f"{prefix}/check-eligibility{slash}", json=loan_body(customer_id)).status_code == 200
    created = client.post(f"{prefix}/create-loan{slash}", json=loan_body(customer_id))
    assert created.status_code == 201
    assert client.get(f"{prefix}/view-loan/{created.json()['loan_id']}{slash}").status_code == 200
    assert len(client.get(f"{prefix}/view-loans/{customer_id}{slash}").json()) == 1


def test_wrong_method_is_a_405_in_the_error_shape(client: TestClient) -> None:
    for method, path in [
        ("GET", "/register"),
        ("DELETE", "/create-loan"),
        ("POST", "/view-loan/1"),
        ("PUT", "/api/view-loans/1/"),
    ]:
        assert_error(client.request(method, path), 405, "method_not_allowed")


def test_unknown_path_is_a_404_in_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/no-such-thing"), 404, "not_found")


def test_a_path_with_two_trailing_slashes_is_a_404_not_a_redirect_to_the_host_header(client: TestClient) -> None:
    for method, path in [("GET", "/view-loan/1//"), ("POST", "/register//"), ("GET", "/api/view-loans/1//")]:
        response = client.request(method, path, headers={"Host": "attacker.example"}, follow_redirects=False)
        assert_error(response, 404, "not_found")
        assert "location" not in response.headers
    for prefix in ("", "/api"):  # the documents are served as every path is (they were not under /api)
        assert client.get(f"{prefix}/docs/").status_code == client.get(f"{prefix}/docs").status_code == 200
        assert client.get(f"{prefix}/openapi.json/").json()["openapi"] == client.get(f"{prefix}/openapi.json").json()["openapi"]


def test_openapi_document_describes_every_endpoint(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) >= {
        "/register",
        "/check-eligibility",
        "/create-loan",
        "/view-loan/{loan_id}",
        "/view-loans/{customer_id}",
        "/imports/{job_id}",
    }
    register_schema = document["components"]["schemas"]["RegisterRequest"]
    assert register_schema["properties"]["age"] == {
        "type": "integer",
        "minimum": 18,
        "maximum": 100,
        "description": "Years: a whole number written as one (12, not 12.0 or 1.2e1)",
    }
    assert document["paths"]["/create-loan"]["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateLoanResponse"
    }
    # What the server does, documented (a review): a field it does not have is refused, the alias
    # is taken; a body over 1 MiB is a 413; an ID past PostgreSQL's bigint is a 400; every
    # endpoint that reads the database answers 503 without it (tests/stress/test_faults.py).
    assert register_schema["additionalProperties"] is False
    assert register_schema["properties"]["monthly_salary"]["type"] == register_schema["properties"]["monthly_income"]["type"]
    assert "monthly_income" not in register_schema["required"]
    assert register_schema["allOf"] == [{"anyOf": [{"required": ["monthly_income"]}, {"required": ["monthly_salary"]}]}]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert {"413", "415"} <= set(operation["responses"]), (method, path)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["schema"]["type"] == "integer":
                    assert parameter["schema"]["maximum"] == 2**63 - 1, (method, path)
            if path not in ("/health", "/metrics"):
                assert "503" in operation["responses"], (method, path)


def test_docs_page_works_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "https://" not in page.text and "http://" not in page.text
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/static/swagger-ui.css").status_code == 200
    # Served whole whatever Range asks: Starlette answered a bad one in plain text (400, 416).
    whole = client.get("/docs/static/swagger-ui.css").content
    for asked in ("bytes=99999999-", "bytes=abc", "bytes=0-10"):
        response = client.get("/docs/static/swagger-ui.css", headers={"Range": asked})
        assert (response.status_code, response.content) == (200, whole), asked
