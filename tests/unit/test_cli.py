"""What `ledger run` tells a user about the servers it started, and when."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from infra.cli import _database_away, main, throwaway_hint, wait_until_serving
from infra.config import REPO_ROOT
from infra.stack import free_port


def test_the_hint_gives_the_exports_for_the_throwaway_servers_started() -> None:
    hint = throwaway_hint(
        {"DATABASE_URL": "postgresql://ledger@127.0.0.1:53145/ledger", "REDIS_URL": "redis://127.0.0.1:49945/0"}
    )
    # The last line is the export alone, so that it can be pasted into a shell as it is (the whole
    # hint was one line, and bash stopped at its parenthesis).
    last = hint.splitlines()[-1]
    assert last == "export DATABASE_URL=postgresql://ledger@127.0.0.1:53145/ledger REDIS_URL=redis://127.0.0.1:49945/0"
    pasted = subprocess.run(
        ["bash", "-c", last + '\nprintf "%s %s" "$DATABASE_URL" "$REDIS_URL"'], capture_output=True, text=True
    )
    assert pasted.stdout == "postgresql://ledger@127.0.0.1:53145/ledger redis://127.0.0.1:49945/0", pasted.stderr


def test_the_hint_names_only_what_was_started() -> None:
    hint = throwaway_hint({"REDIS_URL": "redis://127.0.0.1:49945/0"})
    assert hint.endswith("export REDIS_URL=redis://127.0.0.1:49945/0")
    assert "DATABASE_URL" not in hint


def test_no_hint_when_every_server_was_configured() -> None:
    assert throwaway_hint({}) == ""


def _server_after(delay: float) -> tuple[str, threading.Thread, http.server.HTTPServer]:
    """An HTTP server whose /health answers 200, listening only after `delay` seconds."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health, bind_and_activate=False)
    server.server_bind()
    port = server.server_address[1]

    def later() -> None:
        time.sleep(delay)
        server.server_activate()
        server.serve_forever()

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return f"http://0.0.0.0:{port}", thread, server


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_run_says_where_the_api_is_only_once_it_answers() -> None:
    base, thread, server = _server_after(1.0)
    process = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        assert wait_until_serving(base, process)  # 0.0.0.0 is called at 127.0.0.1
        assert time.monotonic() - started >= 1.0  # not before the server listened
    finally:
        process.kill()
        process.wait()
        server.shutdown()
        thread.join()
        server.server_close()


def test_run_stops_waiting_when_the_api_process_exits() -> None:
    process = subprocess.Popen(["true"])
    started = time.monotonic()
    assert not wait_until_serving("http://127.0.0.1:9", process)
    assert time.monotonic() - started < 10


def test_a_job_id_that_is_not_a_uuid_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["import-report", "not-a-uuid"])
    assert exited.value.code == 2
    assert "argument job_id: not a job ID (a UUID such as" in capsys.readouterr().err


def test_a_progress_bar_with_no_total_yet_is_empty_until_the_work_is_finished(capsys: pytest.CaptureFixture[str]) -> None:
    from infra.cli import bar

    bar(0, 0, "import queued", width=4)
    bar(0, 0, "import completed", width=4, finished=True)
    bar(1, 4, "import running", width=4)
    assert capsys.readouterr().err.split("\r")[1:] == [
        "import queued [....] 0/0",
        "import completed [####] 0/0",
        "import running [#...] 1/4",
    ]


