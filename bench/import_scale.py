"""The history import end to end, on generated files: queue -> worker import -> read model caught up.

    python bench/import_scale.py                                          # 100,000 customers, 1,000,000 loans
    python bench/import_scale.py --customers 10000 --loans 100000         # the quick run
    python bench/import_scale.py --data /tmp/bench-data --rebuild         # reuse generated files, then time a rebuild

What it does: generates the files (bench/generate.py) unless --data names a folder that has them,
starts a throwaway PostgreSQL (fsync, synchronous_commit and full_page_writes OFF: a disk-independent
figure, faster than a production server with durable commits) and Redis, creates the schema, starts one
`ledger worker --concurrency 2` (IMPORT_DIR = the files' folder), queues the import exactly as
`ledger import` does (infra.cli.start_import), and polls until the job is completed in
readmodel.import_jobs and readmodel.tracking has reached max(notification_id) of ledger_events.

It prints: the time until the import's last event was written, the time until the read model caught
up (the end-to-end figure), rows/s and events/s, the events appended, and the worker's peak memory
(RSS summed over the worker process tree, sampled every 0.2 s from /proc).

--max-seconds stops a run that takes too long and reports how far it got, labelled PARTIAL, with the
rates measured so far and an extrapolation labelled as such.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import Stack, cpu_check, machine, process_tree, pss_bytes, result_block, revision, rss_bytes, say, stamp
from generate import generate

MB = 1024 * 1024


class RssSampler(threading.Thread):
    """Samples the memory of a process tree every `interval` seconds; keeps the peaks: of the RSS
    summed over the tree (the headline figure), of the PSS summed over it (shared pages counted
    once), and of the largest single process's RSS (the pool child that runs the import).

    The tree is looked up every 2 s and the PSS read every 1 s: walking /proc for the tree and the
    kernel's page walk for the PSS every 0.2 s took 11% of a core, taken from the import it measures
    on a 2-core machine. The RSS, which moves fastest, is still read every 0.2 s."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.pss_peak = 0
        self.process_peak = 0
        self.peak_parts: list[tuple[int, str]] = []  # each process's RSS and role in the peak sample
        self.peak_at = 0.0  # seconds after the sampling started
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        tree: list[int] = []
        started = time.monotonic()
        while not self._halt.is_set():
            if self.samples % round(2 / self.interval) == 0:
                tree = process_tree(self.pid)
            sizes = [rss_bytes(p) for p in tree]
            if sum(sizes) > self.peak:
                self.peak, self.peak_at = sum(sizes), time.monotonic() - started
                self.peak_parts = sorted(
                    ((size, self._role(p)) for p, size in zip(tree, sizes, strict=True) if size), reverse=True
                )
            self.process_peak = max(self.process_peak, *sizes)
            if self.samples % round(1 / self.interval) == 0:
                self.pss_peak = max(self.pss_peak, sum(pss_bytes(p) for p in tree))
            self.samples += 1
            self._halt.wait(self.interval)

    def _role(self, pid: int) -> str:
        if pid == self.pid:
            return "Celery parent"
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"infra.xlsx_split" in cmdline.read():
                return "reading helper"
        return "pool child"

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def add_data_arguments(parser: argparse.ArgumentParser, customers: int, loans: int) -> None:
    """The options data_files reads: what to generate (by default `customers` and `loans`) or reuse."""
    parser.add_argument("--customers", type=int, default=customers)
    parser.add_argument("--loans", type=int, default=loans)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, help="a folder with customer_data.xlsx and loan_data.xlsx (generated when missing)")


def data_files(args: argparse.Namespace) -> tuple[Path, Path, float | None]:
    """The two files, generated here unless --data already has them; with the generation time."""
    folder: Path = args.data or Path(f"/tmp/ledger-bench-data-{args.customers}-{args.loans}-{args.seed}")
    customers, loans = folder / "customer_data.xlsx", folder / "loan_data.xlsx"
    if customers.exists() and loans.exists():
        say(f"reusing {customers} and {loans}")
        return customers, loans, None
    started = time.monotonic()
    generate(args.customers, args.loans, args.seed, folder)
    return customers, loans, time.monotonic() - started


def count_rows(path: Path) -> int:
    from python_calamine import CalamineWorkbook

    sheet = CalamineWorkbook.from_path(str(path)).get_sheet_by_index(0)
    return max(0, sheet.height - 1)


