"""What `ledger run` tells a user about the servers it started, and when."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time

import pytest

from infra.cli import main, throwaway_hint, wait_until_serving


def test_the_hint_gives_the_exports_for_the_throwaway_servers_started() -> None:
    hint = throwaway_hint(
        {"DATABASE_URL": "postgresql://ledger@127.0.0.1:53145/ledger", "REDIS_URL": "redis://127.0.0.1:49945/0"}
    )
    assert hint.endswith("export DATABASE_URL=postgresql://ledger@127.0.0.1:53145/ledger REDIS_URL=redis://127.0.0.1:49945/0")


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
