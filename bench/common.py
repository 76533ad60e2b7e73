"""What the benchmarks share: a throwaway stack (PostgreSQL, Redis, `ledger` processes), process memory, percentiles.

Everything started here is stopped by `Stack.close()` (each process is its own process group, killed
as a group), and `Stack` is a context manager so every script stops what it started, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402

from infra.config import Settings  # noqa: E402
from infra.stack import PostgresServer, RedisServer, free_port  # noqa: E402

TODAY = "2026-11-22"  # LEDGER_TODAY for every benchmark: the same dates, the same decisions, run after run
PYTHON = sys.executable


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    """`nproc`, the CPU model and the memory, as the results table wants them."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
        memory = f", {total_kb / 1024 / 1024:.0f} GiB RAM"
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}{memory}"


def cpu_check() -> float:
    """Seconds for a pure-Python loop of 10 million additions, in a function. The 2026-11-27 VM
    ran it in 0.35 to 0.72 s from one minute to the next: print it beside a timing, a rough
    sign of how fast the machine was."""
    started = time.perf_counter()
    total = 0
    for n in range(10_000_000):
        total += n
    return time.perf_counter() - started


def revision() -> str:
    """The commit measured, and whether files outside bench/ differ from it (the tree may move under a run)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)bench"], cwd=REPO_ROOT, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(share * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def result_block(title: str, rows: list[tuple[str, object]]) -> str:
    width = max(len(label) for label, _ in rows)
    lines = [f"===== {title} =====", *(f"{label:<{width}} : {value}" for label, value in rows), "=" * (len(title) + 12)]
    return "\n".join(lines)


# Process memory from /proc (psutil is not installed)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children = _children_by_parent()
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: the process's private pages plus its share of the pages it shares
    (a forked pool child shares most of its parent's; RSS counts those once per process)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise in the main thread, so `finally` blocks stop what was started.

    (A background job of a non-interactive shell starts with SIGINT ignored; this undoes that.)
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


class Stack:
    """A throwaway PostgreSQL (fsync off: `PostgresServer(fast=True)`) and Redis, the schema, and `ledger` processes."""

    def __init__(self, import_dir: Path | None = None, **extra_env: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
        self.tmp = self.workdir / "tmp"
        self.tmp.mkdir()
        self._pg: PostgresServer | None = None
        self._redis: RedisServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.import_dir = import_dir or REPO_ROOT / "data"
        self.extra_env = extra_env
        self.api_port = 0
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> Stack:
        stop_on_signals()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def pg(self) -> PostgresServer:
        assert self._pg is not None, "the stack is not started"
        return self._pg

    @property
    def redis(self) -> RedisServer:
        assert self._redis is not None, "the stack is not started"
        return self._redis

    def start(self) -> None:
        self._pg = PostgresServer(fast=True)  # fsync, synchronous_commit and full_page_writes off
        self._redis = RedisServer()
        say(f"starting PostgreSQL (fsync off) on 127.0.0.1:{self.pg.port} and Redis on 127.0.0.1:{self.redis.port}")
        self.pg.start()
        self.pg.create_database()
        self.redis.start()
        # This process is the benchmark's own: its environment is what every `ledger` process gets.
        os.environ.update(
            {
                "DATABASE_URL": self.pg.url,
                "REDIS_URL": self.redis.url,
                "IMPORT_DIR": str(self.import_dir),
                "LEDGER_TODAY": TODAY,
                **self.extra_env,
            }
        )
        from infra.postgres import setup_schema

        setup_schema(self.settings)

    @property
    def settings(self) -> Settings:
        return Settings.from_env()

    @property
    def database_url(self) -> str:
        return self.pg.url

    # Processes

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [PYTHON, "-m", "infra.cli", name, *args],
                # TMPDIR inside the workdir: whatever a process leaves in its temp dir goes with the workdir
                env={**os.environ, "TMPDIR": str(self.tmp), **(env or {})},
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killing the group reaches pool children too
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_worker(self, concurrency: int = 2, timeout: float = 60) -> subprocess.Popen[bytes]:
        process = self.spawn("worker", "--concurrency", str(concurrency))
        wait_until(lambda: "ready." in self.log("worker"), timeout, "the worker to be ready", lambda: self.log("worker")[-3000:])
        return process

    def start_api(self, workers: int = 2, timeout: float = 60, env: dict[str, str] | None = None) -> str:
        import httpx2

        self.api_port = free_port()
        metrics = self.workdir / "metrics"  # PROMETHEUS_MULTIPROC_DIR inside the workdir, so it is removed with it
        metrics.mkdir(exist_ok=True)
        args = ("--host", "127.0.0.1", "--port", str(self.api_port), "--workers", str(workers))
        self.spawn("api", *args, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics), **(env or {})})
        base = f"http://127.0.0.1:{self.api_port}"

        def healthy() -> bool:
            try:
                return httpx2.get(f"{base}/health", timeout=1).status_code == 200
            except httpx2.TransportError:
                return False

        wait_until(healthy, timeout, "the API to answer /health", lambda: self.log("api")[-3000:])
        return base

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)  # a warm shutdown, then the group is killed whatever is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        if self._conn is not None:
            self._conn.close()
        if self._redis is not None:
            self._redis.remove()
        if self._pg is not None:
            self._pg.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # Database

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def kept(self) -> psycopg.Connection:
        """The connection the benchmark's own queries share. A new connection for each poll cost
        PostgreSQL about 8 ms of CPU (a forked backend) and this process 1.4 ms: polling an import
        every 0.2 s that way took about 5% of a 2-core machine from the import it timed.
        Statements are not prepared: a rebuild replaces the tables they would name."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.database_url, autocommit=True, prepare_threshold=None)
        return self._conn

    def scalar(self, sql: str, *params: object) -> Any:
        row = self.kept().execute(sql, params).fetchone()
        return row[0] if row else None

    def events(self) -> int:
        return int(self.scalar("SELECT count(*) FROM ledger_events"))

    def lag(self) -> tuple[int, int]:
        """(last notification ID in the store, read-model tracking position)."""
        last = self.scalar("SELECT coalesce(max(notification_id), 0) FROM ledger_events")
        position = self.scalar("SELECT coalesce(max(position), 0) FROM readmodel.tracking")
        return int(last), int(position)

    def caught_up(self) -> bool:
        last, position = self.lag()
        return last == position

    def wait_caught_up(self, timeout: float = 60) -> float:
        return wait_until(self.caught_up, timeout, "the read model to catch up", lambda: self.log("worker")[-3000:], 0.1)

    def job(self, job_id: UUID) -> dict[str, Any] | None:
        from psycopg.rows import dict_row

        with self.kept().cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM readmodel.import_jobs WHERE job_id = %s", (job_id,))
            return cur.fetchone()

    def job_written(self, job_id: UUID) -> bool:
        """The import's last event (Completed or Failed) is in the event store (the read model may not show it yet)."""
        return bool(
            self.scalar(
                "SELECT count(*) FROM ledger_events WHERE originator_id = %s AND (topic LIKE %s OR topic LIKE %s)",
                job_id,
                "%ImportJob.Completed",
                "%ImportJob.Failed",
            )
        )

    def start_import(self, customers: Path, loans: Path) -> UUID:
        from infra.cli import start_import

        return start_import(self.settings, customers, loans)

    def import_and_wait(self, customers: Path, loans: Path, timeout: float = 600) -> dict[str, Any]:
        """Queue an import in the worker, wait until it completed and the read model caught up; the job's row."""
        job_id = self.start_import(customers, loans)
        row: dict[str, Any] | None = None

        def done() -> bool:
            nonlocal row
            row = self.job(job_id)
            return row is not None and row["state"] in ("completed", "failed") and self.caught_up()

        wait_until(done, timeout, f"import {job_id} and the projection", lambda: self.log("worker")[-3000:], interval=0.2)
        assert row is not None
        if row["state"] != "completed":
            raise RuntimeError(f"import failed: {row['summary']}")
        return row


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] = str, interval: float = 0.1
) -> float:
    """Poll `condition` until true; the seconds it took. Raises TimeoutError (with `detail()`) after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(interval)
    return time.monotonic() - started


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    finished: list[float] = []
    yield lambda: (finished[0] if finished else time.perf_counter()) - started
    finished.append(time.perf_counter())
