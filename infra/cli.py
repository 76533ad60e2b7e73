"""`ledger`: the operator's command line (setup, import, rebuild, status, run)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from infra.config import REPO_ROOT, RUN_NOTED_ROOT, ConfigError, Settings
from infra.logs import configure_logging
from infra.postgres import build_ledger, connect, exclusive, setup_schema


def bar(done: int, total: int, label: str, width: int = 30, *, finished: bool = False) -> None:
    """A progress bar on stderr. A total not yet known (0: a job still queued) shows an empty
    bar until the work is `finished`."""
    share = done / total if total else float(finished)
    filled = int(width * share)
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


class Progress:
    """Progress on stderr: a `bar` redrawn in place on a terminal of its own. In a file or a pipe
    the redrawn copies pile up on one line, and on a terminal that other processes write to
    (`ledger run`'s, where the worker logs) their lines ran into the bar: there it prints whole
    lines instead, when the label changes, when the work is done, and at most every
    LINE_SECONDS in between; nothing for the `finished` state, whose outcome the caller prints."""

    LINE_SECONDS = 5.0

    def __init__(self, *, in_place: bool | None = None) -> None:
        self.in_place = sys.stderr.isatty() if in_place is None else in_place
        self._drawn = False  # a bar is on the current line
        self._said: tuple[str, int, int] | None = None
        self._said_at = 0.0

    def __call__(self, done: int, total: int, label: str, *, finished: bool = False) -> None:
        if self.in_place:
            bar(done, total, label, finished=finished)
            self._drawn = True
            return
        said, now = (label, done, total), time.monotonic()
        if finished or said == self._said:
            return
        if self._said is None or label != self._said[0] or 0 < total <= done or now - self._said_at >= self.LINE_SECONDS:
            print(f"{label.rstrip()}: {done}/{total}" if total else label.rstrip(), file=sys.stderr, flush=True)
            self._said, self._said_at = said, now

    def end(self) -> None:
        """End the bar's line, so that what is printed next starts a line of its own."""
        if self._drawn:
            print(file=sys.stderr, flush=True)
            self._drawn = False


def _job_row(settings: Settings, job_id: UUID) -> dict[str, Any] | None:
    with connect(settings) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM readmodel.import_jobs WHERE job_id = %s", (job_id,))
        return cur.fetchone()


class QueueUnavailable(RuntimeError):
    """An import job recorded but not queued (it is failed, as POST /imports fails it)."""


def start_import(settings: Settings, customers: Path, loans: Path) -> UUID:
    from workers import tasks

    ledger, pool = build_ledger(settings)
    try:
        job_id, _ = ledger.request_import(str(customers.resolve()), str(loans.resolve()))
        try:
            tasks.queue_import(str(job_id), str(customers.resolve()), str(loans.resolve()))
        except Exception as error:
            # Else a worker's periodic resumption would run it minutes later, unannounced.
            ledger.fail_import(job_id, "the job could not be queued: Redis is unreachable")
            raise QueueUnavailable(
                f"import job {job_id} could not be queued, so it is marked failed: cannot reach Redis at"
                f" {redacted(settings.redis_url)} ({error}); check REDIS_URL, then import again"
            ) from error
    finally:
        pool.close()
        ledger.close()
    tasks.trigger_catch_up()
    return job_id


QUEUED_HINT_SECONDS = 30


class StillRunning(Exception):
    """`ledger import` stopped following a job that had not finished."""


OUTAGE_GRACE_SECONDS = 120


def follow_import(settings: Settings, job_id: UUID, timeout: float = 3600, progress: Progress | None = None) -> dict[str, Any]:
    """Show the job's progress until it finishes; return its final row. The job runs in a worker,
    which resumes it after a database outage: a PostgreSQL that stops answering for a while (a
    restart, a failover) is waited for, for up to OUTAGE_GRACE_SECONDS at a time."""
    progress = progress or Progress()
    started = time.monotonic()
    deadline, hinted = started + timeout, False
    away_since: float | None = None
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            row = _job_row(settings, job_id)
        except psycopg.OperationalError as error:
            if not _database_away(error):  # a server that answered with an error (a lock timeout, say)
                raise
            now = time.monotonic()
            if away_since is None:
                away_since = now
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                progress.end()
                print(
                    f"PostgreSQL is not answering ({first_line}): the import resumes in the worker once it is"
                    f" back; waiting up to {OUTAGE_GRACE_SECONDS} s",
                    file=sys.stderr,
                )
            if now - away_since > OUTAGE_GRACE_SECONDS:
                print(
                    f"import job {job_id} goes on in the worker once PostgreSQL is back: `ledger import-report {job_id}`",
                    file=sys.stderr,
                )
                raise
            time.sleep(1)
            continue
        if away_since is not None:
            away_since = None
            print("PostgreSQL answers again", file=sys.stderr)
        if not hinted and time.monotonic() - started > QUEUED_HINT_SECONDS and (row is None or row["state"] == "queued"):
            hinted = True
            progress.end()
            print(
                f"still queued after {QUEUED_HINT_SECONDS} s: is a worker running (`ledger worker`) on this"
                " Redis? It waits for the import before it, if one runs.",
                file=sys.stderr,
            )
        if row is not None:
            finished = row["state"] in ("completed", "failed")
            progress(row["rows_done"], row["total_rows"], f"import {row['state']:<9}", finished=finished)
            if finished:
                progress.end()
                return row
        time.sleep(0.3)
    raise StillRunning(
        f"import job {job_id} is still {row['state'] if row else 'queued'} after {timeout:.0f} s; it goes on in the"
        f" worker: `ledger import-report {job_id}`"
    )


def _database_away(error: psycopg.OperationalError) -> bool:
    """An outage (no answer, the connection lost, the server shutting down or starting up), not an
    error the server answered with."""
    state = error.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def print_report(row: dict[str, Any]) -> None:
    """The job's outcome and its rejected rows, on standard output (progress goes to standard error)."""
    summary = row["summary"]
    if row["state"] == "failed":
        print(f"import failed: {summary.get('error')}", flush=True)
        return
    print(
        f"import completed: {summary['customers_imported']} customers and {summary['loans_imported']} loans imported, "
        f"{summary['customers_already_present']} customers and {summary['loans_already_present']} loans already present, "
        f"{len(summary.get('rekeyed_customers', []))} customers and {len(summary['rekeyed_loans'])} loans given new IDs"
        f" (their file IDs were taken), {len(row['issues'])} rows rejected"
    )
    files = list(dict.fromkeys(issue["file"] for issue in row["issues"]))  # in the order they were met
    for issue in sorted(row["issues"], key=lambda issue: (files.index(issue["file"]), issue["row"])):
        print(f"  {issue['file']} row {issue['row']}: {issue['reason']}")
    sys.stdout.flush()  # before what `ledger run` prints next to standard error


def cmd_setup(args: argparse.Namespace) -> int:
    setup_schema(Settings.from_env())
    print("schema ready", file=sys.stderr)
    return 0


def _reference_files(settings: Settings) -> tuple[Path, Path]:
    """The files an import reads by default: the two in IMPORT_DIR."""
    return settings.import_dir / "customer_data.xlsx", settings.import_dir / "loan_data.xlsx"


def _files(settings: Settings, args: argparse.Namespace) -> tuple[Path, Path]:
    customers, loans = _reference_files(settings)
    return Path(args.customers) if args.customers else customers, Path(args.loans) if args.loans else loans


def _readable(*paths: Path, hint: str = "", given: tuple[bool, ...] = ()) -> None:
    """Files an import is about to read, checked before anything starts: a missing one is named
    with its whole path (the job's own report names files only), with `hint` unless the file was
    `given` on the command line (then IMPORT_DIR has nothing to do with it)."""
    for n, path in enumerate(paths):
        if not path.is_file():
            what = f"{path} is a directory, not a file" if path.is_dir() else f"no file {path}"
            explicit = n < len(given) and given[n]
            raise ConfigError(what + (f" ({hint})" if hint and not explicit else ""))


_IMPORT_DIR_HINT = "set IMPORT_DIR to the directory that holds customer_data.xlsx and loan_data.xlsx"


def cmd_import(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    files = _files(settings, args)
    _readable(*files, hint=_IMPORT_DIR_HINT, given=(bool(args.customers), bool(args.loans)))
    job_id = start_import(settings, *files)
    print(f"import job {job_id} queued", file=sys.stderr)
    try:
        row = follow_import(settings, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following import job {job_id}; it goes on in the worker: `ledger import-report {job_id}`",
            file=sys.stderr,
        )
        return 130
    print_report(row)
    return 0 if row["state"] == "completed" else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    from projections.projector import rebuild

    settings = Settings.from_env()
    ledger, pool = build_ledger(settings)
    replayed, last = False, 0
    shown = Progress()

    def progress(done: int, total: int) -> None:  # positions in the log, not events: see the last line
        nonlocal replayed, last
        last = total
        shown(done, total, "rebuild")
        if done >= total and not replayed:
            # What follows the last page (the indexes, unless a page needed them earlier, and the
            # swap) takes a second or more on a large store: say so rather than sit on a full bar.
            replayed = True
            shown.end()
            print("every event replayed: finishing the new tables and swapping them in", file=sys.stderr, flush=True)

    try:
        applied = rebuild(ledger, settings.database_url, progress)
    finally:
        pool.close()
        ledger.close()
    shown.end()  # an empty store: the bar never filled
    # A rolled-back insert leaves its positions unused: the bar, over positions, may end above the events.
    where = f", to position {last}" if last != applied else ""
    print(f"read model rebuilt from {applied} events{where}", file=sys.stderr)
    return 0


def _job_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a job ID (a UUID such as b5e7d356-e33a-446d-a371-c3e7cfd925e9): {text!r}"
        ) from None


def cmd_import_report(args: argparse.Namespace) -> int:
    row = _job_row(Settings.from_env(), args.job_id)
    if row is None:
        print(f"no import job {args.job_id}", file=sys.stderr)
        return 1
    print(f"import {row['job_id']}: {row['state']}, {row['rows_done']}/{row['total_rows']} rows")
    if row["state"] in ("completed", "failed"):
        print_report(row)
    return 1 if row["state"] == "failed" else 0  # as `ledger import` ends for the same job


def cmd_status(args: argparse.Namespace) -> int:
    last, position = _positions(Settings.from_env())
    # Positions are notification IDs, which a rolled-back insert can skip: the lag is at most this many events.
    print(f"last event position: {last}\nread model position: {position}\nlag: {last - position} events")
    return 0


def _positions(settings: Settings) -> tuple[int, int]:
    """The last event's position and the read model's. Raises what `explain` names when
    PostgreSQL cannot be reached or has no ledger schema."""
    from ledger.application import Ledger
    from projections.projector import events_table

    table = events_table(Ledger)  # the application's name, a class attribute: no need to build one
    with connect(settings) as conn:
        # Both positions in one statement, so from one moment: read one after the other, a page the
        # projection committed in between put the read model past the last event (a negative lag).
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT max(notification_id) FROM {}),"
                " (SELECT position FROM readmodel.tracking WHERE projection = 'ledger')"
            ).format(sql.Identifier(table))
        ).fetchone()
    last, position = (int(value or 0) for value in row or (0, 0))
    return last, position


