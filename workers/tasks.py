"""Tasks: catch up the projections, import history, rebuild the read model."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import redis
from celery import Task
from celery.signals import worker_ready
from eventsourcing import persistence

from infra.config import Settings
from infra.importer import run_import
from infra.postgres import build_ledger, connect, exclusive
from ledger.application import Ledger
from projections.projector import Projector, rebuild
from workers.celery_app import app as celery

log = logging.getLogger(__name__)

PENDING_KEY = "ledger:catch-up-pending"


@cache
def _ledger() -> Ledger:
    app, _pool = build_ledger(Settings.from_env())
    return app


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(Settings.from_env().redis_url, socket_timeout=2, socket_connect_timeout=2)


def ping_workers(timeout: float = 1.0) -> int:
    """How many Celery workers answer a ping within `timeout` seconds."""
    return len(celery.control.ping(timeout=timeout))


@cache
def projector() -> Projector:
    """This process's projector: it keeps its connection between catch-ups."""
    settings = Settings.from_env()
    return Projector(_ledger(), settings.database_url, page_size=settings.projection_page_size)


def trigger_catch_up() -> bool:
    """Ask a worker to catch up, unless a request is already waiting. False when Redis is unreachable."""
    try:
        if redis_client().set(PENDING_KEY, 1, nx=True, ex=30):
            catch_up.apply_async()
    except Exception:  # Redis down: the events are safe in PostgreSQL and beat catches up later.
        log.warning("could not reach Redis to trigger the projection", exc_info=True)
        return False
    return True


@celery.task
def catch_up() -> int | None:
    # Clear the flag before reading, so an event committed from now on triggers a new run.
    redis_client().delete(PENDING_KEY)
    return projector().catch_up()


IMPORT_RETRY_SECONDS = 2
DATABASE_AWAY = (psycopg.OperationalError, persistence.OperationalError, persistence.InterfaceError)


@celery.task(bind=True, max_retries=None)
def import_history(self: Task, job_id: str, customers_path: str, loans_path: str) -> dict[str, Any]:
    """Run one import job. Delivered twice, or resumed after a worker died, it is safe:
    one import at a time (advisory lock; another waits its turn), and the import skips what is
    already recorded."""
    settings = Settings.from_env()

    def batch_done(done: int, total: int) -> None:
        log.info("import %s: %d/%d rows", job_id, done, total)
        trigger_catch_up()

    try:
        with exclusive(settings) as mine:
            if not mine:  # another import runs (or this one, delivered twice): try again shortly
                raise self.retry(countdown=IMPORT_RETRY_SECONDS)
            try:
                return run_import(
                    _ledger(),
                    UUID(job_id),
                    Path(customers_path),
                    Path(loans_path),
                    settings.import_batch_size,
                    batch_done,
                    settle=lambda: projector().catch_up(wait=True),
                    split_size=settings.import_split_size,
                )
            except DATABASE_AWAY:
                raise
            except Exception as error:  # a bug or bad data that no retry can mend: say so on the job
                log.exception("import %s failed", job_id)
                _ledger().fail_import(UUID(job_id), f"the import stopped: {type(error).__name__}: {error}")
                raise
            finally:
                trigger_catch_up()
    except DATABASE_AWAY as error:
        # The job stays running, and this task takes it up again (skipping what it recorded) as soon
        # as the database answers: after 2, 4, 8, 16, 32 s, then every minute.
        countdown = min(IMPORT_RETRY_SECONDS * 2 ** min(self.request.retries, 5), 60)
        log.warning("import %s: the database is away (%s); trying again in %d s", job_id, error, countdown)
        raise self.retry(countdown=countdown) from error


@celery.task
def resume_imports() -> int:
    """Queue every unfinished import again: a job whose worker was killed resumes here."""
    with connect(Settings.from_env()) as conn:
        jobs = conn.execute(
            "SELECT job_id, customers_file, loans_file FROM readmodel.import_jobs WHERE state IN ('queued', 'running')"
        ).fetchall()
    for job_id, customers_file, loans_file in jobs:
        import_history.apply_async((str(job_id), customers_file, loans_file))
    return len(jobs)


@worker_ready.connect
def _resume_on_start(**_: object) -> None:
    try:
        resume_imports.apply_async()
    except Exception:
        log.warning("could not queue the resumption of unfinished imports", exc_info=True)


@celery.task
def rebuild_read_model() -> int:
    return rebuild(_ledger(), Settings.from_env().database_url)
