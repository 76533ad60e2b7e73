"""Importing the lender's history through a real worker into real PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
from celery.exceptions import Retry
from eventsourcing.persistence import RecordConflictError
from starlette.testclient import TestClient

from infra.config import REPO_ROOT
from infra.importer import run_import
from infra.postgres import IMPORT_LOCK, build_ledger
from ledger.domain import customer_uuid
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS
from ledger.policy import LoanRequest
from projections.projector import LOCK_KEY
from tests.integration.conftest import Stack, forget_task_state, write_xlsx
from workers import tasks

DATA = REPO_ROOT / "data"


def follow(client: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/imports/{job_id}")
        if response.status_code == 200 and response.json()["state"] in ("completed", "failed"):
            return response.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"import did not finish: {response.text}"
        time.sleep(0.2)


def start(client: TestClient, customers: str = "customer_data.xlsx", loans: str = "loan_data.xlsx") -> str:
    response = client.post("/imports", json={"customers_file": customers, "loans_file": loans})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]  # type: ignore[no-any-return]


def counts(stack: Stack) -> tuple[int, int]:
    with stack.connect() as conn:
        customers = conn.execute("SELECT count(*) FROM readmodel.customers").fetchone()
        loans = conn.execute("SELECT count(*) FROM readmodel.loans").fetchone()
    assert customers is not None and loans is not None
    return customers[0], loans[0]


@pytest.fixture(scope="module")
def imported(stack: Stack, client: TestClient) -> dict[str, Any]:
    return follow(client, start(client))


def test_reference_import_keeps_all_300_customers_and_782_loans(stack: Stack, imported: dict[str, Any]) -> None:
    assert imported["state"] == "completed"
    assert imported["issues"] == []
    assert imported["rows_done"] == imported["total_rows"] == 300 + 782
    assert imported["summary"]["customers_imported"] == 300
    assert imported["summary"]["loans_imported"] == 782
    assert counts(stack) == (300, 782)


def test_event_states_are_compressed_with_lz4(stack: Stack, imported: dict[str, Any]) -> None:
    """Every state PostgreSQL compresses (the large ones) uses lz4, not pglz (setup_schema)."""
    with stack.connect() as conn:
        [column] = conn.execute(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'ledger_events'::regclass AND attname = 'state'"
        ).fetchone() or [None]
        kinds = conn.execute("SELECT DISTINCT pg_column_compression(state) FROM ledger_events").fetchall()
    assert column == "l"
    assert ("pglz",) not in kinds


def test_historical_figures_are_kept_as_in_the_file(stack: Stack, client: TestClient, imported: dict[str, Any]) -> None:
    # Customer 1 in the file: salary 50,000 with an approved limit of 4,500,000 (not 36 x salary rounded).
    with stack.connect() as conn:
        row = conn.execute("SELECT monthly_income, approved_limit FROM readmodel.customers WHERE customer_id = 1").fetchone()
    assert row == (50000, 4500000)
    # Loan 5930 (first row of loan_data.xlsx): customer 14, 900,000, monthly payment 15,344 as in the file.
    loan = client.get("/view-loan/5930").json()
    assert loan["customer"]["id"] == 14
    assert loan["loan_amount"] == 900000
    assert loan["monthly_installment"] == 15344
    assert loan["tenure"] == 129


def test_duplicate_loan_ids_are_rekeyed_above_every_id_with_the_file_id_on_record(stack: Stack, imported: dict[str, Any]) -> None:
    rekeyed = imported["summary"]["rekeyed_loans"]
    assert len(rekeyed) == 29
    with stack.connect() as conn:
        max_file_id = conn.execute("SELECT max(source_loan_id) FROM readmodel.loans").fetchone()
        assert max_file_id is not None
        for entry in rekeyed:
            assert entry["loan_id"] > max_file_id[0]
            row = conn.execute(
                "SELECT customer_id, source_loan_id FROM readmodel.loans WHERE loan_id = %s", (entry["loan_id"],)
            ).fetchone()
            assert row == (entry["customer_id"], entry["file_loan_id"])
            # The first holder of the file's ID keeps it, for a different customer.
            first = conn.execute(
                "SELECT customer_id FROM readmodel.loans WHERE loan_id = %s", (entry["file_loan_id"],)
            ).fetchone()
            assert first is not None and first[0] != entry["customer_id"]


def test_importing_the_same_files_again_adds_nothing(stack: Stack, client: TestClient, imported: dict[str, Any]) -> None:
    with stack.connect() as conn:
        events_before = conn.execute("SELECT count(*) FROM ledger_events WHERE topic NOT LIKE '%ImportJob%'").fetchone()
    again = follow(client, start(client))
    assert again["state"] == "completed"
    assert again["summary"]["customers_imported"] == 0
    assert again["summary"]["loans_imported"] == 0
    assert again["summary"]["customers_already_present"] == 300
    assert again["summary"]["loans_already_present"] == 782
    assert counts(stack) == (300, 782)
    with stack.connect() as conn:
        events_after = conn.execute("SELECT count(*) FROM ledger_events WHERE topic NOT LIKE '%ImportJob%'").fetchone()
    assert events_after == events_before


def test_a_reimport_reads_each_batch_s_customers_together_not_one_at_a_time(
    stack: Stack, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-importing finds every customer of the file recorded: read one round trip each, that
    was about half a re-import's time (a review: 65-76 s for the 1,100,000-row files that took 27 s
    to import). Each batch reads its customers in one statement."""
    app, pool = build_ledger(stack.settings)
    try:
        recorder = app.recorder
        one, many = recorder.select_latest, recorder.select_latest_many  # type: ignore[attr-defined]
        customers = {customer_uuid(i) for i in range(1, 301)}

        def alone(originator_id: UUID, snapshots: Any) -> Any:
            assert originator_id not in customers, "a customer read on its own"
            return one(originator_id, snapshots)  # the job's own reads

        reads: list[int] = []

        def counted(ids: Any, snapshots: Any) -> Any:
            reads.append(len(ids))
            return many(ids, snapshots)

        monkeypatch.setattr(recorder, "select_latest", alone)
        monkeypatch.setattr(recorder, "select_latest_many", counted)
        job_id, _ = app.request_import(str(DATA / "customer_data.xlsx"), str(DATA / "loan_data.xlsx"))
        summary = run_import(app, job_id, DATA / "customer_data.xlsx", DATA / "loan_data.xlsx", batch_size=100)
    finally:
        pool.close()
        app.close()
    assert (summary["state"], summary["customers_imported"], summary["loans_imported"]) == ("completed", 0, 0)
    assert (summary["customers_already_present"], summary["loans_already_present"]) == (300, 782)
    assert reads == [100, 100, 100]  # the three batches' customers (no file ID was re-keyed: no links to read)