def run_import(stack: Stack, customers: Path, loans: Path, max_seconds: float, sampler: RssSampler) -> dict[str, Any]:
    """Queue the import and follow it; timings in seconds from the moment it was queued."""
    started = time.monotonic()
    job_id = stack.start_import(customers, loans)
    written_at: float | None = None
    completed_at: float | None = None
    caught_up_at: float | None = None
    last_report = 0.0
    row: dict[str, Any] | None = None
    while time.monotonic() - started < max_seconds:
        now = time.monotonic() - started
        if written_at is None and stack.job_written(job_id):
            written_at = now
        row = stack.job(job_id)
        if row is not None and row["state"] == "failed":
            raise RuntimeError(f"the import failed: {row['summary']}\n{stack.log('worker')[-3000:]}")
        if row is not None and row["state"] == "completed" and completed_at is None:
            completed_at = now
        if completed_at is not None and stack.caught_up():
            caught_up_at = time.monotonic() - started
            break
        if now - last_report >= 10:
            last, position = stack.lag()
            done = f"{row['rows_done']}/{row['total_rows']} rows" if row else "queued"
            say(f"{now:6.0f} s: {done}, events {last}, read model at {position}, worker RSS peak {sampler.peak / MB:.0f} MB")
            last_report = now
        time.sleep(0.2)
    last, position = stack.lag()
    return {
        "job_id": job_id,
        "row": row,
        "elapsed": time.monotonic() - started,
        "written_at": written_at,
        "completed_at": completed_at,
        "caught_up_at": caught_up_at,
        "last_event": last,
        "position": position,
    }


def time_rebuild(stack: Stack) -> tuple[int, float]:
    """`projections.projector.rebuild` in this process, as `ledger rebuild` runs it: (events applied, seconds)."""
    from infra.postgres import build_ledger
    from projections.projector import rebuild

    app, pool = build_ledger(stack.settings)
    try:
        started = time.perf_counter()
        applied = rebuild(app, stack.database_url)
        return applied, time.perf_counter() - started
    finally:
        pool.close()
        app.close()


def rebuild_rows(stack: Stack) -> list[tuple[str, object]]:
    events = stack.events()
    applied, seconds = time_rebuild(stack)
    return [
        ("rebuild: events in the store", events),
        ("rebuild: events applied", applied),
        ("rebuild: seconds", f"{seconds:.1f}"),
        ("rebuild: events/s", f"{applied / seconds:,.0f}"),
        (
            "read model after rebuild",
            f"{stack.scalar('SELECT count(*) FROM readmodel.customers')} customers, "
            f"{stack.scalar('SELECT count(*) FROM readmodel.loans')} loans",
        ),
    ]


