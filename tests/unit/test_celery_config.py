"""The Celery settings that decide what happens to a task when its worker, or Redis, goes away."""

from __future__ import annotations

import json
import logging

import pytest
import redis

from infra.logs import configure_logging
from workers import tasks
from workers.celery_app import app


def test_the_worker_waits_out_a_broker_outage_of_any_length() -> None:
    # Celery's default gives up after 100 tries (about 47 minutes) and the worker exits.
    assert app.conf.broker_connection_max_retries is None


def test_a_rebuild_request_is_acknowledged_when_it_starts_so_it_runs_once() -> None:
    # Acknowledged late, it would run again after Redis's visibility timeout (an hour), or at once
    # after its process died, holding the projection lock again each time.
    assert tasks.rebuild_read_model.acks_late is False
    assert tasks.rebuild_read_model.reject_on_worker_lost is False
    # An import, which resumes where it stopped, is delivered again after its worker died.
    assert tasks.import_history.acks_late is True


def test_beat_messages_expire_when_the_next_one_is_due() -> None:
    # A worker away for an hour would otherwise find 60 resumes of every import waiting.
    schedule = app.conf.beat_schedule
    assert {name: entry["options"]["expires"] == entry["schedule"] for name, entry in schedule.items()} == {
        "catch-up": True,
        "resume-imports": True,
    }