def _database_ready(settings: Settings) -> None:
    """Before a server starts: PostgreSQL answers and holds the ledger's schema, or the command
    stops with what `explain` says (exit 1). `ledger api` on a database never set up served 500s
    to every request; on an unreachable one it exited 3 after a traceback; `ledger worker` ran on
    without one (a review)."""
    _positions(settings)


def cmd_init(args: argparse.Namespace) -> int:
    """Schema, then the bundled history imported in this process, then the read model caught up.

    Idempotent: a second run finds every customer and loan in place and adds none (it records one
    more import job, which reports them already present).
    """
    from infra.importer import run_import
    from projections.projector import Projector

    settings = Settings.from_env()
    customers, loans = _reference_files(settings)
    if not args.no_import:
        _readable(customers, loans, hint=f"{_IMPORT_DIR_HINT}, or use --no-import")
    setup_schema(settings)
    ledger, pool = build_ledger(settings)
    shown = Progress()
    try:
        if not args.no_import:
            job_id, _ = ledger.request_import(str(customers), str(loans))
            with exclusive(settings, wait=True), Projector(ledger, settings.database_url) as projector:
                result = run_import(
                    ledger,
                    job_id,
                    customers,
                    loans,
                    settings.import_batch_size,
                    lambda d, t: shown(d, t, "import"),
                    settle=lambda: projector.catch_up(wait=True),
                    split_size=settings.import_split_size,
                )
            shown.end()
            if result["state"] != "completed":
                print(f"import failed: {result.get('error')}", file=sys.stderr)
                return 1
            rejected = result["rows_rejected"]
            print(
                f"import: {result['customers_imported']} customers and {result['loans_imported']} loans added, "
                f"{result['customers_already_present']} and {result['loans_already_present']} already present, "
                f"{rejected} rows rejected" + (f" (each with its reason: `ledger import-report {job_id}`)" if rejected else ""),
                file=sys.stderr,
            )
        with Projector(ledger, settings.database_url) as projector:
            projector.catch_up(lambda d, t: shown(d, t, "projection"))
        shown.end()
        print("ready", file=sys.stderr)
    finally:
        pool.close()
        ledger.close()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.from_env()
    _database_ready(settings)
    # Metrics from every uvicorn process are summed through files in one directory; one made
    # here is removed when the server stops (uvicorn runs in this process for that reason).
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ledger-metrics-")
    # The workers share the highest projection position any of them has seen (api.readyourwrites).
    shared = tempfile.mkdtemp(prefix="ledger-api-")
    os.environ["LEDGER_API_POSITION_FILE"] = position_file = os.path.join(shared, "position")
    Path(position_file).write_bytes(bytes(8))  # api.readyourwrites.SharedPosition: position 0
    # uvicorn stops gracefully on SIGTERM, then raises it again: leave through the `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options: dict[str, Any] = {
        "factory": True,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "timeout_graceful_shutdown": 20,
        "access_log": False,
        # uvloop sets TCP_NODELAY on every connection; asyncio's default loop does not on the
        # socket uvicorn binds for several workers, and each keep-alive answer then waits ~40 ms.
        "loop": "uvloop",
        "http": "api.server:JsonErrorsProtocol",  # httptools, answering unparsable requests in JSON
        # uvicorn's own lines (the supervisor's "Uvicorn running on", "Started parent process") in
        # the JSON the API's processes log, not in uvicorn's plain format beside them.
        "log_config": None,
    }
    configure_logging(settings.log_level)
    try:
        if args.workers == 1:
            uvicorn.run("api.app:app_from_env", **options)  # exits 3 when the app cannot start
            return 0
        # uvicorn.run's supervisor returns normally when its processes cannot start (the database
        # unreachable, say), and the command would exit 0: a process manager must see the failure.
        from uvicorn.config import STARTUP_FAILURE, Config
        from uvicorn.supervisors import Multiprocess

        config = Config("api.app:app_from_env", **options)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        return STARTUP_FAILURE if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes) else 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def cmd_worker(args: argparse.Namespace) -> int:
    _database_ready(Settings.from_env())
    # Celery's warm shutdown on SIGTERM finishes running tasks; acks_late redelivers the rest.
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "--quiet",  # no banner: every line the worker writes is JSON
            "worker",
            "--loglevel=INFO",
            f"--concurrency={args.concurrency}",
        ],
    )


