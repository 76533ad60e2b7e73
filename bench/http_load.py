"""HTTP throughput and latency under load, with wrk, on the reference data.

    python bench/http_load.py                       # 10 s per endpoint (the default)
    python bench/http_load.py --duration 5          # quicker

Starts a throwaway PostgreSQL (fsync off) and Redis, the schema, one `ledger worker --concurrency 2`
and `ledger api --workers 2` (uvicorn, 2 processes; --api-workers changes it), imports data/customer_data.xlsx and
data/loan_data.xlsx through the worker (infra.cli.start_import) and waits for the read model. Then,
one after the other, `wrk --latency` with the Lua scripts in bench/wrk/:

- POST /check-eligibility  random customer 1..300, 100,000 at 12% over 12 months   (32 connections)
- GET  /view-loans/{id}     random customer 1..300                                   (32 connections)
- GET  /view-loan/{id}      random loan from readmodel.loans (embedded in the script) (32 connections)
- POST /create-loan         a different fresh customer per request                   (8 connections)

Each read endpoint runs --warm-up seconds (default 3) unreported just before it is measured.

For create-loan, fresh customers (monthly income 500,000, so a first loan is approved) are registered
first through POST /register; each create-loan answers once the read model shows the loan
(read-your-writes), so its latency includes the projection round trip through Redis and the worker.

Everything (wrk, the API, the worker, PostgreSQL, Redis) shares this machine's CPUs: the figures are
for the whole system on one box, not for the API alone.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import REPO_ROOT, Stack, machine, revision, say, stamp

WRK_DIR = Path(__file__).resolve().parent / "wrk"
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class WrkResult:
    name: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str
    extra: str


def ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_wrk(name: str, connections: int, output: str) -> WrkResult:
    def find(pattern: str, default: str | None = None) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match:
            return match.group(1)
        if default is None:
            raise ValueError(f"wrk output has no {pattern!r}:\n{output}")
        return default

    requests, seconds = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.MULTILINE).groups()  # type: ignore[union-attr]
    extra = "\n".join(line for line in output.splitlines() if line.startswith("create-loan requests"))
    return WrkResult(
        name=name,
        connections=connections,
        requests=int(requests),
        seconds=ms(seconds) / 1000,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")),
        p50_ms=ms(find(r"^\s+50%\s+(\S+)")),
        p99_ms=ms(find(r"^\s+99%\s+(\S+)")),
        non_2xx=int(find(r"Non-2xx or 3xx responses: (\d+)", "0")),
        socket_errors=find(r"Socket errors: (.*)$", "none"),
        extra=extra,
    )


def lua_list(values: list[int]) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def script(workdir: Path, name: str, seed: int, threads: int, **lists: list[int]) -> Path:
    """bench/wrk/<name>.lua with the seed, the thread count and any ID lists prepended, and common.lua."""
    header = [f"BENCH_SEED = {seed}", f"THREADS = {threads}"]
    header += [f"{key} = {lua_list(values)}" for key, values in lists.items()]
    text = "\n".join(header) + "\n" + (WRK_DIR / "common.lua").read_text() + "\n" + (WRK_DIR / f"{name}.lua").read_text()
    path = workdir / f"{name}.lua"
    path.write_text(text)
    return path


def wrk(base: str, lua: Path, name: str, connections: int, threads: int, duration: int) -> WrkResult:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(lua), base]
    say(" ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=True)
    print(done.stdout, file=sys.stderr)
    return parse_wrk(name, connections, done.stdout)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    say("wrk is missing: installing it with apt-get")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def register_fresh(base: str, count: int, concurrency: int = 16) -> list[int]:
    """Register `count` customers through POST /register (unique phones, income 500,000); their IDs."""
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx2.Client(base_url=base, timeout=30, limits=limits) as client:

        def one(i: int) -> int:
            body = {
                "first_name": "Bench",
                "last_name": f"Customer{i}",
                "age": 35,
                "monthly_income": 500000,
                "phone_number": 5_550_000_000 + i,
            }
            response = client.post("/register", json=body)
            response.raise_for_status()
            return int(response.json()["customer_id"])

        with ThreadPoolExecutor(concurrency) as pool:
            return sorted(pool.map(one, range(count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per endpoint")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--create-connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--warm-up", type=int, default=3, help="seconds of each read endpoint before it is measured")
    parser.add_argument(
        "--fresh-customers",
        type=int,
        default=12000,
        help="customers registered for create-loan (more than a run books: 10 s at 1,200 req/s)",
    )
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn processes (`ledger api --workers`)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ensure_wrk()

    workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-wrk-"))
    try:
        with Stack() as stack:
            stack.start_worker(concurrency=2)
            base = stack.start_api(workers=args.api_workers)
            data = REPO_ROOT / "data"
            say("importing the reference data")
            job = stack.import_and_wait(data / "customer_data.xlsx", data / "loan_data.xlsx")
            summary = job["summary"]
            say(f"imported {summary['customers_imported']} customers and {summary['loans_imported']} loans")
            with stack.connect() as conn:
                loan_ids = [int(r[0]) for r in conn.execute("SELECT loan_id FROM readmodel.loans ORDER BY loan_id")]
            say(f"registering {args.fresh_customers} fresh customers for create-loan")
            started = time.monotonic()
            fresh = register_fresh(base, args.fresh_customers)
            say(f"registered {len(fresh)} customers in {time.monotonic() - started:.1f} s (16 at a time)")

            t, c = args.threads, args.connections
            reads = [
                (script(workdir, "check_eligibility", args.seed, t), "POST /check-eligibility"),
                (script(workdir, "view_loans", args.seed, t), "GET /view-loans/{customer}"),
                (script(workdir, "view_loan", args.seed, t, LOAN_IDS=loan_ids), "GET /view-loan/{loan}"),
            ]
            results = []
            for lua, name in reads:
                # Steady state: each endpoint's first seconds (pool connections, prepared statements,
                # the query cache, autovacuum after the registrations) are not what is measured.
                say(f"warming up {name} ({args.warm_up} s, not reported)")
                wrk(base, lua, "warm-up", c, t, args.warm_up)
                results.append(wrk(base, lua, name, c, t, args.duration))
            booked_before = int(stack.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'booked'"))
            create = wrk(
                base,
                script(workdir, "create_loan", args.seed, t, CUSTOMER_IDS=fresh),
                "POST /create-loan",
                args.create_connections,
                t,
                args.duration,
            )
            results.append(create)
            stack.wait_caught_up()
            booked = int(stack.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'booked'")) - booked_before
            events = stack.events()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"===== http_load ({stamp()}) =====")
    print(f"machine: {machine()}")
    print(f"commit: {revision()}")
    print(f"command: python bench/http_load.py {' '.join(sys.argv[1:])}")
    print(
        f"stack: ledger api --workers {args.api_workers}, 1 ledger worker --concurrency 2, PostgreSQL fsync=off, Redis; wrk -t{args.threads} --latency, {args.duration} s each"
    )
    print(f"{'endpoint':<28} {'conns':>5} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}  socket errors")
    for r in results:
        print(
            f"{r.name:<28} {r.connections:>5} {r.requests:>9} {r.rps:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.non_2xx:>8}  {r.socket_errors}"
        )
    print(
        f"create-loan: {create.requests} requests, {booked} loans booked (read model), {len(fresh)} fresh customers; {create.extra or 'no customer reused'}"
    )
    print(f"events in the store at the end: {events}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