def test_new_customers_and_loans_get_ids_above_the_imported_ones(client: TestClient, imported: dict[str, Any]) -> None:
    registered = client.post(
        "/register",
        json={"first_name": "Nina", "last_name": "Rao", "age": 35, "monthly_income": 200000, "phone_number": 9000000001},
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["customer_id"] > 300
    booked = client.post(
        "/create-loan",
        json={"customer_id": registered.json()["customer_id"], "loan_amount": 100000, "interest_rate": 14, "tenure": 12},
    )
    assert booked.status_code == 201, booked.text
    highest_rekeyed = max(e["loan_id"] for e in imported["summary"]["rekeyed_loans"])
    assert booked.json()["loan_id"] > highest_rekeyed


def import_rows(
    stack: Stack, client: TestClient, name: str, customers: list[list[Any]], loans: list[list[Any]]
) -> dict[str, Any]:
    """These rows imported from two files written for it in the import directory (removed
    after): the job's final report."""
    customers_file = write_xlsx(stack.settings.import_dir / f"test_{name}_customers.xlsx", CUSTOMER_COLUMNS, customers)
    loans_file = write_xlsx(stack.settings.import_dir / f"test_{name}_loans.xlsx", LOAN_COLUMNS, loans)
    try:
        return follow(client, start(client, customers_file.name, loans_file.name))
    finally:
        customers_file.unlink()
        loans_file.unlink()


def test_bad_rows_are_reported_by_file_and_row_and_good_rows_are_kept(
    stack: Stack, client: TestClient, imported: dict[str, Any], tmp_path: Path
) -> None:
    report = import_rows(
        stack,
        client,
        "bad",
        [
            [901, "Good", "Row", 40, 9100000001, 60000, 2200000],
            [902, "No", "Salary", 40, 9100000002, "lots", 2200000],
            [903, "", "Blank", 40, 9100000003, 60000, 2200000],
        ],
        [
            [901, 95001, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [901, 95002, -5, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [901, 95003, 100000, 12, 10.5, 8800, 13, date(2026, 1, 5), date(2027, 1, 5)],
            [901, 95004, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2025, 1, 5)],
            [999_999, 95005, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
        ],
    )
    assert report["state"] == "completed"
    rejected = {(i["file"], i["row"]): i["reason"] for i in report["issues"]}
    assert set(rejected) == {
        ("test_bad_customers.xlsx", 3),
        ("test_bad_customers.xlsx", 4),
        ("test_bad_loans.xlsx", 3),
        ("test_bad_loans.xlsx", 4),
        ("test_bad_loans.xlsx", 5),
        ("test_bad_loans.xlsx", 6),
    }
    assert "Monthly Salary" in rejected[("test_bad_customers.xlsx", 3)]
    assert "First Name" in rejected[("test_bad_customers.xlsx", 4)]
    assert "Loan Amount" in rejected[("test_bad_loans.xlsx", 3)]
    assert "more than the Tenure" in rejected[("test_bad_loans.xlsx", 4)]
    assert "before Date of Approval" in rejected[("test_bad_loans.xlsx", 5)]
    assert "999999" in rejected[("test_bad_loans.xlsx", 6)]
    assert report["summary"]["customers_imported"] == 1
    assert report["summary"]["loans_imported"] == 1
    assert client.get("/view-loan/95001").json()["customer"]["id"] == 901


def test_two_imports_at_once_run_one_after_the_other_and_one_loan_id_goes_to_one_customer(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """Both files give Loan ID 96001 to a different new customer. The worker runs two tasks at
    once; the second import waits for the first, sees its loan and re-keys its own."""
    files = []
    for n, (customer_id, phone) in enumerate([(911, 9100000911), (912, 9100000912)]):
        files.append(
            write_xlsx(
                stack.settings.import_dir / f"test_at_once_c{n}.xlsx",
                CUSTOMER_COLUMNS,
                [[customer_id, "At", "Once", 40, phone, 60000, 2200000]],
            )
        )
        files.append(
            write_xlsx(
                stack.settings.import_dir / f"test_at_once_l{n}.xlsx",
                LOAN_COLUMNS,
                [[customer_id, 96001, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)]],
            )
        )
    try:
        jobs = [start(client, files[0].name, files[1].name), start(client, files[2].name, files[3].name)]
        reports = [follow(client, job) for job in jobs]
    finally:
        for path in files:
            path.unlink()
    assert [r["state"] for r in reports] == ["completed", "completed"]
    assert [r["summary"]["loans_imported"] for r in reports] == [1, 1]
    rekeyed = [e for r in reports for e in r["summary"]["rekeyed_loans"]]
    assert len(rekeyed) == 1 and rekeyed[0]["file_loan_id"] == 96001 and rekeyed[0]["loan_id"] != 96001
    owners = {loan_id: client.get(f"/view-loan/{loan_id}").json()["customer"]["id"] for loan_id in (96001, rekeyed[0]["loan_id"])}
    assert sorted(owners.values()) == [911, 912] and owners[rekeyed[0]["loan_id"]] == rekeyed[0]["customer_id"]


def test_a_later_import_adds_a_loan_to_a_customer_already_in_the_ledger(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    before = len(client.get("/view-loans/1").json())
    report = import_rows(
        stack,
        client,
        "more",
        [[913, "More", "Later", 40, 9100000913, 60000, 2200000]],
        [
            [1, 96101, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
            [913, 96102, 100000, 12, 10.5, 8800, 3, date(2026, 1, 5), date(2027, 1, 5)],
        ],
    )
    assert (report["state"], report["summary"]["loans_imported"], report["issues"]) == ("completed", 2, [])
    assert 96101 in [loan["loan_id"] for loan in client.get("/view-loans/1").json()]
    assert len(client.get("/view-loans/1").json()) == before + 1
    assert client.get("/view-loan/96101").json()["customer"]["id"] == 1
    assert [e["type"] for e in client.get("/loans/96101/history").json()] == ["Customer.HistoryExtended"]


def test_a_reimported_row_with_other_figures_is_reported_and_the_recorded_loan_kept(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    with stack.connect() as conn:
        loan = conn.execute(
            "SELECT customer_id, loan_id, loan_amount, tenure, interest_rate, monthly_installment, emis_paid_on_time,"
            " start_date, end_date FROM readmodel.loans WHERE origin = 'imported' AND loan_id = source_loan_id"
            " AND loan_id < 96000 ORDER BY loan_id DESC LIMIT 1"  # the reference file's: tests below add others
        ).fetchone()
        assert loan is not None
        customer = conn.execute(
            "SELECT customer_id, first_name, last_name, age, phone_number, monthly_income, approved_limit"
            " FROM readmodel.customers WHERE customer_id = %s",
            (loan[0],),
        ).fetchone()
        assert customer is not None
    as_number = [int(v) if isinstance(v, Decimal) and v == int(v) else float(v) if isinstance(v, Decimal) else v for v in loan]
    customers = write_xlsx(
        stack.settings.import_dir / "test_same_customer.xlsx",
        CUSTOMER_COLUMNS,
        [[*customer[:4], int(customer[4]), *map(int, customer[5:])]],
    )
    edited = write_xlsx(
        stack.settings.import_dir / "test_edited_loan.xlsx", LOAN_COLUMNS, [[*as_number[:2], as_number[2] + 1000, *as_number[3:]]]
    )
    before = client.get(f"/view-loan/{loan[1]}").json()
    try:
        report = follow(client, start(client, customers.name, edited.name))
    finally:
        customers.unlink()
        edited.unlink()
    summary = report["summary"]
    assert (summary["customers_already_present"], summary["loans_already_present"], summary["loans_imported"]) == (1, 0, 0)
    assert report["issues"] == [
        {
            "file": "test_edited_loan.xlsx",
            "row": 2,
            "reason": f"Loan ID {loan[1]} is already recorded with other figures: Loan Amount {loan[2].normalize():f}"
            f" recorded, {(loan[2] + 1000).normalize():f} in this row. An imported loan is not changed: this row is not imported",
        }
    ]
    assert client.get(f"/view-loan/{loan[1]}").json() == before


def test_an_unreadable_file_fails_clearly_and_changes_nothing(stack: Stack, client: TestClient, imported: dict[str, Any]) -> None:
    not_excel = stack.settings.import_dir / "test_not_excel.xlsx"
    not_excel.write_text("Customer ID,First Name\n1,Ann\n")
    wrong_columns = write_xlsx(stack.settings.import_dir / "test_wrong_columns.xlsx", ["Customer", "Name"], [[1, "x"]])
    before = counts(stack)
    try:
        broken = follow(client, start(client, not_excel.name, "loan_data.xlsx"))
        missing = follow(client, start(client, "customer_data.xlsx", wrong_columns.name))
    finally:
        not_excel.unlink()
        wrong_columns.unlink()
    assert broken["state"] == "failed"
    assert "test_not_excel.xlsx" in broken["summary"]["error"]
    assert missing["state"] == "failed"
    assert "missing column(s) Customer ID, Loan ID" in missing["summary"]["error"]
    assert counts(stack) == before
    # The command line reports a failed job as `ledger import` ends for it: exit status 1.
    report = subprocess.run(
        [sys.executable, "-m", "infra.cli", "import-report", broken["job_id"]],
        env={**os.environ, **stack.env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 1, (report.stdout, report.stderr)
    assert report.stdout.splitlines()[-1].startswith("import failed: ") and "test_not_excel.xlsx" in report.stdout


def test_import_request_outside_the_import_directory_is_refused(client: TestClient) -> None:
    response = client.post("/imports", json={"customers_file": "../pyproject.toml", "loans_file": "loan_data.xlsx"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
    assert [d["field"] for d in response.json()["error"]["details"]] == ["customers_file"]


def test_import_request_for_a_missing_file_names_its_field(client: TestClient) -> None:
    response = client.post("/imports", json={"customers_file": "customer_data.xlsx", "loans_file": "no_such.xlsx"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"] == [{"field": "loans_file", "message": "no file 'no_such.xlsx' in the import directory"}]
    both = client.post("/imports", json={"customers_file": "gone.xlsx", "loans_file": "no_such.xlsx"}).json()["error"]
    assert both["message"] == "'gone.xlsx' and 'no_such.xlsx' are not files in the import directory"
    assert [d["field"] for d in both["details"]] == ["customers_file", "loans_file"]


def test_the_last_repayment_of_an_imported_loan_that_never_repaid_is_answered_to_the_cent(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """900 million at 100% over 600 months, nothing paid a month, 599 installments counted by the
    file: the last owes 32 digits, which the answer rounded in 28 (a 500, after it was recorded)."""
    report = import_rows(
        stack,
        client,
        "never",
        [[931, "Never", "Repaid", 40, 9300000931, 60000, 2200000]],
        [[931, 93101, 900_000_000, 600, 100, 0, 599, date(2025, 1, 1), date(2075, 1, 1)]],
    )
    assert (report["state"], report["summary"]["loans_imported"]) == ("completed", 1), report
    paid = client.post("/loans/93101/repayments", json={})
    assert paid.status_code == 201, paid.text
    assert (paid.json()["installment"], paid.json()["loan_closed"]) == (600, True)
    amount = Decimal("647897441523528251777201485600.90")
    assert json.loads(paid.text, parse_float=Decimal)["amount"] == amount
    schedule = json.loads(client.get("/loans/93101/schedule").text, parse_float=Decimal)["installments"]
    assert (schedule[-1]["payment"], schedule[-1]["balance"], schedule[-1]["paid"]) == (amount, 0, True)


def test_import_job_status_errors(client: TestClient, imported: dict[str, Any]) -> None:
    assert client.get("/imports/not-a-uuid").status_code == 400
    # UUID() takes these too; a path ID is hex digits only, as an integer ID is ASCII digits only.
    for loose in ("{00000000-0000-0000-0000-000000000000}", "urn:uuid:00000000-0000-0000-0000-000000000000", "\u0663" * 32):
        assert client.get(f"/imports/{loose}").status_code == 400, loose
    assert client.get("/imports/00000000-0000-0000-0000-000000000000").status_code == 404
    # The ID of another kind of aggregate (a customer's) is no job either.
    assert client.get(f"/imports/{customer_uuid(1)}").status_code == 404


def test_a_job_the_read_model_does_not_show_yet_is_answered_from_the_event_store(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """A big import's report can keep the projection busy for a while: the job that POST /imports
    just accepted is found all the same, as the event store holds it."""
    with holding(stack, LOCK_KEY):  # no projection runs meanwhile
        accepted = client.post("/imports", json={"customers_file": "customer_data.xlsx", "loans_file": "loan_data.xlsx"})
        assert accepted.status_code == 202 and accepted.headers["X-Read-Model"] == "behind"
        job_id = accepted.json()["job_id"]
        early = client.get(f"/imports/{job_id}")
        assert early.status_code == 200 and early.headers["X-Read-Model"] == "behind"
        assert early.json()["state"] == "queued"
        assert (early.json()["customers_file"], early.json()["loans_file"]) == ("customer_data.xlsx", "loan_data.xlsx")
    report = follow(client, job_id)
    assert report["state"] == "completed", report
    # Once projected, the read model's answer has the same requested_at as the event store's.
    assert report["requested_at"] == early.json()["requested_at"]
    assert "X-Read-Model" not in client.get(f"/imports/{job_id}").headers


def test_check_eligibility_on_the_read_model_decides_as_the_customer_aggregate_does(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """For every imported customer, the projection-side decision equals the write-side one."""
    ledger = stack.ledger()
    try:
        for customer_id in range(1, 301):
            for amount, rate, tenure in ((200_000, 8, 24), (1_000_000, 14, 120)):
                body = {"customer_id": customer_id, "loan_amount": amount, "interest_rate": rate, "tenure": tenure}
                read_side = client.post("/check-eligibility", json=body).json()
                write_side = ledger.decide_for(
                    ledger.get_customer(customer_id), LoanRequest(Decimal(amount), Decimal(rate), tenure)
                )
                assert read_side["approval"] == write_side.approved, customer_id
                assert read_side["credit_score"] == write_side.credit.score, customer_id
                assert Decimal(str(read_side["corrected_interest_rate"])) == write_side.corrected_interest_rate
                assert Decimal(str(read_side["monthly_installment"])) == write_side.monthly_installment
    finally:
        ledger.close()


def test_events_are_appended_in_binary_and_read_back_intact(stack: Stack, imported: dict[str, Any]) -> None:
    """build_ledger switches the library's INSERT to psycopg's binary format; a library upgrade
    that changes the statement would silently undo it, so the statement itself is checked."""
    app = stack.ledger()
    statement = app.recorder.insert_events_statement.as_string()  # type: ignore[attr-defined]
    assert "unnest(%b::" in statement
    with stack.connect() as conn:
        row = conn.execute("SELECT state FROM ledger_events WHERE topic LIKE '%%Customer.HistoryImported' LIMIT 1").fetchone()
    assert row is not None and bytes(row[0]).startswith(b"{") and b'"loans":[' in bytes(row[0])


# Runs of an import task: killed, copied, or cut off from their lock


@contextmanager
def holding(stack: Stack, key: int) -> Iterator[psycopg.Connection]:
    """Hold an advisory lock from the test, the way a worker would."""
    with stack.connect() as conn:
        conn.autocommit = True
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_an_import_that_kills_its_worker_process_three_times_fails_and_says_so(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """Celery delivers a task whose process died again at once, and would for ever; the job would
    stay queued and hold the import lock from every later import. The fourth run fails it."""
    r = redis.Redis.from_url(stack.settings.redis_url)
    # The projection lock held here stops each run where it brings the read model up to date.
    with holding(stack, LOCK_KEY):
        job_id = start(client)
        killed: list[int] = []
        for run in (1, 2, 3):
            pid = wait_for(
                lambda run=run: (
                    r.hget(f"ledger:import-runs:{job_id}", "runs") == str(run).encode()
                    and int(r.hget(f"ledger:import-runs:{job_id}", "pid") or 0)
                ),
                f"run {run} of the import",
            )
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        assert len(set(killed)) == 3  # three processes, each killed running it
    report = follow(client, job_id)
    assert report["state"] == "failed", report
    assert "stopped its worker process 3 times without finishing" in report["summary"]["error"]
    wait_for(lambda: not r.exists(f"ledger:import-runs:{job_id}"), "the count to be forgotten", timeout=10)
    assert tasks.resume_imports() == 0  # a failed job is not resumed
    after = follow(client, start(client))  # the import lock is free: the next import runs
    assert after["state"] == "completed", after


def test_resume_queues_no_second_copy_of_an_import_whose_task_is_waiting(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """An import waiting for the import lock retries every 2 s; each minute's resume used to queue
    another copy of it, and every copy retried."""
    r = redis.Redis.from_url(stack.settings.redis_url)
    with holding(stack, IMPORT_LOCK):
        job_id = start(client)
        wait_for(lambda: r.exists(f"ledger:import-alive:{job_id}"), "the task to start")
        wait_for(lambda: client.get(f"/imports/{job_id}").json()["state"] == "queued", "the job in the read model")
        assert [tasks.resume_imports() for _ in range(3)] == [0, 0, 0]
        time.sleep(2.5)  # a retry of the waiting copy renews its mark
        assert tasks.resume_imports() == 0
        assert r.ttl(f"ledger:import-alive:{job_id}") > tasks.IMPORT_ALIVE_SECONDS - 5
        # A worker that starts queues it all the same: it may be the one whose copy was killed.
        assert tasks.resume_imports(everyone=True) == 1
    report = follow(client, job_id)
    assert report["state"] == "completed", report


def test_a_starting_worker_leaves_an_import_queued_since_it_started_to_its_task(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """`ledger run` queues its import as its worker starts. The worker's resumption queued a second
    copy of it, which waited for the lock, found the job done, and logged that no copy of its task
    had been seen."""
    with holding(stack, IMPORT_LOCK):
        started = time.time()
        job_id = start(client)
        wait_for(lambda: client.get(f"/imports/{job_id}").json()["state"] == "queued", "the job in the read model")
        assert tasks.resume_imports(everyone=True, since=started) == 0
        # A worker that started after the copy was last seen queues one: that copy may have been killed.
        assert tasks.resume_imports(everyone=True, since=time.time() + 60) == 1
    report = follow(client, job_id)
    assert report["state"] == "completed", report


def test_a_starting_worker_resumes_a_job_that_another_projection_run_is_still_applying(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """At a worker's start, beat's catch-up and the resumption run side by side: the resumption
    must see the jobs requested while no worker ran even when the other run holds the lock."""
    job_id = requested_job(stack)  # recorded, not yet in the read model, no task sent
    forget_task_state()
    try:
        with ThreadPoolExecutor(1) as pool:
            with holding(stack, LOCK_KEY):  # the other run
                resumed = pool.submit(tasks.resume_imports, everyone=True)
                time.sleep(0.5)
                assert not resumed.done()  # it waits for the lock
            assert resumed.result(timeout=30) == 1
    finally:
        forget_task_state()
    assert follow(client, job_id)["state"] == "completed"


def test_an_import_whose_lock_session_ended_stops_and_resumes(stack: Stack, client: TestClient, imported: dict[str, Any]) -> None:
    """The import lock lives in a session of its own. Ended under a running import (by an
    administrator, an idle timeout, a proxy), the lock is free for another copy of the job: the
    run stops at its next batch and its retry takes the lock again."""
    log_before = len(stack.worker_log())
    with holding(stack, LOCK_KEY) as conn:
        job_id = start(client)
        holder = wait_for(
            lambda: conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s AND granted",
                (IMPORT_LOCK,),
            ).fetchone(),
            "the import to take its lock",
        )
        conn.execute("SELECT pg_terminate_backend(%s)", (holder[0],))
    report = follow(client, job_id)
    assert report["state"] == "completed", report
    assert report["summary"]["customers_already_present"] == 300
    log = stack.worker_log()[log_before:]
    assert f"import {job_id}: the database is away or the job ran twice" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_worker_stopped_mid_import_does_not_count_it_as_a_run_that_killed_its_process(
    stack: Stack, client: TestClient, imported: dict[str, Any]
) -> None:
    """A deploy stops the worker (SIGTERM), waits, then kills it: three deploys during one import
    must not fail it as if it had killed its worker three times."""
    r = redis.Redis.from_url(stack.settings.redis_url)
    with holding(stack, LOCK_KEY):
        job_id = start(client)
        runs = f"ledger:import-runs:{job_id}"
        wait_for(lambda: r.hget(runs, "runs") == b"1", "the import to run")
        assert stack.worker is not None
        os.kill(stack.worker.pid, signal.SIGTERM)  # the worker's main process: a warm shutdown begins
        wait_for(lambda: r.hget(runs, "runs") == b"0", "the stopping worker to take the run off the count", timeout=10)
        os.kill(stack.worker.pid, signal.SIGTERM)  # Celery signals shutting down again: the run is off once
        time.sleep(0.5)
        assert r.hget(runs, "runs") == b"0"
        stack.stop_worker(signal.SIGKILL)  # the end of the grace period
    stack.start_worker()  # resumes the job
    report = follow(client, job_id)
    assert report["state"] == "completed", report
    wait_for(lambda: not r.exists(runs), "the count to be forgotten once the run ended", timeout=10)


def requested_job(stack: Stack) -> str:
    """An import of the reference files requested, with no task sent for it."""
    app, pool = build_ledger(stack.settings)
    try:
        job_id, _ = app.request_import(str(DATA / "customer_data.xlsx"), str(DATA / "loan_data.xlsx"))
    finally:
        pool.close()
        app.close()
    return str(job_id)


def run_task_in_process(job_id: str, monkeypatch: pytest.MonkeyPatch, run_import: Callable[..., dict[str, Any]]) -> None:
    """The import task, run here with `run_import` in place of the import itself."""
    monkeypatch.setattr(tasks, "run_import", run_import)
    forget_task_state()  # this module's database, not an earlier one's
    try:
        tasks.import_history(job_id, str(DATA / "customer_data.xlsx"), str(DATA / "loan_data.xlsx"))
    finally:
        forget_task_state()


def test_the_worker_logs_an_import_s_progress_now_and_then_and_returns_counts_not_lists(
    stack: Stack, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A line every batch made 730 lines for a million loans; and Celery logs a task's return value
    whole, which held the re-keyed rows' lists (2.5 KB of one log line for the reference files)."""
    job_id = requested_job(stack)
    rekeyed = [{"file_loan_id": n, "loan_id": 10_000 + n, "row": n} for n in range(29)]

    def batches(*args: Any, **kwargs: Any) -> dict[str, Any]:
        on_batch = args[5]
        for done in range(50, 1083, 50):
            on_batch(done, 1082)
        on_batch(1082, 1082)
        return {"state": "completed", "customers_imported": 300, "loans_imported": 782, "rekeyed_loans": rekeyed}

    monkeypatch.setattr(tasks, "run_import", batches)
    forget_task_state()
    try:
        with caplog.at_level(logging.INFO, logger="workers.tasks"):
            returned = tasks.import_history(job_id, str(DATA / "customer_data.xlsx"), str(DATA / "loan_data.xlsx"))
    finally:
        forget_task_state()
    progress = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" rows")]
    assert progress == [f"import {job_id}: 50/1082 rows", f"import {job_id}: 1082/1082 rows"]
    assert returned == {"state": "completed", "customers_imported": 300, "loans_imported": 782, "rekeyed_loans": 29}


def test_a_conflict_while_the_import_holds_its_lock_fails_the_job_instead_of_retrying_for_ever(
    stack: Stack, client: TestClient, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conflict the import could not absorb, with its lock still held (so no second copy ran
    beside it), is a fault no retry mends: the job says so."""
    job_id = requested_job(stack)

    def conflict(*args: object, **kwargs: object) -> dict[str, Any]:
        raise RecordConflictError("a conflict the import could not absorb")

    with pytest.raises(RecordConflictError):
        run_task_in_process(job_id, monkeypatch, conflict)
    report = follow(client, job_id, timeout=15)
    assert report["state"] == "failed", report
    assert report["summary"]["error"] == "the import stopped: RecordConflictError: a conflict the import could not absorb"


def test_a_conflict_after_the_lock_session_ended_is_run_again_not_failed(
    stack: Stack, client: TestClient, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its lock's session gone, another copy of the job may have run beside this one: the
    conflict is theirs to share, and the run stops where a later one resumes."""
    job_id = requested_job(stack)

    def conflict_after_losing_the_lock(*args: object, **kwargs: object) -> dict[str, Any]:
        with stack.connect() as conn:
            holder = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s AND granted",
                (IMPORT_LOCK,),
            ).fetchone()
            assert holder is not None
            conn.execute("SELECT pg_terminate_backend(%s)", (holder[0],))
        raise RecordConflictError("another copy's events")

    with pytest.raises(Retry) as raised:  # called directly, the task's retry raises
        run_task_in_process(job_id, monkeypatch, conflict_after_losing_the_lock)
    assert isinstance(raised.value.__cause__, tasks.RunAgain), repr(raised.value.__cause__)
    time.sleep(1.5)  # the read model would show a failure by now
    assert client.get(f"/imports/{job_id}").json()["state"] == "queued"


def test_the_workers_ledger_takes_no_pooled_connection_the_server_closed(stack: Stack) -> None:
    """After a PostgreSQL restart the worker's next import met a pooled connection the server had
    closed, failed, and waited to try again (a review). The worker's ledger checks each as it is
    taken; the API's does not (a round trip a request), and drops its own when its listener reconnects."""
    for checked in (True, False):
        app, pool = build_ledger(stack.settings, check_connections=checked)
        try:
            assert app.index.existing([customer_uuid(987_654_321)]) == set()
            with pool.connection() as conn:
                backend = conn.info.backend_pid
            with stack.connect() as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            time.sleep(0.2)
            if checked:
                assert app.index.existing([customer_uuid(987_654_321)]) == set()
                assert app.recorder.datastore.pre_ping  # the library's pool, the same way
            else:
                with pytest.raises(psycopg.OperationalError):
                    app.index.existing([customer_uuid(987_654_321)])
        finally:
            pool.close()
            app.close()
    assert tasks._ledger().recorder.datastore.pre_ping  # the worker's is the checked one


def test_an_import_that_finds_the_database_away_backs_off_by_its_own_count_not_every_retry(
    stack: Stack, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The back-off counted every retry: an import that had waited its turn behind another 30
    times and then met a connection closed by a PostgreSQL restart waited a minute (a review)."""
    job_id = requested_job(stack)

    def away(*args: object, **kwargs: object) -> dict[str, Any]:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    asked: list[dict[str, Any]] = []

    def retry(**options: Any) -> Exception:  # what the task asks of Celery's retry (called directly, it says nothing)
        asked.append(options)
        return Retry("retry asked")

    monkeypatch.setattr(tasks, "run_import", away)
    monkeypatch.setattr(tasks.import_history, "retry", retry)
    forget_task_state()
    tasks.import_history.push_request(retries=30)  # as redelivered after 30 waits for the lock
    try:
        for before in (0, 3, 9):
            with pytest.raises(Retry):
                tasks.import_history.run(job_id, str(DATA / "customer_data.xlsx"), str(DATA / "loan_data.xlsx"), away=before)
    finally:
        tasks.import_history.pop_request()
        forget_task_state()
    assert [(a["countdown"], a["kwargs"]) for a in asked] == [(2, {"away": 1}), (16, {"away": 4}), (60, {"away": 10})]


def test_a_job_over_the_kill_count_keeps_its_count_until_it_is_failed(
    stack: Stack, client: TestClient, imported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database away just when the job is to be failed: the retry must still find it over the
    line, not start a fresh count of three more kills."""
    r = redis.Redis.from_url(stack.settings.redis_url)
    job_id = "00000000-0000-4000-8000-00000000f00d"
    r.hset(f"ledger:import-runs:{job_id}", mapping={"runs": tasks.IMPORT_KILLED_RUNS, "pid": 1})

    class DatabaseAway:
        def get_import_job(self, job: UUID) -> None:
            raise psycopg.OperationalError("the database is away")

    monkeypatch.setattr(tasks, "_ledger", DatabaseAway)
    with pytest.raises(Retry):
        tasks.import_history(job_id, "c.xlsx", "l.xlsx")
    assert r.hget(f"ledger:import-runs:{job_id}", "runs") == str(tasks.IMPORT_KILLED_RUNS + 1).encode()


def test_ledger_import_with_redis_unreachable_fails_its_job_and_says_so(stack: Stack) -> None:
    """The job is recorded before it is queued: left queued, a worker's periodic resumption would
    run it minutes after the command said it failed."""
    env = {**stack.env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "infra.cli", "import"], env=env, capture_output=True, timeout=120, cwd=REPO_ROOT)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err
    assert "could not be queued, so it is marked failed: cannot reach Redis at redis://127.0.0.1:1/0" in err
    job_id = UUID(err.split("import job ", 1)[1].split()[0])
    ledger = stack.ledger()
    try:
        job = ledger.get_import_job(job_id)
    finally:
        ledger.close()
    assert (job.state, job.summary) == ("failed", {"error": "the job could not be queued: Redis is unreachable"})
