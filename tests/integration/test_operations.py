"""Repayments, schedules, profiles, audit trails, health, metrics, logs and the CLI,
through HTTP (and the `ledger` command) against real PostgreSQL, Redis and a worker."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
from eventsourcing.persistence import OperationalError
from psycopg.conninfo import make_conninfo
from starlette.testclient import TestClient

from api.app import create_app
from infra.cli import _descendants
from infra.config import REPO_ROOT
from infra.logs import JsonFormatter
from infra.postgres import OrderedInsertRecorder, build_ledger
from infra.stack import free_port
from ledger.ports import FixedClock
from tests.integration.conftest import TODAY, Stack, wait_healthy
from tests.integration.test_import import follow, start
from workers import tasks

_phones = iter(range(9_600_100_000, 9_600_200_000))


def new_customer(client: TestClient, income: int = 200_000) -> int:
    response = client.post(
        "/register",
        json={"first_name": "Ria", "last_name": "Pal", "age": 36, "monthly_income": income, "phone_number": next(_phones)},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["customer_id"])


def book(client: TestClient, customer_id: int, amount: int = 60_000, rate: int = 12, tenure: int = 3) -> dict[str, Any]:
    response = client.post(
        "/create-loan", json={"customer_id": customer_id, "loan_amount": amount, "interest_rate": rate, "tenure": tenure}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module", autouse=True)
def imported(client: TestClient) -> dict[str, Any]:
    """The reference history, imported before anyone registers (so the file's IDs are free)."""
    return follow(client, start(client))


# Repayments


def test_repayments_follow_through_to_views_profile_and_schedule(client: TestClient) -> None:
    customer_id = new_customer(client)
    loan = book(client, customer_id)  # starts TODAY (2026-11-22); due 2026-12-22, 2027-01-22, 2027-02-22
    paid = client.post(f"/loans/{loan['loan_id']}/repayments", json={})
    assert paid.status_code == 201, paid.text
    assert paid.headers["X-Read-Model"] == "current"
    body = paid.json()
    assert (body["installment"], body["paid_on"], body["due_date"], body["on_time"]) == (1, TODAY.isoformat(), "2026-12-22", True)
    assert body["amount"] == loan["monthly_installment"]
    assert body["repayments_left"] == 2 and body["loan_closed"] is False
    assert client.get(f"/view-loans/{customer_id}").json()[0]["repayments_left"] == 2
    schedule = client.get(f"/loans/{loan['loan_id']}/schedule").json()
    assert [(row["paid"], row["on_time"], row["paid_on"]) for row in schedule["installments"]] == [
        (True, True, TODAY.isoformat()),
        (False, None, None),
        (False, None, None),
    ]
    profile = client.get(f"/customers/{customer_id}").json()
    assert profile["current_loans"] == 1 and profile["current_debt"] == 60_000


def test_the_last_repayment_closes_the_loan_and_another_is_refused(client: TestClient) -> None:
    customer_id = new_customer(client)
    loan_id = book(client, customer_id, tenure=2)["loan_id"]
    client.post(f"/loans/{loan_id}/repayments")
    last = client.post(f"/loans/{loan_id}/repayments").json()
    assert last["loan_closed"] is True and last["repayments_left"] == 0
    assert client.get(f"/view-loans/{customer_id}").json() == []
    profile = client.get(f"/customers/{customer_id}").json()
    assert (profile["current_loans"], profile["past_loans"], profile["current_debt"]) == (0, 1, 0)
    assert profile["credit_score_breakdown"]["inputs"]["completed_loans"] == 1
    closed = client.post(f"/loans/{loan_id}/repayments")
    assert closed.status_code == 409
    assert closed.json()["error"]["code"] == "loan_closed"


@pytest.mark.parametrize(("paid_on", "message"), [("2026-11-21", "before the loan started"), ("2026-11-23", "in the future")])
def test_a_repayment_dated_outside_the_loan_is_a_400_and_records_nothing(client: TestClient, paid_on: str, message: str) -> None:
    loan_id = book(client, new_customer(client))["loan_id"]
    response = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": paid_on})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert client.get(f"/loans/{loan_id}/history").json()[-1]["type"] == "Loan.Booked"


def test_repayment_errors(client: TestClient) -> None:
    assert client.post("/loans/987654321/repayments").status_code == 404
    assert client.post("/loans/abc/repayments").status_code == 400
    loan_id = book(client, new_customer(client))["loan_id"]
    assert client.post(f"/loans/{loan_id}/repayments", json={"paid_on": "yesterday"}).status_code == 400


def test_a_repayment_with_an_idempotency_key_is_recorded_once(client: TestClient) -> None:
    loan_id = book(client, new_customer(client))["loan_id"]
    headers = {"Idempotency-Key": f"repay-{loan_id}"}
    first = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": TODAY.isoformat()}, headers=headers)
    again = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": TODAY.isoformat()}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert client.get(f"/view-loan/{loan_id}").status_code == 200
    assert [e["type"] for e in client.get(f"/loans/{loan_id}/history").json()].count("Loan.RepaymentRecorded") == 1
    other = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": "2026-11-22"}, headers={"Idempotency-Key": "x"})
    reused = client.post(f"/loans/{loan_id}/repayments", json={}, headers=headers)
    assert other.status_code == 201
    assert reused.status_code == 422


def test_an_imported_loan_takes_repayments_and_its_trail_starts_in_its_customers_history(
    client: TestClient, imported: dict[str, Any]
) -> None:
    """Loan 5152 (customer 28: 147 months, 126 paid) was imported inside its customer's history event."""
    before = client.get("/loans/5152/history").json()
    assert [e["type"] for e in before] == ["Customer.HistoryImported"]
    assert 5152 in [terms["loan_id"] for terms in before[0]["data"]["loans"]]
    assert {ln["loan_id"]: ln["repayments_left"] for ln in client.get("/view-loans/28").json()}[5152] == 21
    due = client.get("/loans/5152/schedule").json()["installments"][126]

    paid = client.post("/loans/5152/repayments", json={})

    assert paid.status_code == 201, paid.text
    body = paid.json()
    assert (body["installment"], body["repayments_left"]) == (127, 20)
    assert (body["due_date"], body["amount"]) == (due["due_date"], due["payment"])
    assert paid.headers["X-Read-Model"] == "current"
    assert {ln["loan_id"]: ln["repayments_left"] for ln in client.get("/view-loans/28").json()}[5152] == 20
    assert client.get("/view-loan/5152").json()["customer"]["id"] == 28
    after = client.get("/loans/5152/history").json()
    assert [e["type"] for e in after] == ["Customer.HistoryImported", "Loan.Opened", "Loan.RepaymentRecorded"]
    assert after[1]["data"]["emis_paid"] == 126 and after[2]["data"]["installment"] == 127
    assert client.get("/customers/28/history").json()[-1]["type"] == "Customer.RepaymentRecorded"


def test_a_repayment_dated_before_the_last_one_paid_is_a_400_and_records_nothing(stack: Stack, client: TestClient) -> None:
    """Installments are paid in turn: one dated before the last payment would be counted on time."""
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT loan_id FROM readmodel.loans WHERE origin = 'imported' AND loan_id <> 5152"
            " AND tenure - emis_paid >= 2 AND end_date > %s AND start_date < %s ORDER BY loan_id DESC LIMIT 1",
            (TODAY, TODAY - timedelta(days=60)),
        ).fetchone()
    assert row is not None
    loan_id = row[0]
    first = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": (TODAY - timedelta(days=10)).isoformat()})
    assert first.status_code == 201, first.text
    earlier = (TODAY - timedelta(days=30)).isoformat()
    refused = client.post(f"/loans/{loan_id}/repayments", json={"paid_on": earlier})
    assert refused.status_code == 400
    assert f"which was paid on {(TODAY - timedelta(days=10)).isoformat()}" in refused.json()["error"]["message"]
    assert [e["type"] for e in client.get(f"/loans/{loan_id}/history").json()][-1] == "Loan.RepaymentRecorded"
    assert len(client.get(f"/loans/{loan_id}/history").json()) == 3  # the history, the opening, one repayment
    assert (
        client.post(f"/loans/{loan_id}/repayments", json={"paid_on": (TODAY - timedelta(days=10)).isoformat()}).status_code == 201
    )


