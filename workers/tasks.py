"""Tasks: catch up the projections, import history, rebuild the read model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import redis
from celery import Task
from celery.signals import worker_ready
from eventsourcing import persistence
from eventsourcing.persistence import RecordConflictError

from infra.config import Settings
from infra.importer import run_import
from infra.postgres import build_ledger, connect, exclusive, still_held
from ledger.application import Ledger
from projections.projector import Projector, rebuild
from workers.celery_app import app as celery

log = logging.getLogger(__name__)

PENDING_KEY = "ledger:catch-up-pending"
T = TypeVar("T")


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
# Runs of one import that may end with their worker process killed (out of memory, a crash in a
# reader) before the job is failed: Celery delivers such a task again at once, and for ever.
IMPORT_KILLED_RUNS = 3
# While a copy of an import task waits, retries or runs, it renews this mark (at least every
# minute: each retry, each batch, and the longest file read there is is well under it), and
# `resume_imports` queues no other copy of its job.
IMPORT_ALIVE_SECONDS = 120


def _runs_key(job_id: str) -> str:
    return f"ledger:import-runs:{job_id}"


def _alive_key(job_id: str) -> str:
    return f"ledger:import-alive:{job_id}"


def _redis_quietly(what: str, call: Callable[[redis.Redis], T]) -> T | None:
    """Redis is the broker this task came from, so it answers; when it does not, the import goes
    on without the bookkeeping rather than stop."""
    try:
        return call(redis_client())
    except redis.RedisError:
        log.warning("could not reach Redis to %s", what, exc_info=True)
        return None


@celery.task(bind=True, max_retries=None)
def import_history(self: Task, job_id: str, customers_path: str, loans_path: str) -> dict[str, Any]:
    """Run one import job. Delivered twice, or resumed after a worker died, it is safe:
    one import at a time (advisory lock; another waits its turn), and the import skips what is
    already recorded. A job whose runs kill their worker process IMPORT_KILLED_RUNS times fails."""
    settings = Settings.from_env()
    _redis_quietly("mark the import alive", lambda r: r.set(_alive_key(job_id), 1, ex=IMPORT_ALIVE_SECONDS))

    try:
        with exclusive(settings) as lock:
            if lock is None:  # another import runs (or this one, delivered twice): try again shortly
                raise self.retry(countdown=IMPORT_RETRY_SECONDS)

            def batch_done(done: int, total: int) -> None:
                log.info("import %s: %d/%d rows", job_id, done, total)
                # The lock's session ended (the server restarted, or ended it): another copy may
                # hold the lock now. Stop here; the retry below resumes after this batch.
                still_held(lock)
                _redis_quietly("mark the import alive", lambda r: r.set(_alive_key(job_id), 1, ex=IMPORT_ALIVE_SECONDS))
                trigger_catch_up()

            runs = _redis_quietly("count the import's runs", lambda r: _count_run(r, job_id))
            if runs is not None and runs > IMPORT_KILLED_RUNS:
                reason = (
                    f"the import stopped its worker process {IMPORT_KILLED_RUNS} times without finishing"
                    " (killed: out of memory?); see the worker's log, then import the files again"
                )
                log.error("import %s: %s", job_id, reason)
                _ledger().fail_import(UUID(job_id), reason)
                _redis_quietly("forget the import's runs", lambda r: r.delete(_runs_key(job_id)))
                trigger_catch_up()
                return {"state": "failed", "error": reason}
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
            except (*DATABASE_AWAY, RecordConflictError):
                raise  # the database went away, or another copy of this job ran beside this one: again, below
            except Exception as error:  # a bug or bad data that no retry can mend: say so on the job
                log.exception("import %s failed", job_id)
                _ledger().fail_import(UUID(job_id), f"the import stopped: {type(error).__name__}: {error}")
                raise
            finally:
                # Every end this process lives to see; a run that kills it leaves its count.
                _redis_quietly("forget the import's runs", lambda r: r.delete(_runs_key(job_id)))
                trigger_catch_up()
    except (*DATABASE_AWAY, RecordConflictError) as error:
        # The job stays running, and this task takes it up again (skipping what it recorded) as soon
        # as the database answers: after 2, 4, 8, 16, 32 s, then every minute.
        countdown = min(IMPORT_RETRY_SECONDS * 2 ** min(self.request.retries, 5), 60)
        log.warning("import %s: the database is away or the job ran twice (%s); trying again in %d s", job_id, error, countdown)
        raise self.retry(countdown=countdown) from error


def _count_run(r: redis.Redis, job_id: str) -> int:
    """This run, counted with the runs before it that did not end (their process was killed);
    the hash also names the process running it (`pid`)."""
    key = _runs_key(job_id)
    runs = int(r.hincrby(key, "runs", 1))  # type: ignore[arg-type]
    r.hset(key, "pid", os.getpid())
    r.expire(key, 86_400)
    return runs


@celery.task
def resume_imports(everyone: bool = False) -> int:
    """Queue again every unfinished import that no copy of its task is looking after (see
    IMPORT_ALIVE_SECONDS): a job whose worker was killed resumes here. How many it queued.

    With `everyone`, queue each one: a worker that starts may be the one that was killed, and the
    mark its copy left must not keep the job waiting."""
    with connect(Settings.from_env()) as conn:
        jobs = conn.execute(
            "SELECT job_id, customers_file, loans_file FROM readmodel.import_jobs WHERE state IN ('queued', 'running')"
            " ORDER BY requested_at"
        ).fetchall()
    queued = 0
    for job_id, customers_file, loans_file in jobs:
        if _redis_quietly("see whether the import is alive", _claimer(str(job_id), everyone)) is not False:
            import_history.apply_async((str(job_id), customers_file, loans_file))
            queued += 1
    return queued


def _claimer(job_id: str, everyone: bool) -> Callable[[redis.Redis], bool]:
    """Whether no copy of the job's task was alive (with `everyone`: True); then the caller,
    which queues one, marks it alive."""
    return lambda r: bool(r.set(_alive_key(job_id), 1, nx=not everyone, ex=IMPORT_ALIVE_SECONDS))


@worker_ready.connect
def _resume_on_start(**_: object) -> None:
    try:
        resume_imports.apply_async(kwargs={"everyone": True})
    except Exception:
        log.warning("could not queue the resumption of unfinished imports", exc_info=True)


# Acknowledged when it starts: a rebuild runs once for each request. Delivered again after an hour
# (Redis's visibility timeout) or after its worker died, it would hold the projection lock again
# for nothing; a rebuild that did not finish leaves the live read model as it was, to ask again.
@celery.task(acks_late=False, reject_on_worker_lost=False)
def rebuild_read_model() -> int:
    return rebuild(_ledger(), Settings.from_env().database_url)