def cmd_beat(args: argparse.Namespace) -> int:
    # The in-memory scheduler: the schedules are intervals, so there is nothing worth keeping
    # between runs, and the default one leaves a shelve file behind at every start.
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "--quiet",
            "beat",
            "--loglevel=INFO",
            "--scheduler",
            "celery.beat:Scheduler",
        ],
    )


class Watchdog:
    """`ledger run`'s watchdog (infra.watchdog), in a process group of its own: told of each
    service and throwaway server as it starts, it stops them should `ledger run` end without
    doing it (SIGKILL runs no handler)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "infra.watchdog"], stdin=subprocess.PIPE, cwd=REPO_ROOT, process_group=0
        )

    def note(self, kind: str, value: str) -> None:
        """Best effort: a watchdog that died (killed on its own) must not stop `ledger run`, nor
        leave a service it was being told of unstopped (a review)."""
        assert self._process.stdin is not None
        with contextlib.suppress(OSError, ValueError):  # a broken pipe; a pipe closed by done()
            self._process.stdin.write(f"{kind} {value}\n".encode())
            self._process.stdin.flush()

    def watched(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.note("group", str(process.pid))  # `_spawn` makes each its own group
        return process

    def done(self) -> None:
        """Everything stopped: the watchdog has nothing to do, and ends."""
        self.note("done", "")
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(5)


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A service of `ledger run`, in a process group of its own: a terminal's Ctrl-C or hangup
    reaches `ledger run` alone, which stops its services in order. Sent to them as well, a
    hangup made uvicorn and the Celery worker restart rather than stop (a review)."""
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, process_group=0)


