"""Structured logs: one JSON object per line, from the API and the workers alike."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import msgspec

# Fields every record has, and uvicorn's `color_message`: its message again, with terminal colour codes.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def say_as_json(logger: str, level: int = logging.WARNING) -> Any:
    """A stand-in for Celery's `safe_say` (its worker's "worker: Warm shutdown (MainProcess)" and
    the like, written from signal handlers in plain text beside the JSON lines): the same line as
    JSON, written with one `os.write` as Celery's own is, not through logging's locks."""

    def say(msg: str, f: Any = None) -> None:
        record = logging.makeLogRecord(
            {"name": logger, "levelno": level, "levelname": logging.getLevelName(level), "msg": msg.strip()}
        )
        with contextlib.suppress(OSError):
            os.write(2, (JsonFormatter().format(record) + "\n").encode())

    return say


REPEAT_SECONDS = 60.0  # a warning or error like one already logged is logged again after this long


class Repeats(logging.Filter):
    """Drops a warning or error that repeats one logged in the last REPEAT_SECONDS: the same
    logger, message and arguments (but a Celery task's ID), the same exception and message. The next
    one logged after that says how many were dropped (`repeated`). While PostgreSQL or Redis was
    down, the API's listener logged its reconnection twice a second in each process, beat a
    15 KB traceback every 5 s, and the worker one for every periodic catch-up (a review). A
    different error (another service, path, job or exception) is not a repeat."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}  # key -> (when logged, dropped since)
        self._lock = threading.Lock()  # a handler's filters run outside its lock

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        args = record.args
        if isinstance(args, dict):  # Celery's trace: {"name": task, "id": its ID, "exc": the error, ...}
            shown: tuple[object, ...] = tuple((k, str(v)) for k, v in sorted(args.items()) if k != "id")
        else:
            shown = tuple(map(str, args or ()))
        error = (type(record.exc_info[1]).__name__, str(record.exc_info[1])[:500]) if record.exc_info else None
        key = (record.name, record.levelno, str(record.msg), shown, error)
        with self._lock:
            logged, dropped = self._seen.get(key, (0.0, 0))
            if record.created - logged < REPEAT_SECONDS:
                self._seen[key] = (logged, dropped + 1)
                return False
            if dropped:
                record.repeated = dropped  # like this one, not logged since the last that was
            if len(self._seen) > 1000:  # a bound, whatever the arguments
                self._seen.clear()
            self._seen[key] = (record.created, 0)
        return True


ROUTINE_TASKS = frozenset({"workers.tasks.catch_up", "workers.tasks.resume_imports"})


class RoutineTasks(logging.Filter):
    """Drops Celery's INFO lines about the periodic tasks: each catch-up (every
    PROJECTION_POLL_SECONDS from beat, and after commands) wrote three, beat's "Sending due task"
    and the worker's "received" and "succeeded". Their warnings and errors still show, and so
    does every line about an import or a rebuild (received, retry, succeeded, failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        args = record.args  # Celery's worker: a dict with the task's name; beat: (entry, task name)
        names = [args.get("name")] if isinstance(args, dict) else list(args or ())
        return not any(isinstance(name, str) and name in ROUTINE_TASKS for name in names)


def configure_logging(level: int = logging.INFO) -> None:
    """Route every logger (uvicorn's and Celery's included) through one JSON handler on stderr, at
    `level` (the servers pass their settings' LOG_LEVEL)."""
    # The JSON lines carry none of the caller's file, line, thread or process: skip gathering them
    # (the logging HOWTO's "Optimization" section), a visible share of a small request's cost.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "celery", "celery.task", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for name in ("celery.beat", "celery.worker.strategy", "celery.app.trace"):
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, RoutineTasks)]
        logger.addFilter(RoutineTasks())
    # The API logs every request itself (`ledger.access`, with its request ID and duration): with
    # no handler, uvicorn skips its own access line, which said the same again at the same cost.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