# Schedules


def test_a_booked_loans_schedule_is_exact_to_the_cent(client: TestClient) -> None:
    loan = book(client, new_customer(client, income=500_000), amount=1_000_000, rate=13, tenure=36)
    schedule = client.get(f"/loans/{loan['loan_id']}/schedule").json()
    rows = schedule["installments"]
    assert len(rows) == 36
    assert sum(Decimal(str(r["principal"])) for r in rows) == Decimal(1_000_000)
    assert rows[-1]["balance"] == 0
    assert all(r["payment"] == loan["monthly_installment"] for r in rows[:-1])
    assert rows[0]["due_date"] == "2026-12-22" and rows[-1]["due_date"] == "2029-11-22"


def test_an_imported_loans_schedule_follows_the_files_payment(client: TestClient, imported: dict[str, Any]) -> None:
    response = client.get("/loans/5930/schedule")  # 900,000 at 8.2% over 129 months, paying 15,344; 114 paid
    schedule, rows = response.json(), response.json()["installments"]
    # In cents, as every answer gives money, though the file spells the payment 15344.0
    money = re.findall(r'"(?:payment|interest|principal|balance)":([-0-9.eE+]+)', response.text)
    assert len(money) == 4 * 129 and all(re.fullmatch(r"-?[0-9]+\.[0-9]{2}", m) for m in money), money[:8]
    assert schedule["monthly_installment"] == 15344
    paying = [r["payment"] for r in rows if r["payment"]]
    # The file's payment is above the 8.2% EMI: the loan is repaid early, by a smaller last payment.
    assert len(paying) < 129 and all(p == 15344 for p in paying[:-1]) and 0 < paying[-1] <= 15344
    assert sum(Decimal(str(r["principal"])) for r in rows) == Decimal(900_000)
    assert [r["paid"] for r in rows].count(True) == 114
    assert rows[113]["paid"] and rows[113]["on_time"] and rows[113]["paid_on"] is None
    assert not rows[114]["paid"]