def test_routine_tasks_write_no_log_line_and_imports_and_failures_do(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    beat, received, trace = (logging.getLogger(n) for n in ("celery.beat", "celery.worker.strategy", "celery.app.trace"))
    try:
        configure_logging()
        configure_logging()  # configured twice (the API, then uvicorn's reload): still one filter each
        beat.info("Scheduler: Sending due task %s (%s)", "catch-up", "workers.tasks.catch_up")
        beat.info("Scheduler: Sending due task %s (%s)", "resume-imports", "workers.tasks.resume_imports")
        received.info("Task %(name)s[%(id)s] received", {"name": "workers.tasks.catch_up", "id": "1"})
        trace.info("Task %(name)s[%(id)s] succeeded", {"name": "workers.tasks.catch_up", "id": "1"})
        trace.info("Task %(name)s[%(id)s] succeeded", {"name": "workers.tasks.resume_imports", "id": "2"})
        received.info("Task %(name)s[%(id)s] received", {"name": "workers.tasks.import_history", "id": "3"})
        trace.info("Task %(name)s[%(id)s] retry: %(exc)s", {"name": "workers.tasks.import_history", "id": "3", "exc": "Retry"})
        trace.info("Task %(name)s[%(id)s] succeeded", {"name": "workers.tasks.import_history", "id": "3"})
        trace.error("Task %(name)s[%(id)s] raised unexpected", {"name": "workers.tasks.catch_up", "id": "4"})
        logging.getLogger("celery.apps.worker").info("celery@host ready.")
        lines = [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()]
        assert [len(logger.filters) for logger in (beat, received, trace)] == [1, 1, 1]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert lines == [
        "Task workers.tasks.import_history[3] received",
        "Task workers.tasks.import_history[3] retry: Retry",
        "Task workers.tasks.import_history[3] succeeded",
        "Task workers.tasks.catch_up[4] raised unexpected",
        "celery@host ready.",
    ]


def test_a_warning_or_error_that_repeats_one_logged_within_a_minute_is_dropped_and_counted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While PostgreSQL or Redis was down, the API's listener logged its reconnection twice a
    second in each process, and beat a 15 KB traceback every 5 s (a review). A different error
    is no repeat: /ready said "the API's log has the error" of a broker whose line was dropped as
    one like Redis's (a review of the first version)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    clock = iter([1000.0, 1000.5, 1001.0, 1030.0, 1030.1, 1030.2, 1030.3, 1030.4, 1030.5, 1061.0, 1091.0])
    monkeypatch.setattr(logging.time, "time", lambda: next(clock))  # type: ignore[attr-defined]
    listener, trace, ready = (logging.getLogger(n) for n in ("api.readyourwrites", "celery.app.trace", "api.endpoints"))
    failed = "Task %(name)s[%(id)s] raised unexpected: %(exc)s"
    try:
        configure_logging()
        for _ in range(3):  # 1000.0, 1000.5, 1001.0: the first is logged
            listener.warning("projection listener lost its connection (%s); reconnecting", "refused")
        trace.error(failed, {"name": "workers.tasks.catch_up", "id": "1", "exc": "OperationalError()"})  # 1030.0
        trace.error(failed, {"name": "workers.tasks.catch_up", "id": "2", "exc": "OperationalError()"})  # another ID: a repeat
        trace.error(failed, {"name": "workers.tasks.import_history", "id": "3", "exc": "OperationalError()"})
        ready.warning("/ready: %s did not answer: %s", "Redis", "ConnectionError")  # 1030.3
        ready.warning("/ready: %s did not answer: %s", "Celery's broker", "OperationalError")  # another service's
        listener.info("projection listener connected")  # 1030.5: information is never dropped
        listener.warning("projection listener lost its connection (%s); reconnecting", "refused")  # 1061.0
        trace.error(failed, {"name": "workers.tasks.catch_up", "id": "4", "exc": "OperationalError()"})  # 1091.0
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [(line["message"], line.get("repeated")) for line in lines] == [
        ("projection listener lost its connection (refused); reconnecting", None),
        ("Task workers.tasks.catch_up[1] raised unexpected: OperationalError()", None),
        ("Task workers.tasks.import_history[3] raised unexpected: OperationalError()", None),
        ("/ready: Redis did not answer: ConnectionError", None),
        ("/ready: Celery's broker did not answer: OperationalError", None),
        ("projection listener connected", None),
        ("projection listener lost its connection (refused); reconnecting", 2),  # two dropped since
        ("Task workers.tasks.catch_up[4] raised unexpected: OperationalError()", 1),
    ]


def test_a_channel_whose_connection_to_redis_closed_raises_a_connection_error_celery_handles() -> None:
    """kombu 5.7 raised AttributeError here (the transport, or its client, already gone), which
    Celery takes for an unrecoverable error: a worker whose Redis was killed mid-task exited
    (tests/stress/test_faults.py kills one). A connection error is retried and logged instead."""
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel.__new__(kombu_redis.Channel)
    for transport in (None, type("Closed", (), {"client": None})()):
        channel.connection = transport
        with pytest.raises(redis.exceptions.ConnectionError, match="connection to Redis is closed"):
            channel._connparams()
    assert isinstance(redis.exceptions.ConnectionError(), kombu_redis.Transport.connection_errors)


def test_celerys_privilege_warnings_are_json_lines_once_the_worker_starts(caplog: pytest.LogCaptureFixture) -> None:
    """Celery warned in plain lines, before its logging was set up, that a worker runs with
    privileges: they broke the JSON lines (a review). They are held, each said in one line once the
    worker starts (the one for root not again after `ledger run` said it); other warnings pass."""
    import warnings

    from celery import platforms
    from celery.exceptions import SecurityWarning

    from workers.celery_app import _say_held_warnings, hold_security_warnings

    root = platforms.ROOT_DISCOURAGED.format(uid=0, euid=0, gid=0, egid=0)
    passed: list[str] = []
    with warnings.catch_warnings():  # restores what showed warnings before
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: passed.append(str(message))
        hold_security_warnings()
        warnings.warn(SecurityWarning(root), stacklevel=1)
        warnings.warn(SecurityWarning(platforms.ASSUMING_ROOT), stacklevel=1)  # a group the system does not know
        warnings.warn(UserWarning("another"), stacklevel=1)
        assert passed == ["another"]
        with caplog.at_level(logging.WARNING, logger="celery.apps.worker"):
            _say_held_warnings({"LEDGER_RUN_NOTED_ROOT": "1"})
        assert caplog.messages == [
            "An entry for the specified gid or egid was not found. We're assuming this is a potential security issue."
        ]
        caplog.clear()
        warnings.warn(SecurityWarning(root), stacklevel=1)
        with caplog.at_level(logging.WARNING, logger="celery.apps.worker"):
            _say_held_warnings({})
            _say_held_warnings({})  # said once
    assert caplog.messages == [
        "You're running the worker with superuser privileges: this is absolutely not recommended!"
        " Please specify a different user using the --uid option. User information: uid=0 euid=0 gid=0 egid=0"
    ]


def test_two_different_errors_of_one_type_at_one_place_are_both_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """The filter keyed on the exception's type alone: a second bug's traceback (another KeyError
    on the same line) was dropped as a repeat of the first (a review)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log = logging.getLogger("api.app")
    try:
        configure_logging()
        for key in ("a", "totally_different_bug", "a"):
            try:
                {}[key]
            except KeyError:
                log.exception("unexpected error on %s %s", "GET", "/api/loans/1")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [line["exception"].splitlines()[-1] for line in lines] == ["KeyError: 'a'", "KeyError: 'totally_different_bug'"]


def test_log_level_warning_leaves_out_every_request_s_access_line_and_keeps_warnings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request writes an access line (about 225 bytes: 2 MB a minute at 150 requests a
    second, which nothing rotated; a soak review): LOG_LEVEL=WARNING keeps them out."""
    from api.observability import account
    from infra.config import Settings

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for level, expected in (("warning", ["a warning"]), ("", ["request", "a warning"])):
            monkeypatch.setenv("LOG_LEVEL", level)
            configure_logging(Settings.from_env().log_level)
            account("GET", "GET", "/view-loan/{loan_id}", "/view-loan/1", 200, 0.001, "rid")
            logging.getLogger("api.endpoints").warning("a warning")
            assert [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()] == expected
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
