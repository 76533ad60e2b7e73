"""`ledger`: the operator's command line (setup, import, rebuild, status, run)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from psycopg.rows import dict_row

from infra.config import REPO_ROOT, Settings
from infra.postgres import build_ledger, connect, setup_schema


def bar(done: int, total: int, label: str, width: int = 30) -> None:
    share = done / total if total else 1.0
    filled = int(width * share)
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def _job_row(settings: Settings, job_id: UUID) -> dict[str, Any] | None:
    with connect(settings) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM readmodel.import_jobs WHERE job_id = %s", (job_id,))
        return cur.fetchone()


def start_import(settings: Settings, customers: Path, loans: Path) -> UUID:
    from workers import tasks

    ledger, pool = build_ledger(settings)
    try:
        job_id, _ = ledger.request_import(str(customers.resolve()), str(loans.resolve()))
    finally:
        pool.close()
        ledger.close()
    tasks.import_history.apply_async((str(job_id), str(customers.resolve()), str(loans.resolve())))
    tasks.trigger_catch_up()
    return job_id


def follow_import(settings: Settings, job_id: UUID, timeout: float = 3600) -> dict[str, Any]:
    """Show the job's progress until it finishes; return its final row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _job_row(settings, job_id)
        if row is not None:
            bar(row["rows_done"], row["total_rows"], f"import {row['state']:<9}")
            if row["state"] in ("completed", "failed"):
                print(file=sys.stderr)
                return row
        time.sleep(0.3)
    raise TimeoutError(f"import {job_id} did not finish in {timeout:.0f} s")


def print_report(row: dict[str, Any]) -> None:
    summary = row["summary"]
    if row["state"] == "failed":
        print(f"import failed: {summary.get('error')}", file=sys.stderr)
        return
    print(
        f"import completed: {summary['customers_imported']} customers and {summary['loans_imported']} loans imported, "
        f"{summary['customers_already_present']} customers and {summary['loans_already_present']} loans already present, "
        f"{len(summary['rekeyed_loans'])} loans given new IDs, {len(row['issues'])} rows rejected",
        file=sys.stderr,
    )
    for issue in row["issues"]:
        print(f"  {issue['file']} row {issue['row']}: {issue['reason']}", file=sys.stderr)


def cmd_setup(args: argparse.Namespace) -> int:
    setup_schema(Settings.from_env())
    print("schema ready", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    job_id = start_import(settings, Path(args.customers), Path(args.loans))
    print(f"import job {job_id} queued", file=sys.stderr)
    row = follow_import(settings, job_id)
    print_report(row)
    return 0 if row["state"] == "completed" else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    from projections.projector import rebuild

    settings = Settings.from_env()
    ledger, pool = build_ledger(settings)
    try:
        applied = rebuild(ledger, settings.database_url, lambda done, total: bar(done, total, "rebuild"))
    finally:
        pool.close()
        ledger.close()
    print(f"\nread model rebuilt from {applied} events", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    ledger, pool = build_ledger(settings)
    try:
        last = ledger.recorder.max_notification_id() or 0
    finally:
        pool.close()
        ledger.close()
    with connect(settings) as conn:
        row = conn.execute("SELECT position FROM readmodel.tracking WHERE projection = 'ledger'").fetchone()
    position = int(row[0]) if row else 0
    print(f"events recorded: {last}\nread model position: {position}\nlag: {last - position} events")
    return 0


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT)


def cmd_run(args: argparse.Namespace) -> int:
    from infra.stack import services

    # SIGTERM (docker stop, timeout, kill) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    processes: list[subprocess.Popen[bytes]] = []
    with services() as (database_url, redis_url), tempfile.TemporaryDirectory(prefix="ledger-beat-") as beat_dir:
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        env = dict(os.environ)
        settings = Settings.from_env()
        try:
            setup_schema(settings)
            celery = [sys.executable, "-m", "celery", "-A", "workers.celery_app"]
            processes.append(_spawn([*celery, "worker", "--loglevel=INFO", "--concurrency=2"], env))
            processes.append(_spawn([*celery, "beat", "--loglevel=INFO", "--schedule", f"{beat_dir}/schedule"], env))
            if not args.no_import:
                job_id = start_import(
                    settings, settings.import_dir / "customer_data.xlsx", settings.import_dir / "loan_data.xlsx"
                )
                print_report(follow_import(settings, job_id))
            server = _spawn(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.app:app_from_env",
                    "--factory",
                    "--host",
                    args.host,
                    "--port",
                    str(args.port),
                    "--workers",
                    str(args.workers),
                    "--timeout-graceful-shutdown",
                    "10",
                ],
                env,
            )
            processes.append(server)
            base = f"http://{args.host}:{args.port}"
            print(
                f"\nLedger API on {base}  (docs: {base}/docs, OpenAPI: {base}/openapi.json). Ctrl-C stops everything.\n",
                file=sys.stderr,
            )
            return server.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            for process in reversed(processes):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description="Operate the credit approval ledger.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("setup", help="create the event store, ID sequences and read model (idempotent)").set_defaults(
        func=cmd_setup
    )

    imp = commands.add_parser("import", help="import the history files in a worker and follow its progress")
    imp.add_argument("--customers", default=str(REPO_ROOT / "data" / "customer_data.xlsx"), help="customer file (xlsx)")
    imp.add_argument("--loans", default=str(REPO_ROOT / "data" / "loan_data.xlsx"), help="loan file (xlsx)")
    imp.set_defaults(func=cmd_import)

    commands.add_parser("rebuild", help="replay every event into fresh read-model tables and swap them in").set_defaults(
        func=cmd_rebuild
    )
    commands.add_parser("status", help="show the events recorded and how far the read model has got").set_defaults(
        func=cmd_status
    )

    run = commands.add_parser(
        "run", help="start PostgreSQL, Redis (unless configured), a worker, beat and the API; import the reference data"
    )
    run.add_argument("--host", default=os.environ.get("API_HOST", "127.0.0.1"))
    run.add_argument("--port", type=int, default=int(os.environ.get("API_PORT", "8000")))
    run.add_argument("--workers", type=int, default=int(os.environ.get("API_WORKERS", "2")))
    run.add_argument("--no-import", action="store_true", help="do not import the bundled reference data")
    run.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
