"""Tasks: catch up the projections, import history, rebuild the read model."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID

import redis
from celery import Task

from infra.config import Settings
from infra.postgres import build_ledger
from infra.xlsx import read_history
from ledger.application import Ledger
from ledger.history import UnreadableFile
from projections.projector import Projector, rebuild
from workers.celery_app import app as celery

log = logging.getLogger(__name__)

PENDING_KEY = "ledger:catch-up-pending"


@cache
def _ledger() -> Ledger:
    app, _pool = build_ledger(Settings.from_env())
    return app


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(Settings.from_env().redis_url, socket_timeout=2, socket_connect_timeout=2)


def projector() -> Projector:
    return Projector(_ledger(), Settings.from_env().database_url)


def trigger_catch_up() -> bool:
    """Ask a worker to catch up, unless a request is already waiting. False when Redis is unreachable."""
    try:
        if _redis().set(PENDING_KEY, 1, nx=True, ex=30):
            catch_up.apply_async()
    except Exception:  # Redis down: the events are safe in PostgreSQL and beat catches up later.
        log.warning("could not reach Redis to trigger the projection", exc_info=True)
        return False
    return True


@celery.task
def catch_up() -> int | None:
    # Clear the flag before reading, so an event committed from now on triggers a new run.
    _redis().delete(PENDING_KEY)
    return projector().catch_up()


@celery.task(bind=True, max_retries=3)
def import_history(self: Task, job_id: str, customers_path: str, loans_path: str) -> dict[str, Any]:
    app = _ledger()
    job = app.get_import_job(UUID(job_id))
    if job.finished:
        return {"state": job.state}
    try:
        customers, loans, issues = read_history(Path(customers_path), Path(loans_path))
    except UnreadableFile as unreadable:
        app.fail_import(job.id, str(unreadable))
        trigger_catch_up()
        return {"state": "failed", "error": str(unreadable)}

    def batch_done(done: int, total: int) -> None:
        log.info("import %s: %d/%d rows", job_id, done, total)
        trigger_catch_up()

    report = app.import_history(
        job.id, customers, loans, issues, batch_size=Settings.from_env().import_batch_size, on_batch=batch_done
    )
    trigger_catch_up()
    return report.summary()


@celery.task
def rebuild_read_model() -> int:
    return rebuild(_ledger(), Settings.from_env().database_url)