def again_rows(stack: Stack, customers: Path, loans: Path, max_seconds: float, worker_pid: int) -> list[tuple[str, object]]:
    """The same files imported a second time: every row is found recorded, and nothing is added."""
    events_before = stack.events()
    sampler = RssSampler(worker_pid)
    sampler.start()
    try:
        say("importing the same files again")
        result = run_import(stack, customers, loans, max_seconds, sampler)
    finally:
        sampler.stop()
    summary = (result["row"] or {}).get("summary") or {}
    if result["completed_at"] is None:
        return [("re-import", f"PARTIAL: not finished after {result['elapsed']:.0f} s (--max-seconds)")]
    return [
        ("re-import of the same files", f"{result['completed_at']:.1f} s"),
        (
            "re-import: already present",
            f"{summary.get('customers_already_present')} customers, {summary.get('loans_already_present')} loans"
            f" ({summary.get('customers_imported')} customers and {summary.get('loans_imported')} loans imported)",
        ),
        ("re-import: events appended", f"{stack.events() - events_before} (the job's own)"),
        ("re-import: worker peak RSS (process tree)", f"{sampler.peak / MB:,.0f} MB"),
        (
            "re-import: the peak's processes (RSS, MB)",
            " + ".join(f"{size / MB:,.0f} ({role})" for size, role in sampler.peak_parts),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser, customers=100_000, loans=1_000_000)
    parser.add_argument("--batch-size", type=int, default=500, help="IMPORT_BATCH_SIZE (customers per transaction)")
    parser.add_argument("--page-size", type=int, default=1000, help="PROJECTION_PAGE_SIZE (events per projection transaction)")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop and report PARTIAL figures after this long")
    parser.add_argument("--rebuild", action="store_true", help="then time a full rebuild of the read model")
    parser.add_argument("--again", action="store_true", help="then import the same files again (it adds nothing) and time that")
    args = parser.parse_args()

    customers, loans, generated_in = data_files(args)
    say("counting rows")
    customer_rows, loan_rows = count_rows(customers), count_rows(loans)
    total_rows = customer_rows + loan_rows
    extra = {"IMPORT_BATCH_SIZE": str(args.batch_size), "PROJECTION_PAGE_SIZE": str(args.page_size)}
    speed_before = cpu_check()
    with Stack(import_dir=customers.parent, **extra) as stack:
        worker = stack.start_worker(concurrency=2)
        sampler = RssSampler(worker.pid)
        sampler.start()
        try:
            say(f"importing {customer_rows} customers and {loan_rows} loans")
            result = run_import(stack, customers, loans, args.max_seconds, sampler)
        finally:
            sampler.stop()
        speed_after = cpu_check()
        events = stack.events()
        row = result["row"] or {}
        summary = row.get("summary") or {}
        finished = result["caught_up_at"] is not None
        rows: list[tuple[str, object]] = [
            ("date", stamp()),
            ("machine", machine()),
            ("CPU check (10M-addition loop)", f"{speed_before:.2f} s before the import, {speed_after:.2f} s after"),
            ("commit", revision()),
            ("command", "python bench/import_scale.py " + " ".join(sys.argv[1:])),
            (
                "PostgreSQL",
                "throwaway cluster, fsync=off synchronous_commit=off full_page_writes=off (PostgresServer(fast=True))",
            ),
            (
                "worker",
                f"1 x `ledger worker --concurrency 2`, IMPORT_BATCH_SIZE={args.batch_size}, PROJECTION_PAGE_SIZE={args.page_size}",
            ),
            (
                "files",
                f"{customer_rows} customers + {loan_rows} loans = {total_rows} rows"
                + (f" (generated in {generated_in:.0f} s)" if generated_in else ""),
            ),
        ]
        if finished:
            total = result["caught_up_at"]
            written = result["written_at"] or result["completed_at"]
            rows += [
                ("import written (last event stored)", f"{written:.1f} s"),
                ("read model caught up (END TO END)", f"{total:.1f} s"),
                ("projection behind the import by", f"{total - written:.1f} s"),
                ("rows/s (end to end)", f"{total_rows / total:,.0f}"),
                ("rows/s (import writes)", f"{total_rows / written:,.0f}"),
                ("events appended (count(*) ledger_events)", events),
                ("events/s (end to end)", f"{events / total:,.0f}"),
                (
                    "imported",
                    f"{summary.get('customers_imported')} customers, {summary.get('loans_imported')} loans, "
                    f"{len(summary.get('rekeyed_loans', []))} rekeyed duplicate Loan IDs, {summary.get('rows_rejected')} rows rejected",
                ),
            ]
        else:
            elapsed = result["elapsed"]
            done = int(row.get("rows_done") or 0)
            rate = done / elapsed if elapsed else 0.0
            rows += [
                ("PARTIAL", f"stopped after {elapsed:.0f} s (--max-seconds {args.max_seconds:.0f}); the import did not finish"),
                ("rows done (read model's progress)", f"{done}/{total_rows}"),
                ("events appended so far", events),
                ("read model position", f"{result['position']} of {result['last_event']}"),
                ("rows/s so far", f"{rate:,.0f}"),
                (
                    "EXTRAPOLATION (not measured)",
                    f"{total_rows / rate:,.0f} s for all {total_rows} rows at that rate" if rate else "n/a",
                ),
            ]
        rows.append(("worker peak RSS (process tree)", f"{sampler.peak / MB:,.0f} MB ({sampler.samples} samples, every 0.2 s)"))
        parts = " + ".join(f"{size / MB:,.0f} ({role})" for size, role in sampler.peak_parts)
        rows.append(("the peak's processes (RSS, MB)", f"{parts}, {sampler.peak_at:,.0f} s into the import"))
        rows.append(("worker peak PSS (process tree)", f"{sampler.pss_peak / MB:,.0f} MB (shared pages counted once)"))
        rows.append(("largest worker process, peak RSS", f"{sampler.process_peak / MB:,.0f} MB (the pool child importing)"))
        if args.again and finished:
            rows += again_rows(stack, customers, loans, args.max_seconds, worker.pid)
        if args.rebuild and finished:
            rows += rebuild_rows(stack)
        print(result_block("import_scale", rows), flush=True)
    return 0 if finished else 2


if __name__ == "__main__":
    sys.exit(main())
