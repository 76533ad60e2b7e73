"""Generate lender history files shaped like data/customer_data.xlsx and data/loan_data.xlsx, at any size.

    python bench/generate.py --customers 100000 --loans 1000000 --seed 1 --out /tmp/bench-data

Rows are streamed with openpyxl's write-only mode, one at a time: memory stays flat whatever the
size (the only per-row state kept is one 4-byte customer ID per Loan ID, to pick duplicates). The
output is deterministic for a given (customers, loans, seed).

What the rows look like (the reference files' rules):
- Customer IDs 1..N; phone numbers unique, 10 digits, no leading zero; Approved Limit is
  36 x Monthly Salary rounded to the nearest 100,000.
- Loans go to random customers; Date of Approval and End Date are real Excel dates with
  End Date = approval + Tenure months; EMIs paid on Time <= Tenure; Monthly payment is the EMI
  of amount, rate and tenure rounded to the rupee.
- About 3.7% of loan rows (DUPLICATE_SHARE) reuse an earlier Loan ID for a different customer,
  as 29 of the reference file's 782 rows do.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from array import array
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from common import REPO_ROOT  # noqa: F401 (importing common puts the repository on sys.path)
from openpyxl import Workbook

from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS  # the reference columns, as the import reads them

DUPLICATE_SHARE = 29 / 782  # about 3.7%, as in the reference file
TODAY = date(2026, 11, 22)  # the LEDGER_TODAY the benchmarks run with
FIRST_LOAN_ID = 1000
PHONE_BASE = 6_000_000_000  # phones are 6000000000 + a permutation of the customer index: 10 digits, no leading zero
PHONE_SPAN = 4_000_000_000

FIRST_NAMES = [
    "Aaron",
    "Abbey",
    "Abbie",
    "Aditi",
    "Ajay",
    "Akash",
    "Alan",
    "Alice",
    "Amit",
    "Ananya",
    "Anil",
    "Anita",
    "Arjun",
    "Asha",
    "Ben",
    "Bhavna",
    "Carla",
    "Chen",
    "Deepak",
    "Divya",
    "Elena",
    "Farah",
    "Gita",
    "Hari",
    "Ishaan",
    "Jaya",
    "Karan",
    "Kavya",
    "Leena",
    "Manoj",
    "Meera",
    "Mohan",
    "Nadia",
    "Neha",
    "Nikhil",
    "Omar",
    "Pooja",
    "Priya",
    "Rahul",
    "Ravi",
    "Rohan",
    "Sana",
    "Sanjay",
    "Sara",
    "Shreya",
    "Sunil",
    "Tara",
    "Uma",
    "Varun",
    "Vikram",
    "Yash",
    "Zoya",
]
LAST_NAMES = [
    "Garcia",
    "Gonzalez",
    "Rodrigues",
    "Iyer",
    "Sharma",
    "Patel",
    "Singh",
    "Kumar",
    "Reddy",
    "Nair",
    "Menon",
    "Das",
    "Bose",
    "Gupta",
    "Mehta",
    "Shah",
    "Rao",
    "Joshi",
    "Khan",
    "Verma",
    "Pillai",
    "Chopra",
    "Kapoor",
    "Malhotra",
    "Banerjee",
    "Mukherjee",
    "Fernandes",
    "Dsouza",
    "Smith",
    "Brown",
    "Lee",
    "Wilson",
    "Taylor",
    "Thomas",
]


def add_months(start: date, months: int) -> date:
    """The same day `months` later, clamped to the month's last day (as the ledger's calendar does)."""
    index = start.year * 12 + start.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    for day in (start.day, 30, 29, 28):
        try:
            return date(year, month, day)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def emi(amount: int, annual_rate: float, tenure: int) -> int:
    r = annual_rate / 1200
    growth = (1 + r) ** tenure
    return round(amount * r * growth / (growth - 1))


def months_between(start: date, end: date) -> int:
    return max(0, (end.year - start.year) * 12 + end.month - start.month - (end.day < start.day))


def phone_multiplier(rng: random.Random) -> int:
    """An odd multiplier not divisible by 5: coprime with PHONE_SPAN (2^11 * 5^9), so i -> i*m mod span is a bijection."""
    while True:
        m = rng.randrange(1_000_003, PHONE_SPAN, 2)
        if m % 5:
            return m


def customer_rows(count: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    multiplier = phone_multiplier(rng)
    offset = rng.randrange(PHONE_SPAN)
    for customer_id in range(1, count + 1):
        salary = rng.randrange(15_000, 300_001, 1000)
        limit = int((36 * salary + 50_000) // 100_000 * 100_000)
        yield (
            customer_id,
            rng.choice(FIRST_NAMES),
            rng.choice(LAST_NAMES),
            rng.randint(21, 70),
            PHONE_BASE + (customer_id * multiplier + offset) % PHONE_SPAN,
            salary,
            limit,
        )


def loan_rows(count: int, customers: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    owner = array("I")  # owner[k] = customer of Loan ID FIRST_LOAN_ID + k: the only per-row state
    first_day = date(2010, 1, 1).toordinal()
    last_day = date(2026, 10, 31).toordinal()
    for _ in range(count):
        customer_id = rng.randint(1, customers)
        loan_id = FIRST_LOAN_ID + len(owner)
        if len(owner) > 10 and customers > 1 and rng.random() < DUPLICATE_SHARE:
            for _attempt in range(10):  # an earlier Loan ID that belongs to someone else
                k = rng.randrange(len(owner))
                if owner[k] != customer_id:
                    loan_id = FIRST_LOAN_ID + k
                    break
        if loan_id == FIRST_LOAN_ID + len(owner):
            owner.append(customer_id)
        amount = rng.randrange(1, 11) * 100_000
        tenure = rng.randint(3, 180)
        rate = round(rng.uniform(8.0, 18.0), 2)
        start = date.fromordinal(rng.randint(first_day, last_day))
        end = add_months(start, tenure)
        elapsed = min(tenure, months_between(start, TODAY))
        paid = max(0, elapsed - (rng.randint(0, 3) if rng.random() < 0.3 else 0))
        yield (customer_id, loan_id, amount, tenure, rate, emi(amount, rate, tenure), paid, start, end)


def write(path: Path, columns: tuple[str, ...], rows: Iterator[tuple[object, ...]], total: int, label: str) -> float:
    started = time.monotonic()
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("Sheet1")
    sheet.append(columns)
    step = max(1, total // 10)
    for n, row in enumerate(rows, start=1):
        sheet.append(row)
        if n % step == 0:
            print(f"  {label}: {n}/{total} rows ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    workbook.save(path)
    return time.monotonic() - started


def generate(customers: int, loans: int, seed: int, out: Path) -> tuple[Path, Path]:
    if customers < 2:
        raise SystemExit("--customers must be at least 2")
    out.mkdir(parents=True, exist_ok=True)
    customers_path, loans_path = out / "customer_data.xlsx", out / "loan_data.xlsx"
    started = time.monotonic()
    seconds = write(
        customers_path, CUSTOMER_COLUMNS, customer_rows(customers, random.Random(f"{seed}:customers")), customers, "customers"
    )
    print(f"wrote {customers_path} ({customers} rows) in {seconds:.1f} s", file=sys.stderr)
    seconds = write(loans_path, LOAN_COLUMNS, loan_rows(loans, customers, random.Random(f"{seed}:loans")), loans, "loans")
    print(f"wrote {loans_path} ({loans} rows) in {seconds:.1f} s", file=sys.stderr)
    print(f"generated {customers} customers and {loans} loans in {time.monotonic() - started:.1f} s")
    return customers_path, loans_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--loans", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    generate(args.customers, args.loans, args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
