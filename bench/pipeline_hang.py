"""Does one large psycopg pipeline hang? The import's event-store write, reproduced without the application.

    python bench/pipeline_hang.py                 # payloads of 1, 2, 4, 4.5 and 5 MiB
    python bench/pipeline_hang.py 4 4.5 5 8

The eventsourcing library writes a transaction's events in psycopg pipeline mode: LOCK TABLE, NOTIFY,
then one INSERT ... SELECT FROM unnest(%s) with every event as one array parameter, then
Pipeline.sync(). This does the same on a throwaway PostgreSQL, with 6,000 events whose state adds
up to the given number of MiB (an import batch of 500 customers with 10 loans each carries about
4.7 MiB), and reports whether the sync returned within --timeout seconds. A hang is the client
waiting for results while the server (pg_stat_activity: ClientRead) still waits for the rest of the
request. Each size gets a fresh table, so a hung transaction's lock does not block the next size.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from common import machine, revision, say, stamp
from psycopg.types.composite import CompositeInfo, register_composite

from infra.stack import PostgresServer

EVENTS = 6000


def attempt(url: str, table: str, mib: float, timeout: float) -> str:
    """Insert EVENTS events adding up to `mib` MiB in one pipeline; what happened."""
    with psycopg.connect(url, autocommit=True) as setup:
        setup.execute(
            f"CREATE TABLE {table} (id bigserial, originator_id uuid, originator_version bigint, topic text, state bytea)"
        )
    conn = psycopg.connect(url)
    info = CompositeInfo.fetch(conn, "stored_event")
    assert info is not None
    register_composite(info, conn)
    make = info.python_type
    assert make is not None
    size = int(mib * 1024 * 1024 / EVENTS)
    events = [make(uuid.uuid4(), 1, "bench:Event", os.urandom(size)) for _ in range(EVENTS)]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with conn.pipeline() as pipeline, conn.transaction(), conn.cursor() as cur:
                cur.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                cur.execute("NOTIFY bench")
                cur.execute(
                    f"INSERT INTO {table} (originator_id, originator_version, topic, state)"
                    " SELECT * FROM unnest(%s::stored_event[]) RETURNING id",
                    (events,),
                )
                pipeline.sync()
                outcome["rows"] = len(cur.fetchall())
        except Exception as error:
            outcome["error"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"HUNG: no answer after {timeout:.0f} s (left hanging; the server is stopped at the end)"
    conn.close()
    return f"ok in {time.monotonic() - started:.2f} s ({outcome})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=float, default=[1, 2, 4, 4.5, 5], help="MiB of event state per transaction")
    parser.add_argument("--timeout", type=float, default=20)
    args = parser.parse_args()
    server = PostgresServer(fast=True)
    results: list[tuple[float, str]] = []
    try:
        server.start()
        server.create_database()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TYPE stored_event AS (originator_id uuid, originator_version bigint, topic text, state bytea)")
        for n, mib in enumerate(args.sizes):
            say(f"{mib} MiB in one pipeline")
            results.append((mib, attempt(server.url, f"events_{n}", mib, args.timeout)))
            say(results[-1][1])
    finally:
        server.remove()
    print(f"===== pipeline_hang ({stamp()}) =====")
    print(f"machine: {machine()}")
    print(f"commit: {revision()}; psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})")
    for mib, outcome in results:
        print(f"{mib:>6} MiB of event state, {EVENTS} events: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
