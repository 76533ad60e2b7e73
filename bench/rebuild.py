"""A full rebuild of the read model from the event store, timed.

    python bench/rebuild.py                                   # generated 10,000 customers and 100,000 loans
    python bench/rebuild.py --customers 1000 --loans 10000    # smaller
    python bench/rebuild.py --reference                       # the bundled reference data (about 1,400 events)

Fills a throwaway database the way production fills it (a worker runs the import, the read model
catches up), then calls projections.projector.rebuild(app, database_url) in this process, as
`ledger rebuild` does: every event is replayed into fresh tables (readmodel_rebuild) beside the live
ones, which are then swapped in. Prints the events replayed, the seconds, and events/s.
(`python bench/import_scale.py --rebuild` does the same after its own import.)
"""

from __future__ import annotations

import argparse
import sys

from common import REPO_ROOT, Stack, machine, result_block, revision, say, stamp
from import_scale import add_data_arguments, data_files, rebuild_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser, customers=10_000, loans=100_000)
    parser.add_argument("--reference", action="store_true", help="use data/ (300 customers, 782 loans)")
    parser.add_argument("--repeat", type=int, default=3, help="rebuilds to time, one after the other")
    args = parser.parse_args()
    if args.reference:
        customers, loans = REPO_ROOT / "data" / "customer_data.xlsx", REPO_ROOT / "data" / "loan_data.xlsx"
    else:
        customers, loans, _ = data_files(args)
    with Stack(import_dir=customers.parent) as stack:
        stack.start_worker(concurrency=2)
        say("importing (through the worker) to fill the event store")
        job = stack.import_and_wait(customers, loans, timeout=3600)
        say(f"imported: {job['summary']['customers_imported']} customers, {job['summary']['loans_imported']} loans")
        stack.stop("worker")  # nothing else competes for the CPUs or the projection lock while the rebuild runs
        rows: list[tuple[str, object]] = [
            ("date", stamp()),
            ("machine", machine()),
            ("commit", revision()),
            ("command", "python bench/rebuild.py " + " ".join(sys.argv[1:])),
            ("PostgreSQL", "throwaway cluster, fsync=off synchronous_commit=off full_page_writes=off"),
        ]
        for attempt in range(1, args.repeat + 1):
            rows += [(f"#{attempt} {label}", value) for label, value in rebuild_rows(stack)]
        print(result_block("rebuild", rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
