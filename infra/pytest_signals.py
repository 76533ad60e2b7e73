"""A pytest plugin `make test` loads (`-p infra.pytest_signals`): SIGTERM stops the run as Ctrl-C
does, so the fixtures' teardowns run and stop the servers and processes they started. Without it,
a terminated pytest leaves them running."""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not break off the teardowns
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