# Profiles and history


def test_a_late_installment_stays_late_when_the_next_is_paid_early(stack: Stack, client: TestClient) -> None:
    """Paying the next installments ahead of time does not hide a late one: the score counts on-time
    EMIs among the due ones only (a review's repro: the score went from 0 to 70)."""
    customer_id = new_customer(client)
    loan_id = book(client, customer_id, tenure=12)["loan_id"]  # installment 1 due 2026-12-22, 2 due 2027-01-22
    later = create_app(stack.settings, clock=FixedClock(TODAY + timedelta(days=32)))  # 2026-12-24
    with TestClient(later, raise_server_exceptions=False) as then:
        late = then.post(f"/loans/{loan_id}/repayments", json={}).json()
        early = then.post(f"/loans/{loan_id}/repayments", json={}).json()
        assert [(r["installment"], r["on_time"]) for r in (late, early)] == [(1, False), (2, True)]
        for answer in (
            then.get(f"/customers/{customer_id}").json(),
            then.post(
                "/check-eligibility", json={"customer_id": customer_id, "loan_amount": 1000, "interest_rate": 20, "tenure": 12}
            ).json(),
        ):
            breakdown = answer["credit_score_breakdown"]
            assert (breakdown["inputs"]["emis_due"], breakdown["inputs"]["emis_paid_on_time"]) == (1, 0)
            assert breakdown["payment_history"] == -35


def test_the_customer_profile_agrees_with_check_eligibility(client: TestClient, imported: dict[str, Any]) -> None:
    profile = client.get("/customers/14").json()
    decision = client.post(
        "/check-eligibility", json={"customer_id": 14, "loan_amount": 1000, "interest_rate": 20, "tenure": 12}
    ).json()
    assert profile["credit_score"] == decision["credit_score"]
    assert profile["credit_score_breakdown"] == decision["credit_score_breakdown"]
    assert profile["approved_limit"] == decision["credit_score_breakdown"]["inputs"]["approved_limit"] == 3_900_000
    assert profile["current_debt"] == decision["credit_score_breakdown"]["inputs"]["current_debt"]
    assert profile["current_loans"] + profile["past_loans"] == decision["credit_score_breakdown"]["inputs"]["loans_taken"]
    assert client.get("/customers/987654321").status_code == 404


