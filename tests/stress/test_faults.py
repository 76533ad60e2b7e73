"""Faults: a worker killed mid-import and mid-projection, Redis down, PostgreSQL down.
Each ends with an audit: the event store, the read model and a fresh rebuild agree."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
from celery import Celery

from infra.config import REPO_ROOT
from infra.postgres import build_ledger
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS
from tests.integration.conftest import write_xlsx
from tests.stress.conftest import Served, follow


def test_a_worker_killed_mid_import_resumes_and_the_import_finishes_exactly(served: Served, figures: dict[str, Any]) -> None:
    served.stop("worker")
    served.start_worker(IMPORT_BATCH_SIZE="5")  # many small transactions: a long enough import to interrupt
    with served.client() as client:
        job_id = client.post("/imports").json()["job_id"]
        deadline = time.monotonic() + 60
        while True:
            job = client.get(f"/imports/{job_id}").json()
            if job.get("state") == "running" and 0 < job["rows_done"] < job["total_rows"] // 2:
                break
            assert job.get("state") != "completed", "the import finished before it could be interrupted"
            assert time.monotonic() < deadline, job
            time.sleep(0.02)
        rows_at_kill = job["rows_done"]
        served.stop("worker", signal.SIGKILL)
        served.start_worker()  # resumes unfinished imports when ready
        done = follow(client, job_id, timeout=120)
    assert done["state"] == "completed", done
    summary = done["summary"]  # the whole job's, what it recorded before the kill included
    counts = ("customers_imported", "customers_already_present", "loans_imported", "loans_already_present")
    assert [summary[k] for k in counts] + [len(summary["rekeyed_loans"])] == [300, 0, 782, 0, 29], summary
    assert served.scalar("SELECT count(*) FROM readmodel.customers WHERE origin = 'imported'") == 300
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'imported'") == 782
    assert served.scalar("SELECT count(DISTINCT source_loan_id) FROM readmodel.loans WHERE origin = 'imported'") == 782 - 29
    figures.update(rows_done_at_kill=rows_at_kill, total_rows=done["total_rows"], **served.audit())


def test_an_import_whose_files_changed_while_it_was_interrupted_fails_and_a_new_one_adds_the_rest(
    served: Served, figures: dict[str, Any]
) -> None:
    """The resumed run would count what the first run recorded as its own: with other files that
    summary would be wrong, so the job fails and says why. A new import of the new files adds the rest."""
    imports = Path(served.env["IMPORT_DIR"])
    people = [[720_000 + n, "Changed", f"File{n}", 40, 9_520_000_000 + n, 60_000, 2_200_000] for n in range(200)]

    def loans(amount: int) -> list[list[Any]]:
        return [[720_000 + n, 820_000 + n, amount, 12, 10, 8_800, 3, date(2025, 1, 1), date(2026, 1, 1)] for n in range(200)]

    files = {
        "customers_file": write_xlsx(imports / "changing_customers.xlsx", CUSTOMER_COLUMNS, people).name,
        "loans_file": write_xlsx(imports / "changing_loans.xlsx", LOAN_COLUMNS, loans(100_000)).name,
    }
    in_range = "SELECT count(*) FROM readmodel.customers WHERE customer_id BETWEEN 720000 AND 720199"
    served.stop("worker")
    served.start_worker(IMPORT_BATCH_SIZE="5")
    with served.client() as client:
        job_id = client.post("/imports", json=files).json()["job_id"]
        deadline = time.monotonic() + 60
        while not 0 < client.get(f"/imports/{job_id}").json()["rows_done"] < 200:
            assert time.monotonic() < deadline, client.get(f"/imports/{job_id}").json()
            time.sleep(0.02)
        served.stop("worker", signal.SIGKILL)
        write_xlsx(imports / files["loans_file"], LOAN_COLUMNS, loans(90_000))
        served.start_worker()  # resumes the job, which finds other files
        failed = follow(client, job_id)
        served.wait_caught_up()
        recorded = served.scalar(in_range)
        second = follow(client, client.post("/imports", json=files).json()["job_id"])
    assert failed["state"] == "failed", failed
    assert "changing_customers.xlsx or changing_loans.xlsx changed after this import started" in failed["summary"]["error"]
    assert 0 < recorded < 200  # what the first run recorded stays, and the failed run added nothing
    assert second["state"] == "completed", second
    assert (second["summary"]["customers_imported"], second["summary"]["customers_already_present"]) == (200 - recorded, recorded)
    assert served.scalar(in_range) == 200
    figures.update(recorded_before_the_change=recorded, **served.audit())


def test_a_worker_killed_mid_projection_leaves_a_consistent_read_model(served: Served, figures: dict[str, Any]) -> None:
    served.stop("worker")
    app, pool = build_ledger(served.settings)
    try:
        for n in range(300):  # events nobody has projected yet
            app.register_customer("Kill", f"Test{n}", 30, str(9_310_000_000 + n), Decimal(40_000))
    finally:
        pool.close()
        app.close()
    start = served.scalar("SELECT position FROM readmodel.tracking")
    last = served.scalar("SELECT max(notification_id) FROM ledger_events")
    served.start_worker(PROJECTION_PAGE_SIZE="5")
    deadline = time.monotonic() + 60
    while True:
        position = served.scalar("SELECT position FROM readmodel.tracking")
        if start < position < last:
            break
        assert position != last, "the projection finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    served.stop("worker", signal.SIGKILL)
    killed_at = served.scalar("SELECT position FROM readmodel.tracking")
    served.start_worker()
    audit = served.audit()
    figures.update(position_at_kill=killed_at, events_to_project=last - start, **audit)


def test_with_redis_down_commands_succeed_and_say_the_read_model_is_behind(served: Served, figures: dict[str, Any]) -> None:
    served.redis.stop()
    try:
        with served.client() as client:
            started = time.monotonic()
            registered = client.post(
                "/register",
                json={
                    "first_name": "No",
                    "last_name": "Redis",
                    "age": 50,
                    "monthly_income": 90_000,
                    "phone_number": 9_320_000_001,
                },
            )
            booked = client.post(
                "/create-loan",
                json={"customer_id": registered.json()["customer_id"], "loan_amount": 50_000, "interest_rate": 14, "tenure": 12},
            )
            elapsed = time.monotonic() - started
    finally:
        served.redis.start()
    assert registered.status_code == 201 and booked.status_code == 201
    assert registered.headers["X-Read-Model"] == booked.headers["X-Read-Model"] == "behind"
    loan_id = booked.json()["loan_id"]
    # Nobody acts: the worker reconnects and beat's periodic catch-up projects the events.
    deadline = time.monotonic() + 60
    with served.client() as client:
        while client.get(f"/view-loan/{loan_id}").status_code != 200:
            assert time.monotonic() < deadline, served.log("worker")[-3000:]
            time.sleep(0.5)
        caught_up_after = time.monotonic() - started
    figures.update(command_seconds=round(elapsed, 2), caught_up_after_s=round(caught_up_after, 1), **served.audit())


def test_readiness_does_not_flap_after_redis_restarts(served: Served, figures: dict[str, Any]) -> None:
    """Each API process pings the workers on a pooled connection, which a Redis restart leaves
    closed: its next /ready answered 503 ("Celery's broker did not answer (ConnectionError)")
    with Redis and the worker both fine (a review)."""

    def probes(count: int) -> list[int]:  # a new connection each: both API processes answer some
        return [httpx.get(f"{served.base}/ready", timeout=10).status_code for _ in range(count)]

    assert probes(12) == [200] * 12  # every process's pool holds a connection
    served.redis.stop()
    served.redis.start()
    broker = Celery(broker=served.env["REDIS_URL"])  # a connection of its own, opened after the restart
    deadline = time.monotonic() + 30
    while not broker.control.ping(timeout=0.5):  # the worker has reconnected and answers
        assert time.monotonic() < deadline, served.log("worker")[-3000:]
    answers = probes(12)
    assert answers == [200] * 12, answers
    figures.update(probes_after_restart=len(answers))


def test_a_worker_outlives_redis_killed_under_load_and_catches_up(served: Served, figures: dict[str, Any]) -> None:
    """Redis killed (SIGKILL) while the worker holds unacknowledged tasks: kombu's hand-back of them,
    and the acknowledgement of a task that finished later, met a connection already gone with an
    AttributeError, which Celery takes for an unrecoverable error: the worker exited, and nothing
    was projected again (a review: 6 tries of 8; the first try, twice, here)."""
    stop = threading.Event()
    booked: list[int] = []

    def load(n: int) -> int:
        answered = 0
        with served.client(timeout=10) as client:
            for i in range(100_000):
                if stop.is_set():
                    break
                body = {"first_name": "Redis", "last_name": f"Killed{n}", "age": 40, "monthly_income": 90_000}
                try:
                    registered = client.post("/register", json=body | {"phone_number": 9_350_000_000 + n * 100_000 + i})
                    if registered.status_code != 201:
                        continue
                    loan = {
                        "customer_id": registered.json()["customer_id"],
                        "loan_amount": 10_000,
                        "interest_rate": 14,
                        "tenure": 12,
                    }
                    answer = client.post("/create-loan", json=loan)
                    answered += 1
                    if answer.status_code == 201:
                        booked.append(answer.json()["loan_id"])
                except httpx.TransportError:
                    time.sleep(0.05)
        return answered

    with ThreadPoolExecutor(6) as pool:
        answered = [pool.submit(load, n) for n in range(6)]
        try:
            for _ in range(3):
                time.sleep(2)
                assert served.redis.process is not None
                served.redis.process.send_signal(signal.SIGKILL)
                served.redis.process.wait()
                time.sleep(3)
                served.redis.start()
                time.sleep(4)
                assert served.processes["worker"].poll() is None, served.log("worker")[-3000:]
        finally:
            stop.set()
        bookings = sum(f.result() for f in answered)
    served.wait_caught_up()
    missing = served.scalar(f"SELECT {len(booked)} - count(*) FROM readmodel.loans WHERE loan_id = ANY(ARRAY{booked}::bigint[])")
    assert booked and missing == 0
    figures.update(bookings_answered=bookings, loans_booked=len(booked), **served.audit())


def test_ledger_import_waits_out_a_short_database_outage(served: Served, figures: dict[str, Any]) -> None:
    """`ledger import` follows its job by polling PostgreSQL: a restart during the import stopped it
    with "cannot reach PostgreSQL", exit 1, while the worker resumed the job and finished it (a
    review). It now waits for the database and reports the finished import."""
    imports = Path(served.env["IMPORT_DIR"])
    people = [[760_000 + n, "Outage", f"Row{n}", 40, 9_530_000_000 + n, 60_000, 2_200_000] for n in range(200)]
    loans = [[760_000 + n, 860_000 + n, 100_000, 12, 10, 8_800, 3, date(2025, 1, 1), date(2026, 1, 1)] for n in range(200)]
    customers_file = write_xlsx(imports / "outage_customers.xlsx", CUSTOMER_COLUMNS, people)
    loans_file = write_xlsx(imports / "outage_loans.xlsx", LOAN_COLUMNS, loans)
    served.stop("worker")
    served.start_worker(IMPORT_BATCH_SIZE="5")  # many small transactions: a long enough import to interrupt
    command = [sys.executable, "-m", "infra.cli", "import", "--customers", str(customers_file), "--loans", str(loans_file)]
    cli = subprocess.Popen(command, env=served.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not served.scalar("SELECT count(*) FROM readmodel.import_jobs WHERE state = 'running' AND rows_done > 0"):
            assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
            time.sleep(0.02)
        served.pg.stop()
        time.sleep(3)
        served.pg.start()
        out, err = cli.communicate(timeout=180)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err
    assert "PostgreSQL is not answering" in err and "PostgreSQL answers again" in err, err
    assert "import completed: 200 customers and 200 loans imported" in out, (out, err)
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE loan_id BETWEEN 860000 AND 860199") == 200
    figures.update(**served.audit())


ENDPOINTS = [
    (
        "POST",
        "/register",
        {"first_name": "Pg", "last_name": "Down", "age": 30, "monthly_income": 10_000, "phone_number": 9_330_000_001},
    ),
    ("POST", "/check-eligibility", {"customer_id": 1, "loan_amount": 1000, "interest_rate": 12, "tenure": 12}),
    ("POST", "/create-loan", {"customer_id": 1, "loan_amount": 1000, "interest_rate": 12, "tenure": 12}),
    ("GET", "/view-loan/1", None),
    ("GET", "/view-loans/1", None),
    ("POST", "/imports", None),
    ("GET", "/imports/00000000-0000-0000-0000-000000000001", None),
]


READS = [endpoint for endpoint in ENDPOINTS if endpoint[0] == "GET" or endpoint[1] == "/check-eligibility"]


def test_with_postgres_down_every_endpoint_answers_503_quickly_and_recovers(served: Served, figures: dict[str, Any]) -> None:
    served.pg.stop()
    try:
        with served.client(timeout=30) as client, ThreadPoolExecutor(len(ENDPOINTS)) as pool:

            def call(endpoint: tuple[str, str, Any]) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = client.request(endpoint[0], endpoint[1], json=endpoint[2])
                return response, time.monotonic() - started

            results = list(pool.map(call, ENDPOINTS))
    finally:
        served.pg.start()
    slowest = max(seconds for _, seconds in results)
    for (method, path, _), (response, _) in zip(ENDPOINTS, results, strict=True):
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        assert response.json()["error"]["code"] == "database_unavailable"
    assert slowest < 12
    # Recovery by itself: poll until every endpoint answers normally on both server processes.
    started = time.monotonic()
    with served.client() as client:
        while True:
            answers = [client.request(method, path, json=body).status_code for method, path, body in READS * 4]
            if 503 not in answers:
                break
            assert time.monotonic() - started < 60, answers
            time.sleep(0.5)
        recovered_after = time.monotonic() - started
        registered = client.post("/register", json=ENDPOINTS[0][2])
        assert registered.status_code == 201, registered.text
    figures.update(
        endpoints=len(ENDPOINTS), slowest_503_s=round(slowest, 2), recovered_after_s=round(recovered_after, 1), **served.audit()
    )
