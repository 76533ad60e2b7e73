"""`ledger run`'s watchdog: a process of its own that stops what `ledger run` started should
`ledger run` end without doing it. SIGKILL (the OOM killer, `kill -9`, an IDE's stop button)
runs no handler: its services and its throwaway PostgreSQL and Redis went on running, their data
left behind (a review).

`ledger run` starts it first and tells it, a line on its standard input each, what it starts:
`group <pgid>` (a service, or Redis, in a process group of its own), `postgres <workdir>` (a
throwaway cluster), `remove <directory>` (Redis's), and `done` once it has stopped them itself.
When its input ends (the pipe's only writer, `ledger run`, has exited) without `done`, it stops
the groups, the last started first (SIGTERM, then SIGKILL after the grace period), stops each
cluster, and deletes the clusters' and the other directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

GRACE_SECONDS = 20.0


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):  # gone; or another user's group now: not ours
        return False
    return True


def _signal(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def clean_up(groups: list[int], clusters: list[Path], directories: list[Path], grace: float = GRACE_SECONDS) -> None:
    """Stop the process groups, the last started first (the API, beat, the worker, then Redis, as
    `ledger run` stops them: a worker stopped after Redis waits for it), each given `grace`
    seconds before SIGKILL; then the clusters; then delete their and the other directories."""
    from infra.stack import stop_cluster

    for group in reversed(groups):
        _signal(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal(group, signal.SIGKILL)
    for workdir in clusters:
        stop_cluster(workdir, "immediate", quiet=True)
        shutil.rmtree(workdir, ignore_errors=True)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    # The terminal's Ctrl-C and hang-up are `ledger run`'s to act on, not this process's.
    for ignored in (signal.SIGINT, signal.SIGHUP):
        signal.signal(ignored, signal.SIG_IGN)
    groups: list[int] = []
    clusters: list[Path] = []
    directories: list[Path] = []
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "done":
            return 0
        if kind == "group":
            groups.append(int(value))
        elif kind == "postgres":
            clusters.append(Path(value))
        elif kind == "remove":
            directories.append(Path(value))
    with contextlib.suppress(OSError):  # the terminal may be gone
        print("ledger run ended without stopping what it started (killed?): its watchdog stops it", file=sys.stderr, flush=True)
    clean_up(groups, clusters, directories)
    return 0


if __name__ == "__main__":
    sys.exit(main())