def stop_services(processes: list[subprocess.Popen[bytes]], grace: float = 20.0, hurry: threading.Event | None = None) -> None:
    """SIGTERM to each (the last started first) and `grace` seconds for each to end; then SIGKILL
    to one that did not, and to every process it started. Killed alone, a hung `ledger api` left
    its uvicorn processes running (a review). Once `hurry` is set (a second Ctrl-C), it waits no
    more."""
    hurry = hurry or threading.Event()
    for process in reversed(processes):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for process in processes:
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline and not hurry.is_set():
            time.sleep(0.05)
        if process.poll() is None:
            for pid in [process.pid, *_descendants(process.pid)]:  # found first: once it dies its children are init's
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and the ones they started (from /proc; none without it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stopped(configured: set[str]) -> str:
    """What `ledger run` says as it ends, once its services had started."""
    gone = [name for name, env in (("PostgreSQL", "DATABASE_URL"), ("Redis", "REDIS_URL")) if env not in configured]
    deleted = f"; the throwaway {' and '.join(gone)} stopped, {'their' if len(gone) > 1 else 'its'} data deleted"
    return f"ledger run: everything it started has stopped{deleted if gone else ''}"


def cmd_run(args: argparse.Namespace) -> int:
    from infra.stack import services

    # SIGTERM (docker stop, timeout, kill) and SIGHUP (the terminal closed) clean up as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    processes: list[subprocess.Popen[bytes]] = []
    configured = {name for name in ("DATABASE_URL", "REDIS_URL") if os.environ.get(name)}
    if not args.no_import:
        _readable(*_reference_files(Settings.from_env()), hint=f"{_IMPORT_DIR_HINT}, or use --no-import")
    if _in_use(args.host, args.port):  # else another server's /health would pass for this one's
        raise ConfigError(
            f"{args.host}:{args.port} is already in use (another `ledger run`?): stop it, or choose another port"
            " with --port or API_PORT"
        )

    def say_stopped(error_type: type[BaseException] | None, *_: object) -> bool:
        """Once the services it started have stopped, and only if they did: an error starting or
        stopping them (a second Ctrl-C during the clean-up, say) is not a clean stop."""
        if error_type in (None, SystemExit):  # SystemExit: SIGTERM's
            print(_stopped(configured), file=sys.stderr)
        return False  # the error, if any, goes on

    watchdog = Watchdog()
    with contextlib.ExitStack() as ending:
        ending.callback(watchdog.done)  # last: once everything stopped (or failed to, and said so)
        ending.push(say_stopped)
        database_url, redis_url = ending.enter_context(services(noted=watchdog.note))
        started = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        os.environ.update(started)
        env = dict(os.environ)
        settings = Settings.from_env()
        ledger_cli = [sys.executable, "-m", "infra.cli"]
        try:
            setup_schema(settings)
            worker_env = env
            if os.geteuid() == 0:
                print(
                    "the worker runs as root here (Celery warns against it): fine for this throwaway stack;"
                    " elsewhere run `ledger worker` as another user, as the Docker image does",
                    file=sys.stderr,
                )
                worker_env = {**env, RUN_NOTED_ROOT: "1"}
            processes.append(watchdog.watched(_spawn([*ledger_cli, "worker"], worker_env)))
            processes.append(watchdog.watched(_spawn([*ledger_cli, "beat"], env)))
            if not args.no_import:
                job_id = start_import(settings, *_reference_files(settings))
                # The worker logs on this terminal too: a bar redrawn in place would run into its lines.
                print_report(follow_import(settings, job_id, progress=Progress(in_place=False)))
            server = watchdog.watched(
                _spawn([*ledger_cli, "api", "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)], env)
            )
            processes.append(server)
            base = f"http://{args.host}:{args.port}"
            if not wait_until_serving(base, server):  # said only once a request would be answered
                return server.wait()
            serving = f"Ledger API on {base}  (docs: {base}/docs, OpenAPI: {base}/openapi.json). Ctrl-C stops everything."
            hint = throwaway_hint({name: url for name, url in started.items() if name not in configured})
            print("\n" + "\n".join(filter(None, (serving, hint))) + "\n", file=sys.stderr)
            return server.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            # From here on a signal hurries the clean-up and interrupts nothing: a second Ctrl-C
            # while the throwaway PostgreSQL stopped left its data behind (a review).
            hurry = threading.Event()
            for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(stop_signal, lambda *_: hurry.set())
            stop_services(processes, hurry=hurry)


def _in_use(host: str, port: int) -> bool:
    """Whether a server listens on `host`:`port` already: a bind there fails as uvicorn's would
    (its `Config.bind_socket`: IPv6 when the host has a ':', the host's IPv4 address otherwise)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE  # anything else (an unknown host) uvicorn says itself
    return False


def wait_until_serving(base: str, server: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """Wait until `base`/health answers; False once `server` has exited. After `timeout` s it is
    given up on and True returned: the server is still starting, and its own log says why."""
    host = base.split("//", 1)[1].rsplit(":", 1)[0]
    probe = base.replace(host, {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host), 1)  # a wildcard is no address to call
    deadline = time.monotonic() + timeout
    while server.poll() is None:
        try:
            with urllib.request.urlopen(f"{probe}/health", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:  # not listening yet (URLError is one)
            pass
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def throwaway_hint(started: dict[str, str]) -> str:
    """How another shell's `ledger` commands reach the throwaway servers `ledger run` started
    (their URLs are new each run); nothing when it started none."""
    if not started:
        return ""
    exports = " ".join(f"{name}={url}" for name, url in started.items())
    script = os.path.relpath(Path(sys.executable).with_name("ledger"))  # another shell may not have the venv on its PATH
    ledger = script if os.path.exists(script) and not script.startswith("..") else "ledger"
    # The export on a line of its own: pasted whole, the sentence before it was a shell syntax error.
    return f"Other `ledger` commands (`{ledger} status`, rebuild, import) reach these servers in a shell that runs:\nexport {exports}"


def _count(variable: str, least: int = 1, most: int | None = None) -> Callable[[str], int]:
    """An option's type: a whole number in range. Its default comes from `variable` as text, which
    argparse converts only when the option is used: `--help` works whatever the environment holds."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            bounds = f"{least} to {most}" if most is not None else f"a whole number, at least {least}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (here or in {variable}), got {text!r}")
        return value

    return parse


def _serving_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=os.environ.get("API_HOST") or "127.0.0.1",
        help="address to listen on (default: API_HOST, else 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=_count("API_PORT", 1, 65535),
        default=os.environ.get("API_PORT") or "8000",
        help="port to listen on (default: API_PORT, else 8000)",
    )
    parser.add_argument(
        "--workers",
        type=_count("API_WORKERS"),
        default=os.environ.get("API_WORKERS") or "2",
        help="uvicorn worker processes (default: API_WORKERS, else 2)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description="Operate the credit approval ledger.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        # `ledger <command> --help` says what the command does too, not only its options.
        return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    command("setup", "create the event store, ID sequences and read model (idempotent)").set_defaults(func=cmd_setup)

    imp = command("import", "import the history files in a worker and follow its progress")
    imp.add_argument("--customers", help="customer file (.xlsx, .xls, .xlsb or .ods); default: IMPORT_DIR/customer_data.xlsx")
    imp.add_argument("--loans", help="loan file (.xlsx, .xls, .xlsb or .ods); default: IMPORT_DIR/loan_data.xlsx")
    imp.set_defaults(func=cmd_import)

    report = command("import-report", "show an import job's state, progress and rejected rows")
    report.add_argument("job_id", type=_job_id, help="the job ID that `ledger import` or POST /imports gave")
    report.set_defaults(func=cmd_import_report)

    command("rebuild", "replay every event into fresh read-model tables and swap them in").set_defaults(func=cmd_rebuild)
    command("status", "show the events recorded and how far the read model has got").set_defaults(func=cmd_status)

    init = command("init", "setup, then import the bundled history in this process and catch up (idempotent)")
    init.add_argument("--no-import", action="store_true", help="only create the schema and catch up")
    init.set_defaults(func=cmd_init)

    api = command("api", "serve the HTTP API with uvicorn")
    _serving_options(api)
    api.set_defaults(func=cmd_api)

    worker = command("worker", "run a Celery worker (projections, imports, rebuilds)")
    worker.add_argument(
        "--concurrency",
        type=_count("WORKER_CONCURRENCY"),
        default=os.environ.get("WORKER_CONCURRENCY") or "2",
        help="pool processes (default: WORKER_CONCURRENCY, else 2)",
    )
    worker.set_defaults(func=cmd_worker)

    command("beat", "run Celery beat (the periodic projection catch-up)").set_defaults(func=cmd_beat)

    run = command("run", "start PostgreSQL, Redis (unless configured), a worker, beat and the API; import the reference data")
    _serving_options(run)
    run.add_argument("--no-import", action="store_true", help="do not import the bundled reference data")
    run.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    try:
        Settings.from_env()  # every command needs the settings: a bad one is said before anything starts
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as error:
        explained = explain(error)
        if explained is None:
            raise
        print(f"ledger {args.command}: {explained}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1


def explain(error: BaseException) -> str | None:
    """What an operator should read for an error a setting or an unreachable server causes (no
    traceback: the message names what to check); None for any other error."""
    from eventsourcing import persistence
    from kombu.exceptions import OperationalError as BrokerUnreachable
    from redis.exceptions import ConnectionError as RedisUnreachable

    from infra.stack import StackError

    if isinstance(error, (ConfigError, StackError, QueueUnavailable, StillRunning)):
        return str(error)
    settings = Settings.from_env()  # checked by main() already
    cause = error.__cause__ if isinstance(error, persistence.PersistenceError) else error  # the library wraps psycopg's
    if isinstance(cause, psycopg.errors.InsufficientPrivilege):  # a user that may connect, not read the ledger's tables
        return f"the database user may not use the ledger's tables ({str(cause).strip().splitlines()[0]}): check DATABASE_URL's user and its grants"
    if isinstance(cause, psycopg.errors.UndefinedTable):
        return f"the database has no ledger schema yet ({str(cause).strip().splitlines()[0]}): run `ledger setup` first"
    if isinstance(error, persistence.ProgrammingError) and re.fullmatch(r"Composite type '\w+' not found", str(error)):
        # The library's, when a save finds no event type: `ledger import` on a database never set up.
        return f"the database has no ledger schema yet ({error}): run `ledger setup` first"
    # Unreachable: a connection that failed (no SQLSTATE: the server never answered a statement), or
    # the library's pool that found none. A server that answered with an error (a lock timeout, a
    # full disk) is not that: its traceback stays.
    unreachable = isinstance(cause, psycopg.OperationalError) and cause.sqlstate is None
    pool_timeout = isinstance(error, (persistence.OperationalError, persistence.InterfaceError)) and cause is None
    if unreachable or pool_timeout:
        # Every line: libpq's last is only its question ("Is the server running on that host...?"), without "Connection refused".
        reason = _one_line(str(cause or error))
        if reason.startswith("couldn't get a connection"):  # a pool's: it hides why (a wrong password, no such database)
            reason = _why_no_connection(settings.database_url) or reason
        return f"cannot reach PostgreSQL at {_where(settings.database_url)}: {reason} (check DATABASE_URL)"
    if isinstance(error, (BrokerUnreachable, RedisUnreachable)):
        return f"cannot reach Redis at {redacted(settings.redis_url)}: {error} (check REDIS_URL)"
    return None


def _why_no_connection(url: str) -> str | None:
    """What the server says to a connection of its own: a pool that could make none says only
    that it could not (a review: a wrong password read as an unreachable server)."""
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as error:
        return _one_line(str(error))
    return None  # it connects now


def _one_line(message: str) -> str:
    """libpq's message of several lines (the reason, then a hint on a line of its own), as one."""
    return " ".join(line.strip() for line in message.strip().splitlines())


def _where(url: str) -> str:
    """A database URL's host, port and database, without its user or password."""
    parts = conninfo_to_dict(url)
    where = f"{parts.get('host', '127.0.0.1')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
    # A password with an unencoded "/" or "@" is read as part of the host or the database: none of it is shown.
    return where.rsplit("@", 1)[1] if "@" in where else where


def redacted(url: str) -> str:
    """A broker URL without its password, as kombu shows one (`redis://:***@host:6379/0`)."""
    from kombu.utils.url import sanitize_url

    return sanitize_url(url, mask="***")


if __name__ == "__main__":
    sys.exit(main())
