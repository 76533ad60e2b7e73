"""Where the import's time goes: the import run in this process under cProfile.

    python bench/profile_import.py --customers 1000 --loans 10000
    python bench/profile_import.py --data /tmp/some-folder --top 40

Starts a throwaway PostgreSQL (fsync off) and Redis and the schema, then runs
infra.importer.run_import (what the Celery task runs) in this process, with no worker and no
projection running, under cProfile. Prints the wall time, the rows/s, and the functions with the
most cumulative and own time, plus how many times the event store was read (select_events) and
written (insert_events), i.e. database round trips per imported row.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

from common import Stack, machine, revision, say, stamp
from import_scale import count_rows, data_files


def calls(stats: pstats.Stats, name: str) -> int:
    """Primitive calls of every function called `name` (e.g. select_events)."""
    return sum(value[0] for (_, _, function), value in stats.stats.items() if function == name)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--loans", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--callers", default="__instancecheck__", help="also show who calls functions matching this")
    parser.add_argument(
        "--again", action="store_true", help="import first unprofiled, then profile importing the same files again"
    )
    args = parser.parse_args()
    customers, loans, _ = data_files(args)
    rows = count_rows(customers) + count_rows(loans)

    from infra.importer import run_import
    from infra.postgres import build_ledger

    with Stack(import_dir=customers.parent) as stack:
        app, pool = build_ledger(stack.settings)
        try:
            if args.again:
                say(f"importing {rows} rows in-process, unprofiled")
                first, _ = app.request_import(str(customers), str(loans))
                run_import(app, first, customers, loans, args.batch_size)
            job_id, _ = app.request_import(str(customers), str(loans))
            profiler = cProfile.Profile()
            say(f"importing {rows} rows in-process under cProfile")
            started = time.perf_counter()
            profiler.enable()
            result = run_import(app, job_id, customers, loans, args.batch_size)
            profiler.disable()
            seconds = time.perf_counter() - started
        finally:
            pool.close()
            app.close()
        events = stack.events()

    stats = pstats.Stats(profiler)
    print(f"===== profile_import ({stamp()}) =====")
    print(f"machine: {machine()}")
    print(f"commit: {revision()}")
    print(f"command: python bench/profile_import.py {' '.join(sys.argv[1:])}")
    print(f"{result['state']}: {rows} rows, {events} events in {seconds:.1f} s under cProfile ({rows / seconds:,.0f} rows/s)")
    print(
        f"event store reads (select_events): {calls(stats, 'select_events')} = {calls(stats, 'select_events') / rows:.2f} per row"
    )
    print(f"event store writes (insert_events): {calls(stats, 'insert_events')}")
    print(f"existence queries, one per batch (existing): {calls(stats, 'existing')}")
    print(f"ID sequence calls (_scalar): {calls(stats, '_scalar')}")
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
        text = out.getvalue()
        print(f"--- top {args.top} by {order} ---")
        print(text[text.find("   ncalls") :])
    if args.callers:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_callers(args.callers)
        print(f"--- callers of {args.callers} ---")
        print(out.getvalue().split("was called by...", 1)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
