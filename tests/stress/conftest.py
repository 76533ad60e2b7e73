"""The whole system as it is deployed, for stress and fault tests: its own PostgreSQL and
Redis servers (which the tests stop and start), a Celery worker and beat, and the API
served by uvicorn with 2 worker processes, all started through the `ledger` command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from infra.config import REPO_ROOT, Settings
from infra.postgres import build_ledger, setup_schema
from infra.stack import PostgresServer, RedisServer, free_port
from projections.projector import rebuild
from tests.integration.conftest import stop_group, wait_healthy

READ_MODEL = {
    "customers": "customer_id",
    "loans": "loan_id",
    "repayments": "loan_id, installment",
    "import_jobs": "job_id",
    "tracking": "projection",
}


@dataclass
class Served:
    pg: PostgresServer
    redis: RedisServer
    workdir: Path
    port: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> Settings:
        return _settings(self.env)

    def start(self, name: str, *args: str, as_name: str | None = None, **extra_env: str) -> None:
        """Run `ledger <name> <args>`; `as_name` keeps a second one apart (its log and stop)."""
        key = as_name or name
        with (self.workdir / f"{key}.log").open("ab") as log:
            self.processes[key] = subprocess.Popen(
                [sys.executable, "-m", "infra.cli", name, *args],
                env={**self.env, **extra_env},
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill reaches the pool's children too
            )

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            stop_group(process, sig)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start_worker(self, as_name: str = "worker", **extra_env: str) -> None:
        logged = len(self.log(as_name)) if (self.workdir / f"{as_name}.log").exists() else 0
        self.start("worker", "--concurrency", "2", as_name=as_name, **extra_env)
        deadline = time.monotonic() + 30
        while "ready." not in self.log(as_name)[logged:]:
            assert time.monotonic() < deadline, self.log(as_name)
            time.sleep(0.1)

    def start_api(self) -> None:
        self.start("api", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2")
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_healthy(self.base, lambda: self.log("api"), timeout=timeout)

    def client(self, **kwargs: Any) -> httpx.Client:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        return httpx.Client(base_url=self.base, limits=limits, **({"timeout": 60} | kwargs))

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.env["DATABASE_URL"], autocommit=True)

    def scalar(self, sql: str) -> Any:
        with self.connect() as conn:
            row = conn.execute(sql).fetchone()
        return row[0] if row else None

    def wait_caught_up(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            last = self.scalar("SELECT coalesce(max(notification_id), 0) FROM ledger_events")
            position = self.scalar("SELECT coalesce(max(position), 0) FROM readmodel.tracking")
            if position == last:
                return int(last)
            assert time.monotonic() < deadline, f"projection stuck at {position} of {last}\n{self.log('worker')[-3000:]}"
            time.sleep(0.2)

    def audit(self) -> dict[str, int]:
        """Events in the store, the read model and a fresh rebuild agree (once no import runs)."""
        deadline = time.monotonic() + 120
        while self.scalar("SELECT count(*) FROM readmodel.import_jobs WHERE state IN ('queued', 'running')"):
            assert time.monotonic() < deadline, "an import never finished"
            time.sleep(0.2)
        self.wait_caught_up()
        with self.connect() as conn:
            topics = dict(conn.execute("SELECT topic, count(*) FROM ledger_events GROUP BY topic").fetchall())
            before = _snapshot(conn)

        def count(*names: str) -> int:
            return sum(n for topic, n in topics.items() if topic.rsplit(":", 1)[-1] in names)

        assert len(before["customers"]) == count("Customer.Registered", "Customer.HistoryImported", "Customer.Imported")
        with self.connect() as conn:  # an imported customer's loans are listed in their customer's events
            carried = conn.execute(
                "SELECT coalesce(sum(jsonb_array_length(convert_from(state, 'UTF8')::jsonb -> 'loans')), 0) FROM ledger_events"
                " WHERE topic LIKE '%Customer.HistoryImported' OR topic LIKE '%Customer.HistoryExtended'"
            ).fetchone()
        assert len(before["loans"]) == count("Loan.Booked", "Loan.Imported") + carried[0]
        app, pool = build_ledger(self.settings)
        try:
            rebuild(app, self.env["DATABASE_URL"])
        finally:
            pool.close()
            app.close()
        with self.connect() as conn:
            after = _snapshot(conn)
        assert after == before, "the read model differs from a fresh rebuild"
        return {"events": sum(topics.values()), "customers": len(before["customers"]), "loans": len(before["loans"])}


def _settings(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: conn.execute(f"SELECT * FROM readmodel.{table} ORDER BY {key}").fetchall() for table, key in READ_MODEL.items()
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("served")
    imports = workdir / "imports"
    imports.mkdir()
    for reference in (REPO_ROOT / "data").glob("*.xlsx"):
        shutil.copy(reference, imports)
    pg = PostgresServer(fast=True)
    redis_server = RedisServer()
    served = Served(pg, redis_server, workdir, free_port(), {})
    try:
        pg.start()
        pg.create_database()
        redis_server.start()
        served.env = {
            **os.environ,
            "DATABASE_URL": pg.url,
            "REDIS_URL": redis_server.url,
            "IMPORT_DIR": str(imports),
            "PROJECTION_POLL_SECONDS": "1",
            "LEDGER_TODAY": "2026-11-22",
        }
        setup_schema(served.settings)
        served.start_worker()
        served.start("beat")
        served.start_api()
        yield served
    finally:
        for name in list(served.processes):
            served.stop(name)
        redis_server.remove()
        pg.remove()


FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Figures a test reports (requests sent, loans booked, events counted), printed at the end of the run."""
    found: dict[str, Any] = {}
    yield found
    if found:
        FIGURES.append(f"{request.node.name}: " + ", ".join(f"{k}={v}" for k, v in found.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("stress figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def import_reference(served: Served, client: httpx.Client, timeout: float = 120) -> dict[str, Any]:
    job = client.post("/imports").json()["job_id"]
    return follow(client, job, timeout)


def follow(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/imports/{job_id}").json()
        if body.get("state") in ("completed", "failed"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
