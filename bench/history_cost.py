"""What a long history costs: latency for a customer with 1 loan vs a customer with 1,000 loans.

    python bench/history_cost.py                      # 500 sequential requests per endpoint and customer
    python bench/history_cost.py --requests 200 --loans 1000

Starts a throwaway PostgreSQL (fsync off) and Redis and the schema; in this process (the Ledger
application on PostgreSQL, infra.postgres.build_ledger) registers customer A (monthly income 100,000)
with 1 loan and customer B (monthly income 10,000,000) with --loans loans of 10,000 each at 16% over
24 months, every one booked with Ledger.book_loan exactly as POST /create-loan books it (each booking
loads the Customer aggregate, decides on its whole history, saves); the time of each booking is kept,
which gives the write-side cost of a long history too. The read model is caught up in-process
(Projector.catch_up), then `ledger api --workers 2` is started (--api-workers) and each endpoint is called
--requests times per customer (after 20 warm-up calls each) with one httpx2 client, one request at a
time, A and B in turns of 25 timed requests: both customers' requests see the machine as it is at
that moment (the 2-core VM's speed varies from one minute to the next, and A's requests all before
B's made the ratio drift), and each timed request follows one for the same customer (right after one
of B's uncached requests, one of A's takes about twice as long: B's garbage, B's rows in the caches),
so each turn starts with one request that is not timed:

- POST /check-eligibility  (the customer's row; their credit history: ALL their loans, scored in Python)
- GET  /view-loans/{id}     (the customer's row; their current loans: all 1,000 of B's)
- GET  /customers/{id}      (profile and score: the credit history again)

Each API process keeps what it answered for a customer between requests, until the projection's
notice says the customer changed (api/querycache.py), so after the warm-up nothing is read from the
database again: that is the repeated-query cost. `--query-cache-size 0`
(QUERY_CACHE_SIZE=0 for the API) turns the cache off and measures every request reading and
scoring all the loans: the cost of the first query after a change.

Reported: p50 and p99 in milliseconds, the response size, and the ratio B / A.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from common import Stack, machine, percentile, revision, say, stamp


def book_history(stack: Stack, loans: int) -> tuple[int, int, list[float]]:
    """Customers A (1 loan) and B (`loans` loans); the seconds each of B's bookings took."""
    from infra.postgres import build_ledger
    from ledger.policy import LoanRequest
    from projections.projector import Projector

    app, pool = build_ledger(stack.settings)
    try:
        a = app.register_customer("One", "Loan", 40, "5550000001", Decimal(100_000)).customer.customer_id
        booked = app.book_loan(a, LoanRequest(Decimal(50_000), Decimal(14), 12))
        assert booked.response["loan_id"] is not None, booked.response
        b = app.register_customer("Many", "Loans", 40, "5550000002", Decimal(10_000_000)).customer.customer_id
        timings: list[float] = []
        for n in range(loans):
            started = time.perf_counter()
            booked = app.book_loan(b, LoanRequest(Decimal(10_000), Decimal(16), 24))
            timings.append(time.perf_counter() - started)
            if booked.response["loan_id"] is None:
                raise RuntimeError(f"booking {n + 1} for customer {b} was refused: {booked.response['message']}")
            if (n + 1) % 200 == 0:
                say(f"booked {n + 1}/{loans} loans for customer {b} (last booking {timings[-1] * 1000:.1f} ms)")
        with Projector(app, stack.database_url) as projector:
            projector.catch_up()
    finally:
        pool.close()
        app.close()
    return a, b, timings


TURN = 25  # requests for one customer before the next customer's turn