def test_the_audit_trail_comes_straight_from_the_event_store_oldest_first(client: TestClient) -> None:
    customer_id = new_customer(client)
    loan_id = book(client, customer_id)["loan_id"]
    client.post(f"/loans/{loan_id}/repayments")
    customer_events = client.get(f"/customers/{customer_id}/history").json()
    assert [e["type"] for e in customer_events] == ["Customer.Registered", "Customer.LoanBooked", "Customer.RepaymentRecorded"]
    assert [e["version"] for e in customer_events] == [1, 2, 3]
    assert customer_events[0]["data"]["phone_number"] and customer_events[1]["data"]["terms"]["loan_id"] == loan_id
    assert customer_events[0]["recorded_at"] <= customer_events[2]["recorded_at"]
    loan_events = client.get(f"/api/loans/{loan_id}/history/").json()
    assert [e["type"] for e in loan_events] == ["Loan.Booked", "Loan.RepaymentRecorded"]
    assert loan_events[1]["data"]["installment"] == 1 and loan_events[1]["data"]["on_time"] is True
    assert client.get("/customers/987654321/history").status_code == 404
    assert client.get("/loans/987654321/history").status_code == 404


# Operations


def test_health_and_readiness_say_which_check_failed(stack: Stack, client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
        "postgres": True,
        "redis": True,
        "worker": True,
        "projection": True,
    }
    stack.stop_worker()
    try:
        not_ready = client.get("/ready")
    finally:
        stack.start_worker()
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not ready"
    assert not_ready.json()["checks"]["worker"] == {"ok": False, "detail": "no worker answered within 1 s"}
    assert not_ready.json()["checks"]["postgres"]["ok"] is True


def test_a_pool_process_whose_memory_passed_the_limit_is_replaced_once_its_task_ends(stack: Stack) -> None:
    """A pool process keeps the memory an import took until it ends (a re-import in the same process
    peaked at 506 MB of the worker's 500): one whose peak passed WORKER_MAX_MEMORY_MB is replaced
    once its task is done. Here the limit is 1 MB, which every pool process passes."""
    stack.stop_worker()
    env = stack.env
    stack.env = {**env, "WORKER_MAX_MEMORY_MB": "1"}
    try:
        stack.start_worker()
        assert stack.worker is not None
        started = set(_descendants(stack.worker.pid))
        tasks.catch_up.delay()
        deadline = time.monotonic() + 30
        while not started - set(_descendants(stack.worker.pid)):
            assert time.monotonic() < deadline, f"no pool process replaced: {started} {_descendants(stack.worker.pid)}"
            time.sleep(0.2)
    finally:
        stack.stop_worker()
        stack.env = env
        stack.start_worker()


def test_readiness_names_a_failed_service_without_its_address(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")  # nothing listens on port 1
    tasks.redis_client.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="api.endpoints"):
            not_ready = client.get("/ready")
    finally:
        tasks.redis_client.cache_clear()  # the next one is made after monkeypatch restores REDIS_URL
    assert not_ready.status_code == 503
    redis_check = not_ready.json()["checks"]["redis"]
    assert redis_check == {"ok": False, "detail": "Redis did not answer (ConnectionError); the API's log has the error"}
    assert "127.0.0.1" not in not_ready.text and "s3cret" not in not_ready.text
    assert any("Redis did not answer" in r.getMessage() and "127.0.0.1:1" in r.getMessage() for r in caplog.records)


def test_the_event_store_connects_with_every_parameter_of_database_url(stack: Stack) -> None:
    """The library gave its pool only the host, port, database, user and password: a URL's
    `?sslmode=require` was dropped, and the events went over plain TCP (a review). This test
    server has no TLS: told to do without it, the event store works; told to require it, it gets
    no connection (the pool retries, and says "couldn't get a connection")."""
    url = stack.settings.database_url
    app, pool = build_ledger(replace(stack.settings, database_url=make_conninfo(url, sslmode="disable")))
    try:
        app.recorder.max_notification_id()
    finally:
        app.close()
        pool.close()
    with pytest.raises(OperationalError, match="couldn't get a connection"):
        build_ledger(replace(stack.settings, database_url=make_conninfo(url, sslmode="require")))


