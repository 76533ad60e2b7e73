"""`make test`: throwaway PostgreSQL and Redis (unless configured), then every test.

Stopped by SIGTERM (a `kill`, a `timeout`), it passes the signal on to pytest, waits for pytest's
teardowns, then stops the servers it started: nothing is left running. Ctrl-C reaches pytest
through the terminal; this process waits for it the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from infra.stack import services


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # while the servers start: stop them again
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    with services(fast=True) as (database_url, redis_url):
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
        pytest = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "infra.pytest_signals", *sys.argv[1:]], env=env)

        def pass_on(signum: int, frame: FrameType | None) -> None:
            pytest.send_signal(signum)

        signal.signal(signal.SIGTERM, pass_on)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # pytest has it too, from the terminal (set after the
        # Popen: an ignored signal stays ignored in a child)
        return pytest.wait()


if __name__ == "__main__":
    sys.exit(main())