def measure(
    client: Any,
    method: str,
    path: Callable[[int], str],
    body: Callable[[int], dict[str, Any] | None],
    customers: tuple[int, ...],
    requests: int,
) -> dict[int, tuple[list[float], int]]:
    """For each customer, the milliseconds of `requests` calls, taken in turns of TURN with the
    other customers' (after 20 warm-up calls each, and one more at the start of each turn); and
    the response size."""
    for customer in customers:
        for _ in range(20):
            client.request(method, path(customer), json=body(customer)).raise_for_status()
    timings: dict[int, list[float]] = {customer: [] for customer in customers}
    sizes = dict.fromkeys(customers, 0)
    for turn in range(0, requests, TURN):
        for customer in customers:
            # Not timed: the first request of a turn pays for the other customer's (their garbage).
            client.request(method, path(customer), json=body(customer)).raise_for_status()
            for _ in range(min(TURN, requests - turn)):
                started = time.perf_counter()
                response = client.request(method, path(customer), json=body(customer))
                timings[customer].append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                sizes[customer] = len(response.content)
    return {customer: (timings[customer], sizes[customer]) for customer in customers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--loans", type=int, default=1000, help="loans of the long-history customer")
    parser.add_argument(
        "--api-workers",
        type=int,
        default=2,
        help="uvicorn processes (`ledger api --workers`); before 1f339f0, 2 or more added ~40 ms to every answer",
    )
    parser.add_argument(
        "--query-cache-size", type=int, help="QUERY_CACHE_SIZE for the API (default: its own, 20000; 0 turns the cache off)"
    )
    args = parser.parse_args()
    import httpx2

    api_env = {} if args.query_cache_size is None else {"QUERY_CACHE_SIZE": str(args.query_cache_size)}

    with Stack() as stack:
        say(f"booking 1 loan for customer A and {args.loans} for customer B, in-process")
        a, b, bookings = book_history(stack, args.loans)
        base = stack.start_api(workers=args.api_workers, env=api_env)
        endpoints: list[tuple[str, str, Callable[[int], str], Callable[[int], dict[str, Any] | None]]] = [
            (
                "POST /check-eligibility",
                "POST",
                lambda c: "/check-eligibility",
                lambda c: {"customer_id": c, "loan_amount": 10000, "interest_rate": 16, "tenure": 24},
            ),
            ("GET /view-loans/{id}", "GET", lambda c: f"/view-loans/{c}", lambda c: None),
            ("GET /customers/{id}", "GET", lambda c: f"/customers/{c}", lambda c: None),
        ]
        rows = []
        with httpx2.Client(base_url=base, timeout=30) as client:
            for name, method, path, body in endpoints:
                say(f"{name}: {args.requests} sequential requests for each of customers {a} and {b}, in turns of {TURN}")
                figures = measure(client, method, path, body, (a, b), args.requests)
                rows.append((name, figures[a], figures[b]))

    first, last = bookings[:50], bookings[-50:]
    print(f"===== history_cost ({stamp()}) =====")
    print(f"machine: {machine()}")
    print(f"commit: {revision()}")
    print(f"command: python bench/history_cost.py {' '.join(sys.argv[1:])}")
    print(
        f"customer A ({a}): 1 loan; customer B ({b}): {args.loans} loans; {args.requests} sequential requests each, A and B in turns of {TURN}, httpx2, "
        f"ledger api --workers {args.api_workers}, QUERY_CACHE_SIZE={api_env.get('QUERY_CACHE_SIZE', 'default (20000)')}, "
        "PostgreSQL fsync=off"
    )
    print(
        f"{'endpoint':<26} {'A p50':>8} {'A p99':>8} {'B p50':>8} {'B p99':>8} {'p50 B/A':>8} {'p99 B/A':>8} {'A bytes':>8} {'B bytes':>8}"
    )
    for name, (ta, size_a), (tb, size_b) in rows:
        a50, a99, b50, b99 = percentile(ta, 0.5), percentile(ta, 0.99), percentile(tb, 0.5), percentile(tb, 0.99)
        print(
            f"{name:<26} {a50:>8.2f} {a99:>8.2f} {b50:>8.2f} {b99:>8.2f} {b50 / a50:>8.1f} {b99 / a99:>8.1f} {size_a:>8} {size_b:>8}"
        )
    print(
        f"in-process Ledger.book_loan for B (write side): loans 1-50 p50 {percentile(first, 0.5) * 1000:.1f} ms, "
        f"loans {len(bookings) - 49}-{len(bookings)} p50 {percentile(last, 0.5) * 1000:.1f} ms "
        f"(p99 {percentile(last, 0.99) * 1000:.1f} ms); all {len(bookings)} in {sum(bookings):.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
