#!/usr/bin/env bash
# The quick version of every benchmark, one after the other (what `make bench` calls).
# Each one starts its own throwaway PostgreSQL and Redis and stops everything it started.
# Figures are printed, never asserted. About 4 to 6 minutes on a 2-core machine. Set BENCH_OUT to choose the
# folder for the generated files and the result blocks.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${BENCH_OUT:-$(mktemp -d /tmp/ledger-bench-out-XXXXXX)}"
DATA="$OUT/data"
mkdir -p "$OUT"
echo "bench: results in $OUT" >&2

run() {
    local name=$1
    shift
    echo "bench: $name: $*" >&2
    "$@" | tee "$OUT/$name.txt"
}

run generate "$PYTHON" bench/generate.py --customers 10000 --loans 100000 --seed 1 --out "$DATA"
run import_scale "$PYTHON" bench/import_scale.py --data "$DATA" --max-seconds 900
run rebuild "$PYTHON" bench/rebuild.py --data "$DATA" --repeat 2
run http_load "$PYTHON" bench/http_load.py --duration 10
run history_cost "$PYTHON" bench/history_cost.py --requests 500 --loans 1000
run history_cost_uncached "$PYTHON" bench/history_cost.py --requests 500 --loans 1000 --query-cache-size 0

echo "bench: done; every result block is in $OUT" >&2