def test_the_event_store_is_where_database_url_says_whatever_the_library_finds_in_the_environment(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eventsourcing library reads its settings from the process environment as well, the
    application's name first. Variables meant for something else must not move the API's events
    away from the store that the projection, the worker and the ID sequences use."""
    stray = {
        "POSTGRES_SCHEMA": "elsewhere",
        "LEDGER_POSTGRES_SCHEMA": "elsewhere",
        "LEDGER_POSTGRES_DBNAME": "nowhere",
        "LEDGER_POSTGRES_PORT": "1",
        "LEDGER_ORIGINATOR_ID_TYPE": "text",
        "LEDGER_POSTGRES_ENABLE_DB_FUNCTIONS": "y",
        "LEDGER_APPLICATION_RECORDER_TOPIC": "eventsourcing.postgres:PostgresApplicationRecorder",
        "POSTGRES_GET_PASSWORD_TOPIC": "os:getcwd",  # a password from a function, not the URL
    }
    for name, value in stray.items():
        monkeypatch.setenv(name, value)
    with TestClient(create_app(stack.settings, clock=FixedClock(TODAY)), raise_server_exceptions=False) as client:
        recorder = client.app.state.services.ledger.recorder  # type: ignore[attr-defined]
        assert type(recorder) is OrderedInsertRecorder and recorder.datastore.schema == "public"
        assert recorder.datastore.pool.get_password_func is None  # this test's server takes any password
        with stack.connect() as conn:
            events = conn.execute("SELECT max(notification_id) FROM ledger_events").fetchone()
        customer_id = new_customer(client)  # read back from the read model: the worker projected it
        assert client.get(f"/customers/{customer_id}").status_code == 200
        assert book(client, customer_id)["loan_approved"] is True
    with stack.connect() as conn:  # the events are in the store's table, after those before
        topics = conn.execute("SELECT topic FROM ledger_events WHERE notification_id > %s ORDER BY notification_id", events)
        assert [topic.rsplit(":", 1)[1] for (topic,) in topics] == [
            "Customer.Registered",
            "PhoneNumber.Claimed",
            "Customer.LoanBooked",
            "Loan.Booked",
        ]


def test_metrics_are_in_the_prometheus_text_format(client: TestClient, imported: dict[str, Any]) -> None:
    client.get("/view-loan/5930")
    book(client, new_customer(client))
    text = client.get("/metrics").text
    assert 'ledger_http_requests_total{method="GET",route="/view-loan/{loan_id}",status="200"}' in text
    assert 'ledger_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/view-loan/{loan_id}"}' in text
    assert 'ledger_booking_decisions_total{outcome="approved"}' in text
    assert "ledger_events_appended_total " in text
    assert 'ledger_projection_lag_events{projection="ledger"}' in text
    rows = next(line for line in text.splitlines() if line.startswith("ledger_import_rows_processed "))
    assert float(rows.split()[1]) >= 1082


def test_every_request_gets_a_request_id_and_one_json_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ledger.access"):
        given = client.get("/health", headers={"X-Request-ID": "trace-123"})
        generated = client.get("/view-loan/987654321")
    assert given.headers["X-Request-ID"] == "trace-123"
    assert len(generated.headers["X-Request-ID"]) == 32
    records = [r for r in caplog.records if r.name == "ledger.access"]
    assert [(r.path, r.status, r.request_id) for r in records[-2:]] == [  # type: ignore[attr-defined]
        ("/health", 200, "trace-123"),
        ("/view-loan/987654321", 404, generated.headers["X-Request-ID"]),
    ]
    line = json.loads(JsonFormatter().format(records[-1]))
    assert {"time", "level", "message", "method", "path", "status", "duration_ms", "request_id"} <= set(line)


def test_the_new_endpoints_are_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/loans/{loan_id}/repayments",
        "/loans/{loan_id}/schedule",
        "/customers/{customer_id}",
        "/customers/{customer_id}/history",
        "/loans/{loan_id}/history",
        "/health",
        "/ready",
        "/metrics",
    ):
        assert path in paths, path


# The command line


def ledger_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        env={**stack.env, **os.environ},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_imports_with_progress_reports_rebuilds_and_shows_lag(stack: Stack, imported: dict[str, Any]) -> None:
    imported_again = ledger_cli(
        stack,
        "import",
        "--customers",
        str(stack.settings.import_dir / "customer_data.xlsx"),
        "--loans",
        str(stack.settings.import_dir / "loan_data.xlsx"),
    )
    assert imported_again.returncode == 0, imported_again.stderr
    # The progress on standard error, the report on standard output.
    assert re.search(r"^import job [0-9a-f-]{36} queued$", imported_again.stderr, re.M), imported_again.stderr
    assert "300 customers and 782 loans already present" in imported_again.stdout
    job_id = imported_again.stderr.split("import job ")[1].split()[0]
    report = ledger_cli(stack, "import-report", job_id)
    assert report.returncode == 0 and "completed, 1082/1082 rows" in report.stdout
    assert "300 customers and 782 loans already present" in report.stdout
    rebuilt = ledger_cli(stack, "rebuild")
    assert rebuilt.returncode == 0 and "rebuild: " in rebuilt.stderr  # whole lines: not on a terminal
    # The full bar, then what runs after the last page, then the end, each on a line of its own.
    lines = rebuilt.stderr.splitlines()
    done, total = lines[-3].rsplit(" ", 1)[1].split("/")
    assert lines[-3].startswith("rebuild: ") and done == total, lines
    assert lines[-2] == "every event replayed: finishing the new tables and swapping them in", lines
    assert lines[-1].startswith("read model rebuilt from "), lines
    deadline = time.monotonic() + 30
    while True:
        status = ledger_cli(stack, "status")
        if "lag: 0 events" in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status.returncode == 0 and "lag: 0 events" in status.stdout, status.stdout
    for command in ("setup", "import", "import-report", "rebuild", "status", "init", "api", "worker", "beat", "run"):
        helped = ledger_cli(stack, command, "--help")
        assert helped.returncode == 0 and "usage: ledger " + command in helped.stdout, command


@pytest.mark.parametrize("workers", [1, 2])
def test_ledger_api_logs_each_request_once_and_removes_its_metrics_directory_when_it_stops(
    stack: Stack, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    env = {**os.environ, **stack.env, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with (tmp_path / "api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", (tmp_path / "api.log").read_text, api)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # one connection, as a client keeps it
            served = [client.get("/view-loans/1", headers={"X-Request-ID": f"once-{n}"}) for n in range(3)]
        assert [r.status_code for r in served] == [200, 200, 200]
        made = list(tmp_path.glob("ledger-metrics-*"))
        assert len(made) == 1 and any(made[0].glob("*.db")), made  # the processes' metrics live there
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
    stderr = (tmp_path / "api.log").read_text()
    # One server stops gracefully and leaves as SIGTERM asks; a supervisor of several, with 0.
    assert api.returncode == (143 if workers == 1 else 0), stderr
    assert not list(tmp_path.glob("ledger-metrics-*"))
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    for n in range(3):  # each request: one line, the API's own, with its request ID
        assert [line["logger"] for line in lines if line.get("request_id") == f"once-{n}"] == ["ledger.access"]
    assert not [line for line in lines if line["logger"] == "uvicorn.access"], stderr  # no second line from uvicorn


@pytest.mark.parametrize(
    ("sig", "to_the_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM to the runner (kill, timeout)", "SIGINT to its process group (Ctrl-C)"],
)
def test_make_tests_runner_stopped_early_tears_the_tests_down_and_stops_its_servers(
    tmp_path: Path, sig: int, to_the_group: bool
) -> None:
    """`make test` stopped early must leave nothing running: pytest's fixtures tear down, then the
    throwaway PostgreSQL and Redis it started stop and their directories go."""
    mark = tmp_path / "mark"
    (tmp_path / "test_slow.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.fixture\ndef held():\n"
        f"    open({str(mark)!r}, 'w').write('up')\n    yield\n"
        f"    open({str(mark)!r}, 'w').write('torn down')\n\n"
        "def test_slow(held):\n    time.sleep(120)\n"
    )
    log = tmp_path / "runner.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}  # so it starts its own
    with log.open("w") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "infra.testrun", str(tmp_path / "test_slow.py"), "-q", "-p", "no:cacheprovider"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal gives it
            # Started as `make test &` from a script is: with SIGINT ignored, which its children inherit.
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if to_the_group else None,
        )
    try:
        deadline = time.monotonic() + 90
        while not mark.exists():
            assert runner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        if to_the_group:
            os.killpg(runner.pid, sig)
        else:
            runner.send_signal(sig)
        code = runner.wait(timeout=90)
    finally:
        if runner.poll() is None:  # the test failed: stop it the way it should stop, then for good
            runner.send_signal(signal.SIGTERM)
            try:
                runner.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(runner.pid, signal.SIGKILL)
    started = log.read_text()
    pg = re.search(r"throwaway PostgreSQL on 127\.0\.0\.1:(\d+) \((\S+)\)", started)
    redis = re.search(r"throwaway Redis on 127\.0\.0\.1:(\d+)", started)
    assert pg and redis, started
    assert mark.read_text() == "torn down", started
    assert code == 2, started  # pytest's "interrupted"
    assert not Path(pg.group(2)).exists()
    for port in (pg.group(1), redis.group(1)):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port))) != 0, f"something still listens on {port}"


def ledger_run_serving(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """`ledger run` with servers of its own, in a process group of its own (as a terminal's
    foreground job), once it serves: the process, its log and its port."""
    port = free_port()
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}  # so it starts its own
    with log.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "run", "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Ctrl-C stops everything" not in log.read_text():
        if run.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError(log.read_text())
        time.sleep(0.2)
    return run, log, port


def test_ledger_run_stopped_with_ctrl_c_stops_everything_deletes_its_servers_and_says_so(tmp_path: Path) -> None:
    """`make run`'s Ctrl-C: the API, worker and beat stop, the throwaway PostgreSQL and Redis stop
    and their directories go, and its last line says so (it used to end without a word).

    On the way, what it printed is lines: the import's progress a line at a time (its bar, redrawn
    with "\r", ran into the worker's log lines on the terminal they share), and uvicorn's own
    lines in JSON like every other log line (they were in uvicorn's "INFO:     " format)."""
    run, log, port = ledger_run_serving(tmp_path, "--workers", "2")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        os.killpg(run.pid, signal.SIGINT)  # what a terminal sends its foreground group
        code = run.wait(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    said = log.read_text()
    assert code == 0, said
    assert b"\r" not in log.read_bytes(), said  # (read_text() would turn each "\r" into a line end)
    assert "import completed: 300 customers and 782 loans imported" in said, said
    uvicorn = [line for line in said.splitlines() if "Uvicorn running on" in line or line.startswith("INFO:")]
    assert uvicorn, said
    assert all(json.loads(line)["logger"] == "uvicorn.error" for line in uvicorn), uvicorn
    assert all("color_message" not in line for line in said.splitlines() if line.startswith("{")), said
    # Nor Celery's banners (the worker's "[config]" and "[queues]", beat's "LocalTime ->"), and
    # what the worker says as it stops is a JSON line too.
    assert not any(banner in said for banner in ("[config]", "[queues]", "LocalTime ->", "is starting.")), said
    stopping = [line for line in said.splitlines() if "Warm shutdown" in line]
    assert stopping and all(json.loads(line)["logger"] == "celery.apps.worker" for line in stopping), stopping
    assert said.rstrip().splitlines()[-1] == (
        "ledger run: everything it started has stopped; the throwaway PostgreSQL and Redis stopped, their data deleted"
    ), said
    pg = re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+) \((\S+)\)", said)
    redis = re.search(r"Redis on 127\.0\.0\.1:(\d+)", said)
    assert pg and redis, said
    assert not Path(pg.group(2)).exists()
    for listened in (pg.group(1), redis.group(1), str(port)):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(listened))) != 0, f"something still listens on {listened}"


