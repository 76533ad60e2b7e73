"""The Celery settings that decide what happens to a task when its worker, or Redis, goes away."""

from __future__ import annotations

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
