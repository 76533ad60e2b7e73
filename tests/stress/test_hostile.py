"""Hostile input: property-based fuzzing from the API's own OpenAPI document, malformed
imports, oversized bodies. No 5xx, every response as documented, nothing half-done."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openpyxl
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS
from tests.stress.conftest import Served, follow

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    with served.client() as client:  # some customers and loans for the fuzzer to find
        follow(client, client.post("/imports").json()["job_id"])
    return schemathesis.openapi.from_url(f"{served.base}/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_from_the_openapi_document_finds_no_5xx_and_no_undocumented_response(
    api_schema: Any, mode: GenerationMode, figures: dict[str, Any]
) -> None:
    sent = {"requests": 0, "operations": 0}
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not (
            operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody")
        ):
            continue  # nothing to get wrong (GET /health)
        sent["operations"] += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=bool(os.environ.get("CI")),  # CI repeats one bounded set; local runs explore
        )
        def exercise(case: Any) -> None:
            sent["requests"] += 1
            response = case.call(timeout=30)
            case.validate_response(response, checks=checks)

        exercise()
    figures.update(mode=mode.value, **sent)


# Malformed imports


def write_xlsx(path: Path, rows: list[list[Any]]) -> str:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path.name


def import_files(served: Served, customers: str, loans: str) -> dict[str, Any]:
    with served.client() as client:
        response = client.post("/imports", json={"customers_file": customers, "loans_file": loans})
        assert response.status_code == 202, response.text
        return follow(client, response.json()["job_id"])


def counts(served: Served) -> tuple[int, int]:
    return served.scalar("SELECT count(*) FROM readmodel.customers"), served.scalar("SELECT count(*) FROM readmodel.loans")


@pytest.fixture
def import_dir(served: Served) -> Path:
    return Path(served.env["IMPORT_DIR"])


def test_fatal_import_errors_fail_clearly_and_change_nothing(served: Served, import_dir: Path, figures: dict[str, Any]) -> None:
    (import_dir / "not_a_workbook.xlsx").write_bytes(b"PK\x03\x04 this is not a zip archive")
    empty = write_xlsx(import_dir / "empty.xlsx", [])
    wrong_columns = write_xlsx(import_dir / "wrong_columns.xlsx", [["Customer", "Name", "Salary"], [1, "x", 5]])
    missing_loan_columns = write_xlsx(import_dir / "missing_loan_columns.xlsx", [list(LOAN_COLUMNS[:-2]), [1, 2, 3, 4, 5, 6, 7]])
    before = counts(served)
    cases = {
        ("not_a_workbook.xlsx", "loan_data.xlsx"): "not_a_workbook.xlsx: not a readable Excel workbook",
        (empty, "loan_data.xlsx"): "empty.xlsx: the first sheet is empty",
        (wrong_columns, "loan_data.xlsx"): "wrong_columns.xlsx: missing column(s) Customer ID, First Name",
        ("customer_data.xlsx", missing_loan_columns): "missing column(s) Date of Approval, End Date",
    }
    for (customers, loans), message in cases.items():
        job = import_files(served, customers, loans)
        assert job["state"] == "failed", job
        assert message in job["summary"]["error"]
    assert counts(served) == before
    figures.update(fatal_files=len(cases), customers=before[0], loans=before[1])


def test_a_partly_bad_file_keeps_its_good_rows_and_reports_each_bad_one(
    served: Served, import_dir: Path, figures: dict[str, Any]
) -> None:
    customers = write_xlsx(
        import_dir / "partly_bad_customers.xlsx",
        [
            list(CUSTOMER_COLUMNS),
            [7001, "Good", "One", 40, 9400000001, 60000, 2200000],
            [7002, "Bad", "Salary", 40, 9400000002, "sixty thousand", 2200000],
            [7003, "Bad", "Phone", 40, 12345, 60000, 2200000],
        ],
    )
    loans = write_xlsx(
        import_dir / "partly_bad_loans.xlsx",
        [
            list(LOAN_COLUMNS),
            [7001, 97001, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [7001, 97002, "lots", 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [7001, 97003, -100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [7001, 97004, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2025, 1, 5)],
            [7001, 97005, 100000, 12, 10.5, 8800, 30, date(2026, 1, 5), date(2027, 1, 5)],
            [7999, 97006, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [7002, 97007, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
        ],
    )
    job = import_files(served, customers, loans)
    assert job["state"] == "completed"
    reasons = {(issue["file"], issue["row"]): issue["reason"] for issue in job["issues"]}
    assert sorted(reasons) == sorted([(customers, 3), (customers, 4)] + [(loans, row) for row in (3, 4, 5, 6, 7, 8)]), reasons
    assert "Loan Amount is not a number" in reasons[(loans, 3)]
    assert "Loan Amount must be above 0" in reasons[(loans, 4)]
    assert "before Date of Approval" in reasons[(loans, 5)]
    assert "more than the Tenure" in reasons[(loans, 6)]
    assert "7999 has no accepted row in the customer file and is not in the ledger" in reasons[(loans, 7)]
    assert reasons[(loans, 8)] == f"its customer row 3 was rejected: {reasons[(customers, 3)]}"  # an unreadable salary
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE customer_id = 7001") == 1
    figures.update(rows=job["total_rows"], rejected=job["rows_rejected"], kept=job["total_rows"] - job["rows_rejected"])


def test_the_same_files_imported_twice_at_once_are_recorded_once(served: Served, figures: dict[str, Any]) -> None:
    with served.client() as client, ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(lambda _: client.post("/imports").json()["job_id"], range(2)))
        results = [follow(client, job) for job in jobs]
    assert [r["state"] for r in results] == ["completed", "completed"]
    assert served.scalar("SELECT count(*) FROM readmodel.customers WHERE origin = 'imported' AND customer_id <= 300") == 300
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'imported' AND source_loan_id < 10000") == 782
    figures.update(jobs=2, **served.audit())


# Oversized bodies


def test_bodies_over_one_mebibyte_are_refused_with_413_before_parsing(served: Served, figures: dict[str, Any]) -> None:
    before = counts(served)
    big = b'{"first_name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    with served.client() as client:
        started = time.monotonic()
        declared = client.post("/register", content=big, headers={"Content-Type": "application/json"})
        chunked = client.post(
            "/create-loan",
            content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            headers={"Content-Type": "application/json"},
        )
        elapsed = time.monotonic() - started
        just_under = client.post("/register", content=b" " * (1024 * 1024 - 1), headers={"Content-Type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
    assert just_under.status_code == 400  # read and parsed: blank, so malformed
    assert counts(served) == before
    figures.update(body_bytes=len(big), seconds=round(elapsed, 2))


def test_a_client_that_sends_its_whole_large_body_before_reading_gets_the_413_not_a_reset(served: Served) -> None:
    """Many clients send a whole body before they read. The API answered 413 and closed with the
    body unread, which resets the connection: the client's sending failed (broken pipe, reset),
    and on a real network its TCP may drop the 413 itself. The connection lingers now."""
    body = b"x" * (16 << 20)
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as client:
        client.sendall(
            b"POST /register HTTP/1.1\r\nhost: ledger\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        client.sendall(body)  # reset here, before: BrokenPipeError or ConnectionResetError
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"code":"payload_too_large"' in answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"G(T /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ],
)
def test_a_request_that_is_not_http_gets_a_json_400(served: Served, request_bytes: bytes) -> None:
    # The parser refuses these before the app sees them; uvicorn's own answer was plain text.
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as conn:
        conn.sendall(request_bytes)
        answer = b""
        while chunk := conn.recv(65536):  # the server closes the connection after it
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"error": {"code": "bad_request", "message": "The request is not valid HTTP/1.1", "details": None}}


def test_a_client_gone_before_its_body_arrived_is_logged_as_such_not_as_a_server_error(served: Served) -> None:
    """Nothing is answered and nothing went wrong here: the access log and the metrics count 499,
    and no traceback is logged (it was logged as an unexpected error, and counted as a 500)."""
    logged = len(served.log("api"))
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as conn:
        conn.sendall(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)  # the app is waiting for the rest of the body
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in served.log("api")[logged:].splitlines() if line.startswith("{")]
        gone = [line for line in lines if line.get("message") == "request" and line.get("path") == "/register"]
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [line["status"] for line in gone] == [499], lines
    assert not [line for line in lines if line.get("level") == "error" or "Traceback" in json.dumps(line)]
    assert any("went away before its request's body arrived" in line.get("message", "") for line in lines)
    metrics = httpx.get(f"{served.base}/metrics", timeout=5).text
    assert 'ledger_http_requests_total{method="POST",route="/register",status="500"}' not in metrics
    assert 'ledger_http_requests_total{method="POST",route="/register",status="499"}' in metrics


def test_a_health_check_still_answers_after_the_abuse(served: Served) -> None:
    assert httpx.get(f"{served.base}/health", timeout=5).json() == {"status": "ok"}