def test_ledger_run_whose_terminal_closes_stops_everything_it_started(tmp_path: Path) -> None:
    """A terminal that closes sends SIGHUP to its foreground group: `ledger run` had no handler
    for it, so it died without stopping its services or its throwaway servers; and its services,
    sent it too, restarted (uvicorn's workers, the Celery worker) rather than stop (reviews)."""
    run, log, _ = ledger_run_serving(tmp_path, "--no-import")
    started = _descendants(run.pid)  # the services and what they started
    try:
        os.killpg(run.pid, signal.SIGHUP)
        run.wait(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    said = log.read_text()
    assert said.rstrip().splitlines()[-1].startswith("ledger run: everything it started has stopped"), said
    assert "Received SIGHUP" not in said and "Restarting celery worker" not in said, said
    pg = re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+) \((\S+)\)", said)
    assert pg and not Path(pg.group(2)).exists(), said
    deadline = time.monotonic() + 10
    assert len(started) > 4, started
    while running := [pid for pid, state in _processes() if pid in started and state != "Z"]:
        assert time.monotonic() < deadline, f"processes of `ledger run` still run: {running}"  # (zombies are done)
        time.sleep(0.2)


def test_ledger_run_killed_outright_has_its_watchdog_stop_everything_it_started(tmp_path: Path) -> None:
    """SIGKILL runs no handler: `ledger run`'s services and its throwaway PostgreSQL and Redis went
    on running, their data left behind (a review). Its watchdog, told of each as it started, stops
    them once `ledger run` is gone without having done it."""
    redis_dirs = set(Path(tempfile.gettempdir()).glob("ledger-redis-*"))
    run, log, port = ledger_run_serving(tmp_path, "--no-import")
    started = _descendants(run.pid)  # the services, what they started, and the watchdog
    redis_dirs = set(Path(tempfile.gettempdir()).glob("ledger-redis-*")) - redis_dirs  # its Redis's
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    said = log.read_text()
    pg = re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+) \((\S+)\)", said)
    redis = re.search(r"Redis on 127\.0\.0\.1:(\d+)", said)
    assert pg and redis and len(started) > 4, (said, started)
    deadline = time.monotonic() + 60
    while (running := [pid for pid, state in _processes() if pid in started and state != "Z"]) or Path(pg.group(2)).exists():
        assert time.monotonic() < deadline, f"still there: {running}, {pg.group(2)}"
        time.sleep(0.2)
    for listened in (pg.group(1), redis.group(1), str(port)):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(listened))) != 0, f"something still listens on {listened}"
    assert len(redis_dirs) == 1 and not any(d.exists() for d in redis_dirs), redis_dirs
    assert "ledger run ended without stopping what it started (killed?): its watchdog stops it" in log.read_text()


