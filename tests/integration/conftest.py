"""The real stack for integration tests: a fresh PostgreSQL database per test module,
a Redis database of its own, a real Celery worker (with beat) and the API in-process.

`make test` starts throwaway PostgreSQL and Redis servers and sets DATABASE_URL and
REDIS_URL; run `python -m infra.testrun tests/integration` to do the same by hand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openpyxl
import psycopg
import pytest
import redis
from starlette.testclient import TestClient

from api.app import create_app
from infra.config import REPO_ROOT, Settings
from infra.postgres import build_ledger, setup_schema
from ledger.application import Ledger
from ledger.ports import FixedClock
from projections.projector import NOTIFY_CHANNEL, Projector
from workers import tasks

TODAY = date(2026, 11, 22)


def wait_healthy(
    base: str, detail: Callable[[], str], process: subprocess.Popen[bytes] | None = None, timeout: float = 60
) -> None:
    """Poll `base`/health until it answers 200; fail with `detail()` after `timeout` s or once `process` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert (process is None or process.poll() is None) and time.monotonic() < deadline, detail()
        time.sleep(0.2)


def write_xlsx(path: Path, header: tuple[str, ...] | list[str], rows: list[list[Any]]) -> Path:
    """A one-sheet workbook: `header`, then `rows`."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(list(header))
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the integration tests with `make test` (or python -m infra.testrun)")
    return value


def stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Stop a process started with `start_new_session=True` and everything in its group: `sig` to
    the group, SIGKILL if it has not exited within `timeout`, then SIGKILL to whatever is left (an
    embedded beat, a pool child)."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if sig == signal.SIGKILL:
        time.sleep(0.2)  # children the parent was forking as it died
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    workdir: Path
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        log_path = self.workdir / "worker.log"
        started_at = log_path.stat().st_size if log_path.exists() else 0  # the log of earlier starts says "ready." too
        with log_path.open("ab") as log:
            self.worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.celery_app",
                    "worker",
                    "--loglevel=INFO",
                    "--concurrency=2",
                    "-B",
                    "--schedule",
                    str(self.workdir / "beat-schedule"),
                    "-n",
                    f"test-{uuid.uuid4().hex[:8]}@%h",
                ],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it reaches beat and the pool too
            )
        deadline = time.monotonic() + 30
        while b"ready." not in log_path.read_bytes()[started_at:]:
            if time.monotonic() > deadline or self.worker.poll() is not None:
                raise RuntimeError("the Celery worker did not start:\n" + self.worker_log())
            time.sleep(0.1)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is not None:
            stop_group(self.worker, sig, 30)
        self.worker = None

    def worker_log(self) -> str:
        return (self.workdir / "worker.log").read_text(errors="replace")

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.database_url, autocommit=True)

    def ledger(self) -> Ledger:
        app, _pool = build_ledger(self.settings)
        app.clock = FixedClock(TODAY)
        return app

    def wait_for(self, sql: str, expected: object, timeout: float = 30) -> object:
        """Poll a read-model query until it gives `expected` (projections are asynchronous)."""
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                row = conn.execute(sql).fetchone()
                value = row[0] if row else None
                if value == expected or time.monotonic() > deadline:
                    return value
                time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database_url = _require("DATABASE_URL")
    redis_url = _require("REDIS_URL")
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin_url = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    # One worker runs at a time (each module stops its own), so modules share the Redis
    # database; emptying it keeps an earlier module's queued tasks away from this one.
    redis.Redis.from_url(redis_url).flushdb()
    env = {
        **os.environ,
        "DATABASE_URL": psycopg.conninfo.make_conninfo(database_url, dbname=name),
        "REDIS_URL": redis_url,
        "PROJECTION_POLL_SECONDS": "1",
        "LEDGER_TODAY": TODAY.isoformat(),
    }
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "PROJECTION_POLL_SECONDS", "LEDGER_TODAY")})
    workdir = tmp_path_factory.mktemp("stack")
    imports = workdir / "imports"
    imports.mkdir()
    for reference in (REPO_ROOT / "data").glob("*.xlsx"):
        shutil.copy(reference, imports)
    settings = replace(Settings.from_env(), import_dir=imports)
    setup_schema(settings)
    stack = Stack(settings, env, workdir)
    try:
        stack.start_worker()  # inside: a run stopped while the worker starts still stops it
        yield stack
    finally:
        stack.stop_worker()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[TestClient]:
    app = create_app(stack.settings, clock=FixedClock(TODAY))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def registered_without_trigger(stack: Stack, phone: str) -> int:
    """A customer registered by an application of this process: nobody asks a worker to project
    it, so only the periodic catch-up (beat) does. Their customer ID."""
    app, pool = build_ledger(stack.settings)
    try:
        return app.register_customer("Ola", "Nwosu", 45, phone, Decimal(70_000)).customer.customer_id
    finally:
        pool.close()
        app.close()


def forget_task_state() -> None:
    """Close what the worker's tasks keep in this process when a test runs them here (their
    application and projector, for one module's database), so that the next run opens its own."""
    if tasks.projector.cache_info().currsize:
        tasks.projector().close()
    if tasks._ledger.cache_info().currsize:
        tasks._ledger().close()
    tasks.projector.cache_clear()
    tasks._ledger.cache_clear()


def catch_up_in_process(stack: Stack) -> list[str]:
    """Run the projection once in this process (the worker stopped); the positions it announced."""
    app, pool = build_ledger(stack.settings)
    try:
        with psycopg.connect(stack.settings.database_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            with Projector(app, stack.settings.database_url) as projector:
                projector.catch_up()
            return [n.payload for n in listener.notifies(timeout=1.0)]
    finally:
        pool.close()
        app.close()