def test_progress_where_others_write_too_is_whole_lines_when_something_changes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ledger run`'s import bar, redrawn with "\r", ran into the worker's log lines on the terminal
    they share ("import queued [....] 0/0{"time": ...}"). Out of place, progress is whole lines."""
    from infra import cli

    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    progress = cli.Progress(in_place=False)
    progress(0, 0, "import queued   ")
    progress(0, 0, "import queued   ")  # nothing new
    progress(10, 1082, "import running  ")  # a new label
    progress(20, 1082, "import running  ")  # too soon after the last line
    clock[0] += cli.Progress.LINE_SECONDS
    progress(500, 1082, "import running  ")
    progress(1082, 1082, "import running  ")  # done, however soon
    progress(1082, 1082, "import completed", finished=True)  # its outcome is the caller's line
    progress.end()
    assert capsys.readouterr().err.splitlines() == [
        "import queued",  # no total yet
        "import running: 10/1082",
        "import running: 500/1082",
        "import running: 1082/1082",
    ]


def test_progress_on_a_terminal_of_its_own_is_a_bar_whose_line_ends_before_what_follows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infra.cli import Progress

    progress = Progress(in_place=True)
    progress(1, 4, "rebuild")
    progress(4, 4, "rebuild")
    progress.end()
    progress.end()  # once is enough
    assert capsys.readouterr().err == f"\rrebuild [{'#' * 7}{'.' * 23}] 1/4\rrebuild [{'#' * 30}] 4/4\n"


def test_progress_is_in_place_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.cli import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not Progress().in_place
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Progress().in_place


# Settings an operator got wrong, and servers that do not answer: a message that names them, no traceback.


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("READ_YOUR_WRITES_TIMEOUT", "x", "READ_YOUR_WRITES_TIMEOUT must be a number of seconds, got 'x'"),
        ("PROJECTION_POLL_SECONDS", "0", "PROJECTION_POLL_SECONDS must be at least 0.1 seconds, got 0"),
        ("LEDGER_TODAY", "22-11-2026", "LEDGER_TODAY must be an ISO date (2026-11-22) or empty, got '22-11-2026'"),
        ("IMPORT_BATCH_SIZE", "0", "IMPORT_BATCH_SIZE must be at least 1, got 0"),
        ("DB_POOL_SIZE", "ten", "DB_POOL_SIZE must be a whole number, got 'ten'"),
        ("DATABASE_URL", "notaurl", "DATABASE_URL is not a PostgreSQL URL or connection string"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'loud'"),
    ],
)
def test_a_bad_setting_is_named_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ledger status: {message}")
    assert "Traceback" not in err


def test_a_setting_set_but_empty_takes_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.config import Settings

    for variable in ("DB_POOL_SIZE", "READ_YOUR_WRITES_TIMEOUT", "LEDGER_TODAY", "IMPORT_BATCH_SIZE"):
        monkeypatch.setenv(variable, "")
    settings = Settings.from_env()
    assert (settings.db_pool_size, settings.read_your_writes_timeout, settings.today, settings.import_batch_size) == (
        10,
        2.0,
        None,
        500,
    )


def test_help_works_whatever_the_serving_variables_hold(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("API_PORT", "abc")
    monkeypatch.setenv("WORKER_CONCURRENCY", "two")
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    with pytest.raises(SystemExit) as refused:
        main(["api"])
    assert refused.value.code == 2
    assert "argument --port: must be 1 to 65535 (here or in API_PORT), got 'abc'" in capsys.readouterr().err


def test_run_refuses_a_port_another_server_listens_on_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["run", "--no-import", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err
    assert "starting a throwaway" not in err  # no PostgreSQL or Redis started for nothing


def test_run_and_import_name_a_missing_import_directory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("IMPORT_DIR", str(tmp_path / "nowhere"))
    assert main(["run", "--port", "1"]) == 2
    assert main(["import"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"no file {tmp_path / 'nowhere' / 'customer_data.xlsx'} (set IMPORT_DIR") == 2


def test_a_file_named_on_the_command_line_is_not_blamed_on_import_dir_and_a_directory_is_called_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("IMPORT_DIR", str(tmp_path))
    (tmp_path / "customer_data.xlsx").write_bytes(b"")
    assert main(["import", "--loans", str(tmp_path / "missing.xlsx")]) == 2
    assert main(["import", "--loans", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ledger import: no file {tmp_path / 'missing.xlsx'}",
        f"ledger import: {tmp_path} is a directory, not a file",
    ]


def test_every_command_s_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    for command, said in [
        ("status", "Show the events recorded"),
        ("run", "Start PostgreSQL, Redis"),
        ("import", "Import the history"),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert said in capsys.readouterr().out, command


def test_an_import_still_running_when_following_it_gives_up_says_where_it_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import infra.cli

    monkeypatch.setenv("IMPORT_DIR", str(REPO_ROOT / "data"))
    job = "b5e7d356-e33a-446d-a371-c3e7cfd925e9"
    monkeypatch.setattr(infra.cli, "start_import", lambda settings, *files: job)
    monkeypatch.setattr(infra.cli, "_job_row", lambda settings, job_id: {"state": "running", "rows_done": 5, "total_rows": 9})
    monkeypatch.setattr(infra.cli.time, "sleep", lambda seconds: None)
    real = infra.cli.follow_import
    monkeypatch.setattr(infra.cli, "follow_import", lambda settings, job_id: real(settings, job_id, timeout=0.05))
    assert main(["import"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ledger import: import job {job} is still running after 0 s; it goes on in the worker: `ledger import-report {job}`"
    )

    def interrupted(settings: object, job_id: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(infra.cli, "follow_import", interrupted)
    assert main(["import"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped following import job {job}; it goes on in the worker: `ledger import-report {job}`"
    )


def test_an_unreachable_database_is_named_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://ledger:secret@127.0.0.1:1/ledger")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ledger status: cannot reach PostgreSQL at 127.0.0.1:1/ledger: ")
    assert "secret" not in err and "Traceback" not in err


def test_the_api_exits_with_a_failure_when_its_processes_cannot_start() -> None:
    # Two uvicorn processes (the default): uvicorn's supervisor itself returns normally. The
    # database is looked at before the processes start (exit 1, naming it); one that goes away
    # between that look and their start is this failure (the look is left out here).
    env = {**os.environ, "DATABASE_URL": "postgresql://ledger@127.0.0.1:1/ledger"}
    port = free_port()
    without_the_look = (
        f"import infra.cli as c; c._database_ready = lambda settings: None; raise SystemExit(c.main(['api', '--port', '{port}']))"
    )
    done = subprocess.run([sys.executable, "-c", without_the_look], env=env, capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    done = subprocess.run(
        [sys.executable, "-m", "infra.cli", "api", "--port", str(port)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    assert done.stderr.decode().startswith("ledger api: cannot reach PostgreSQL at 127.0.0.1:1/ledger: ")


def test_only_a_server_that_cannot_be_reached_is_explained_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg
    from eventsourcing import persistence

    from infra.cli import explain

    monkeypatch.setenv("DATABASE_URL", "postgresql://ledger:secret@db.example:6543/books")
    refused = psycopg.OperationalError("connection refused")
    assert explain(refused) == "cannot reach PostgreSQL at db.example:6543/books: connection refused (check DATABASE_URL)"
    wrapped = persistence.OperationalError("connection refused")
    wrapped.__cause__ = refused
    assert explain(wrapped) == explain(refused)
    # The library's pool, which says only that it got no connection: the server's own reason is asked for.
    monkeypatch.setenv("DATABASE_URL", "postgresql://ledger:secret@127.0.0.1:1/books")
    said = explain(persistence.OperationalError("couldn't get a connection after 2.00 sec"))
    assert said is not None and said.startswith("cannot reach PostgreSQL at 127.0.0.1:1/books: connection")
    assert "couldn't get a connection" not in said and "refused" in said and "secret" not in said
    # libpq's lines, all of them: its last alone was the question without the reason (a review).
    refused = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?"
    )
    assert explain(refused) == (
        'cannot reach PostgreSQL at 127.0.0.1:1/books: connection failed: connection to server at "127.0.0.1", port 1 failed:'
        " Connection refused Is the server running on that host and accepting TCP/IP connections? (check DATABASE_URL)"
    )
    # A user that may connect but not read the tables (`ledger api` and `ledger worker` look before they start).
    denied = psycopg.errors.InsufficientPrivilege("permission denied for schema readmodel\nLINE 1: ...")
    assert explain(denied) == (
        "the database user may not use the ledger's tables (permission denied for schema readmodel):"
        " check DATABASE_URL's user and its grants"
    )
    # The server answered, with an error of its own: not a matter of reaching it, and the traceback stays.
    for answered in (psycopg.errors.DiskFull("could not extend file"), psycopg.errors.LockNotAvailable("lock timeout")):
        assert explain(answered) is None
        library = persistence.OperationalError(str(answered))
        library.__cause__ = answered
        assert explain(library) is None


def test_no_password_is_shown_in_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    from infra.cli import explain

    monkeypatch.setenv("REDIS_URL", "redis://:S3cretPw@127.0.0.1:1/0")
    assert explain(redis.exceptions.ConnectionError("refused")) == (
        "cannot reach Redis at redis://:***@127.0.0.1:1/0: refused (check REDIS_URL)"
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql://ledger:50%off-Secret@db:5432/ledger")  # % not encoded
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "DATABASE_URL is not a PostgreSQL URL" in err and "Secret" not in err
    for unencoded in ("ledger:pass@Secret@127.0.0.1:1/ledger", "ledger:pa/ss@Secret@127.0.0.1:1/ledger"):
        monkeypatch.setenv("DATABASE_URL", f"postgresql://{unencoded}")
        assert main(["status"]) == 2
        err = capsys.readouterr().err
        assert "DATABASE_URL is not a PostgreSQL URL" in err and "percent-encoded" in err and "Secret" not in err


def test_an_at_sign_in_a_database_urls_parameters_is_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.config import Settings

    url = "postgresql://ledger@127.0.0.1:5432?application_name=me@laptop"
    monkeypatch.setenv("DATABASE_URL", url)
    assert Settings.from_env().database_url == url


def test_ctrl_c_says_interrupted_and_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import infra.cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(infra.cli, "cmd_status", interrupted)
    assert main(["status"]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_a_cluster_that_cannot_be_made_leaves_no_directory_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tempfile

    import infra.stack
    from infra.stack import PostgresServer, StackError

    def no_binaries(name: str) -> str:
        raise StackError(f"PostgreSQL's {name} was not found")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(infra.stack, "_pg_binary", no_binaries)
    with pytest.raises(StackError):
        PostgresServer()
    assert list(tmp_path.iterdir()) == []


def test_following_an_import_waits_for_an_outage_not_for_an_error_the_server_answered_with() -> None:
    import psycopg.errors as pg

    away = [psycopg.OperationalError("connection refused"), pg.ConnectionFailure(), pg.AdminShutdown(), pg.CannotConnectNow()]
    answered = [pg.LockNotAvailable(), pg.QueryCanceled(), pg.TooManyConnections(), pg.InvalidPassword()]
    assert [_database_away(error) for error in away] == [True] * 4
    assert [_database_away(error) for error in answered] == [False] * 4


def test_stopping_the_services_of_ledger_run_leaves_nothing_of_theirs_running(tmp_path: Path) -> None:
    """A `ledger api` that did not stop in time was killed alone: its uvicorn processes went on
    (a review). Here a service ignores SIGTERM, and so does what it started."""
    from infra.cli import _spawn, stop_services

    pid_file = tmp_path / "child.pid"
    stubborn = _spawn(["sh", "-c", f'trap "" TERM; sleep 300 & echo $! > {pid_file}; wait'], dict(os.environ))
    polite = _spawn(["sleep", "300"], dict(os.environ))
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    stop_services([stubborn, polite], grace=0.5)
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text().lower():
        assert time.monotonic() < deadline, "what the service started is still running"
        time.sleep(0.05)


def test_a_second_ctrl_c_while_the_services_stop_waits_no_more(tmp_path: Path) -> None:
    """A second Ctrl-C (or SIGTERM) during the clean-up ended it, and a service that hung was
    never killed (a review)."""
    from infra.cli import _spawn, stop_services

    stubborn = [_spawn(["sh", "-c", 'trap "" TERM; sleep 300 & wait'], dict(os.environ)) for _ in range(2)]
    time.sleep(0.3)  # their traps set
    hurry = threading.Event()
    threading.Timer(0.5, hurry.set).start()  # what `ledger run`'s handlers do on a second Ctrl-C
    started = time.monotonic()
    stop_services(stubborn, grace=60, hurry=hurry)
    assert time.monotonic() - started < 30  # not the 60 s it had for each
    assert [process.returncode for process in stubborn] == [-signal.SIGKILL, -signal.SIGKILL]


def test_a_password_with_an_unencoded_slash_or_at_sign_is_not_shown_where_the_database_is_named() -> None:
    """Misread as part of the host or the database, it was shown with them (a review)."""
    from infra.cli import _where

    assert _where("postgresql://ledger:pa/ss@db.example:5432/books") == "db.example:5432/books"
    assert _where("postgresql://ledger:pa@ss@db.example/books") == "db.example:5432/books"
    assert _where("postgresql://ledger:secret@db.example:6543/books") == "db.example:6543/books"


def test_the_import_report_counts_the_customers_given_new_ids_too(capsys: pytest.CaptureFixture[str]) -> None:
    """It said how many loans were given new IDs, not the customers (a review)."""
    from infra.cli import print_report

    summary = {
        "customers_imported": 3,
        "loans_imported": 5,
        "customers_already_present": 0,
        "loans_already_present": 0,
        "rekeyed_customers": [{"file_id": 7778, "customer_id": 7782}],
        "rekeyed_loans": [{"file_id": 1, "loan_id": 9}, {"file_id": 2, "loan_id": 10}],
    }
    print_report({"state": "completed", "summary": summary, "issues": []})
    assert capsys.readouterr().out == (
        "import completed: 3 customers and 5 loans imported, 0 customers and 0 loans already present,"
        " 1 customers and 2 loans given new IDs (their file IDs were taken), 0 rows rejected\n"
    )


def test_a_watchdog_that_died_stops_nothing_ledger_run_does() -> None:
    """`Watchdog.note` raised BrokenPipeError once its process was gone: `ledger run` failed, and
    a service spawned just before the note was never stopped (a review)."""
    from infra.cli import Watchdog

    watchdog = Watchdog()
    watchdog._process.kill()
    watchdog._process.wait()
    for _ in range(3):
        watchdog.note("group", "12345")
    watchdog.done()
    watchdog.note("group", "12345")  # after done(): its pipe is closed


def test_the_throwaway_servers_are_noted_before_they_are_ready(tmp_path: Path) -> None:
    """Noted only once started, a Redis killed with `ledger run` while it came up (its pings take up
    to 10 s), or a cluster while initdb filled it, was left running, or on disk (a review)."""
    from infra.stack import PostgresServer, RedisServer, StackError

    redis_noted: list[tuple[str, str]] = []
    server = RedisServer()
    server.binary = "/bin/false"  # exits at once, never answers
    with pytest.raises(StackError):
        server.start(lambda kind, value: redis_noted.append((kind, value)))
    assert [kind for kind, _ in redis_noted] == ["group"]
    server.remove()

    pg_noted: list[tuple[str, str, bool]] = []
    cluster = PostgresServer(noted=lambda kind, value: pg_noted.append((kind, value, (Path(value) / "data").exists())))
    try:
        assert pg_noted == [("postgres", str(cluster.workdir), False)]  # before initdb made the data
    finally:
        cluster.remove()