def _processes() -> list[tuple[int, str]]:
    """Each process's ID and state, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found.append((int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()[0]))
        except OSError:
            continue
    return found


def test_status_never_shows_the_read_model_past_the_last_event_while_loans_are_booked(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ledger status` read the last event's position, then the read model's: a page projected in
    between showed "lag: -16 events" under a stream of bookings (a review). Both come from one
    statement now."""
    from infra.cli import main

    stop = threading.Event()

    def bookings() -> None:
        while not stop.is_set():
            book(client, new_customer(client))

    booker = threading.Thread(target=bookings)
    booker.start()
    lags = []
    try:
        for _ in range(40):
            assert main(["status"]) == 0
            figures = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
            last, position = int(figures["last event position"]), int(figures["read model position"])
            assert figures["lag"] == f"{last - position} events"
            lags.append((last, last - position))
    finally:
        stop.set()
        booker.join(60)
    assert min(lag for _, lag in lags) >= 0, lags
    assert len({last for last, _ in lags}) > 10, lags  # the bookings went on while it looked


def test_commands_on_a_database_without_the_schema_say_to_run_setup(stack: Stack) -> None:
    with stack.connect() as conn:
        conn.execute("CREATE DATABASE no_schema_yet")
    try:
        env = {**stack.env, "DATABASE_URL": psycopg.conninfo.make_conninfo(stack.settings.database_url, dbname="no_schema_yet")}
        commands = (
            ["status"],
            ["rebuild"],
            ["import-report", "b5e7d356-e33a-446d-a371-c3e7cfd925e9"],
            ["import"],  # gave the library's "Composite type ... not found" with a traceback
            ["api", "--port", str(free_port())],  # served, and answered 500 to every request (a review)
            ["worker"],  # ran on
        )
        for command in commands:
            done = subprocess.run(
                [sys.executable, "-m", "infra.cli", *command], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
            )
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr
            assert done.stderr.strip().endswith("run `ledger setup` first"), done.stderr
    finally:
        with stack.connect() as conn:
            conn.execute("DROP DATABASE no_schema_yet")


def test_the_servers_stop_at_once_naming_a_database_they_cannot_reach(stack: Stack) -> None:
    """`ledger api` exited 3 after a traceback that did not name DATABASE_URL; `ledger worker` ran on (a review)."""
    env = {**stack.env, "DATABASE_URL": make_conninfo(stack.settings.database_url, port=str(free_port()))}
    for command in (["api", "--port", str(free_port())], ["worker"]):
        done = subprocess.run(
            [sys.executable, "-m", "infra.cli", *command], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"ledger {command[0]}: cannot reach PostgreSQL at "), done.stderr
        assert done.stderr.strip().endswith("(check DATABASE_URL)"), done.stderr


def test_commands_against_a_database_that_does_not_exist_say_what_the_server_said(stack: Stack) -> None:
    """A pool that can make no connection says only "couldn't get a connection after 2.00 sec":
    a wrong password or database name read as an unreachable server (a review)."""
    env = {**stack.env, "DATABASE_URL": psycopg.conninfo.make_conninfo(stack.settings.database_url, dbname="no_such_database")}
    for command in (["setup"], ["rebuild"], ["import"], ["status"], ["api", "--port", str(free_port())], ["worker"]):
        done = subprocess.run(
            [sys.executable, "-m", "infra.cli", *command], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert 'database "no_such_database" does not exist' in done.stderr, (command, done.stderr)
