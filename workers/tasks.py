"""Tasks: catch up the projections, import history, rebuild the read model."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import redis
from celery import Task
from celery.signals import worker_ready, worker_shutting_down
from celery.worker import state as worker_state
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
    app, _pool = build_ledger(Settings.from_env(), check_connections=True)
    return app


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(Settings.from_env().redis_url, socket_timeout=2, socket_connect_timeout=2)


def ping_workers(timeout: float = 1.0, enough: int | None = None) -> int:
    """How many Celery workers answer a ping within `timeout` seconds (it waits the whole time
    unless `enough` answer sooner). A pooled connection that Redis closed (it restarted since)
    fails once and is dropped: the ping is sent again on a new one."""
    try:
        return len(celery.control.ping(timeout=timeout, limit=enough))
    except redis.exceptions.ConnectionError:
        return len(celery.control.ping(timeout=timeout, limit=enough))


@cache
def projector() -> Projector:
    """This process's projector: it keeps its connection between catch-ups."""
    settings = Settings.from_env()
    return Projector(_ledger(), settings.database_url, page_size=settings.projection_page_size)


def trigger_catch_up() -> bool:
    """Ask a worker to catch up, unless a request is already waiting. False when Redis is unreachable."""
    try:
        if redis_client().set(PENDING_KEY, 1, nx=True, ex=30):
            try:
                catch_up.apply_async()
            except Exception:  # a trigger set with no run queued would hold back the next 30 s of them
                _redis_quietly("clear the catch-up trigger", lambda r: r.delete(PENDING_KEY))
                raise
    except Exception:  # Redis down: the events are safe in PostgreSQL and beat catches up later.
        log.warning("could not reach Redis to trigger the projection", exc_info=True)
        return False
    return True


@celery.task
def catch_up() -> int | None:
    """Apply every event not yet applied. The flag that queued this run stays set until it ends:
    a command meanwhile queues no run of its own, which would only find the lock taken or its
    events applied (a third of all runs did, under a stream of bookings), since this run's loop
    applies what commands commit while it goes. Once the flag is cleared, one more look applies
    what was committed between this run's last read and the clearing; a command that commits
    after the clearing queues a new run."""
    run = projector()
    try:
        applied = run.catch_up()
    finally:
        _redis_quietly("clear the catch-up trigger", lambda r: r.delete(PENDING_KEY))  # else it expires in 30 s
    if applied is None:  # another runner held the lock: this one's position says nothing
        run.catch_up()
    else:
        run.catch_up_if_behind()
    return applied


IMPORT_RETRY_SECONDS = 2
DATABASE_AWAY = (psycopg.OperationalError, persistence.OperationalError, persistence.InterfaceError)
# Runs of one import that may end with their worker process killed (out of memory, a crash in a
# reader) before the job is failed: Celery delivers such a task again at once, and for ever. A run
# cut short by a worker that was asked to stop (SIGTERM, then SIGKILL at the end of the grace
# period: a deploy, a restart) does not count (`_stopping_is_not_dying`).
IMPORT_KILLED_RUNS = 3
# While a copy of an import task waits, retries or runs, it renews this mark (each retry, each
# batch), and `resume_imports` queues no other copy of its job. A run held up for longer (reading
# huge files, or waiting behind a rebuild to settle) gets a second copy, which waits for the lock
# and then finds the job finished.
IMPORT_ALIVE_SECONDS = 120
PROGRESS_LOG_SECONDS = 5.0  # at most one "import <job>: <done>/<total> rows" line this often (and the last)
_unforgotten: set[str] = set()  # jobs whose count this process could not delete (Redis away)


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


def _set_alive(r: redis.Redis, job_id: str, *, unless_marked: bool = False) -> bool:
    """Mark a copy of the job's task alive (queued, waiting or running) for IMPORT_ALIVE_SECONDS,
    with the time it was seen; with `unless_marked`, only if no copy is. Whether it marked it."""
    return bool(r.set(_alive_key(job_id), f"{time.time():.3f}", nx=unless_marked, ex=IMPORT_ALIVE_SECONDS))


def _mark_alive(job_id: str, *, unless_marked: bool = False) -> bool | None:
    """`_set_alive`, or None when Redis did not answer (logged)."""
    return _redis_quietly("mark the import alive", lambda r: _set_alive(r, job_id, unless_marked=unless_marked))


def _seen_since(job_id: str, since: float) -> bool:
    """Whether a copy of the job's task was marked alive at or after `since` (a mark from before
    marks held their time holds 1: long before)."""
    seen = _redis_quietly("read the import's mark", lambda r: r.get(_alive_key(job_id)))
    return seen is not None and float(seen) >= since


def queue_import(job_id: str, customers_path: str, loans_path: str) -> None:
    """Send the job's task to a worker, marked alive from now on: beat's resumption, or a worker
    that starts meanwhile, queues no second copy of it."""
    with contextlib.suppress(redis.RedisError):  # not logged: the task cannot be queued either, and the caller says so
        _set_alive(redis_client(), job_id)
    import_history.apply_async((job_id, customers_path, loans_path))


def _forget_runs(job_id: str) -> None:
    if _redis_quietly("forget the import's runs", lambda r: r.delete(_runs_key(job_id))) is None:
        _unforgotten.add(job_id)  # deleted before this process counts the job's next run
    else:
        _unforgotten.discard(job_id)


@celery.task(bind=True, max_retries=None)
def import_history(self: Task, job_id: str, customers_path: str, loans_path: str, away: int = 0) -> dict[str, Any]:
    """Run one import job. Delivered twice, or resumed after a worker died, it is safe:
    one import at a time (advisory lock; another waits its turn), and the import skips what is
    already recorded. A job whose runs kill their worker process IMPORT_KILLED_RUNS times fails.
    `away`: how many runs in a row before this one found the database away (their back-off's)."""
    settings = Settings.from_env()
    _mark_alive(job_id)

    try:
        with exclusive(settings) as lock:
            if lock is None:  # another import runs (or this one, delivered twice): try again shortly
                log.info("import %s waits for the import before it", job_id)
                raise self.retry(countdown=IMPORT_RETRY_SECONDS, kwargs={"away": 0})  # the database answered

            logged = [0.0]  # when the last progress line was logged

            def batch_done(done: int, total: int) -> None:
                # A line every PROGRESS_LOG_SECONDS, not every batch: a million loans made 730 lines.
                now = time.monotonic()
                if now - logged[0] >= PROGRESS_LOG_SECONDS or done >= total:
                    logged[0] = now
                    log.info("import %s: %d/%d rows", job_id, done, total)
                # The lock's session ended (the server restarted, or ended it): another copy may
                # hold the lock now. Stop here; the retry below resumes after this batch.
                if not still_held(lock):
                    raise RunAgain("the import lock's session ended")
                _mark_alive(job_id)
                trigger_catch_up()

            if job_id in _unforgotten:
                _forget_runs(job_id)
            runs = _redis_quietly("count the import's runs", lambda r: _count_run(r, job_id))
            if runs is not None and runs > IMPORT_KILLED_RUNS:
                # The count is forgotten only once the job is failed: should the database be away
                # meanwhile, the retry finds it still over the line.
                if _ledger().get_import_job(UUID(job_id)).finished:  # delivered again after it finished
                    _forget_runs(job_id)
                    return {"state": "finished"}
                reason = (
                    f"the import stopped its worker process {IMPORT_KILLED_RUNS} times without finishing"
                    " (killed: out of memory?); see the worker's log, then import the files again"
                )
                log.error("import %s failed: %s", job_id, reason)
                _ledger().fail_import(UUID(job_id), reason)
                _forget_runs(job_id)
                trigger_catch_up()
                return {"state": "failed", "error": reason}
            try:
                result = run_import(
                    _ledger(),
                    UUID(job_id),
                    Path(customers_path),
                    Path(loans_path),
                    settings.import_batch_size,
                    batch_done,
                    settle=lambda: projector().catch_up(wait=True),
                    split_size=settings.import_split_size,
                )
            except (*DATABASE_AWAY, RunAgain):
                raise  # again, below
            except Exception as error:
                if isinstance(error, RecordConflictError) and not still_held(lock):
                    raise RunAgain(f"the import lock's session ended, and another copy may have run: {error}") from error
                # A bug or bad data that no retry can mend: say so on the job.
                log.exception("import %s failed", job_id)
                _ledger().fail_import(UUID(job_id), f"the import stopped: {type(error).__name__}: {error}")
                raise
            finally:
                # Every end this process lives to see; a run that kills it leaves its count.
                _forget_runs(job_id)
                trigger_catch_up()
            if result["state"] == "failed":  # files refused: the job says why, and so does the log
                log.warning("import %s failed: %s", job_id, result.get("error"))
            else:
                log.info("import %s %s", job_id, result["state"])
            # Celery's worker logs the return value whole: the re-keyed rows' lists are the job's
            # report's (2.5 KB of log line for the reference files, more for larger ones); here, counts.
            return {key: len(value) if isinstance(value, list) else value for key, value in result.items()}
    except (*DATABASE_AWAY, RunAgain) as error:
        # The job stays running, and this task takes it up again (skipping what it recorded) as soon
        # as the database answers: after 2, 4, 8, 16, 32 s, then every minute. Counted from the
        # runs that found it away, not from every retry: an import that had waited its turn behind
        # another 30 times waited a minute for a database back since long before (a review).
        countdown = min(IMPORT_RETRY_SECONDS * 2 ** min(away, 5), 60)
        log.warning("import %s: the database is away or the job ran twice (%s); trying again in %d s", job_id, error, countdown)
        raise self.retry(countdown=countdown, kwargs={"away": away + 1}) from error


class RunAgain(Exception):
    """This run of an import stopped where a later one resumes."""


def _count_run(r: redis.Redis, job_id: str) -> int:
    """This run, counted with the runs before it that did not end (their process was killed);
    the hash also names the process running it (`pid`)."""
    key = _runs_key(job_id)
    runs = int(r.hincrby(key, "runs", 1))  # type: ignore[arg-type]
    r.hset(key, "pid", os.getpid())
    r.expire(key, 86_400)
    return runs


@worker_shutting_down.connect
def _stopping_is_not_dying(**_: object) -> None:
    """A worker asked to stop finishes its tasks, or is killed at the end of its grace period: the
    imports it is running are not counted as runs that killed their process. (In the worker's
    main process, which knows which tasks its pool runs.)"""
    for request in list(worker_state.active_requests):
        if request.name == import_history.name and request.args and request.worker_pid:
            _uncount(str(request.args[0]), request.worker_pid)


# Takes a run off the count only if the count's last run is the one this pool process runs, and
# once: a second SIGTERM (Celery signals shutting down on each), a copy that waits for the lock
# (it has not counted itself) or a count already forgotten changes nothing.
_UNCOUNT = """
local runs = tonumber(redis.call('HGET', KEYS[1], 'runs') or '0')
if runs > 0 and redis.call('HGET', KEYS[1], 'pid') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'pid', '')
    return redis.call('HINCRBY', KEYS[1], 'runs', -1)
end
return false
"""


def _uncount(job_id: str, pid: int) -> None:
    _redis_quietly("uncount a stopped import's run", lambda r: r.eval(_UNCOUNT, 1, _runs_key(job_id), str(pid)))


@celery.task
def resume_imports(everyone: bool = False, since: float | None = None) -> int:
    """Queue again every unfinished import that no copy of its task is looking after (see
    IMPORT_ALIVE_SECONDS): a job whose worker was killed resumes here. How many it queued.

    With `everyone`, a worker that starts queues each one: it may be the one that was killed, and
    the mark its copy left must not keep the job waiting. Only a job whose copy was seen alive at
    or after `since` (the worker's start: a copy queued since, or one this worker has begun) is
    left to that copy. It catches up first, so that the jobs read include those requested while
    no worker ran: waiting for the projection lock, since a run that holds it (beat's first
    catch-up, started beside this) may not have applied them yet."""
    if everyone:
        try:
            projector().catch_up(wait=True)
        except Exception:  # the jobs the read model has are resumed all the same; beat's next run sees the rest
            log.warning("could not catch up before resuming the unfinished imports", exc_info=True)
    with connect(Settings.from_env()) as conn:
        jobs = conn.execute(
            "SELECT job_id, customers_file, loans_file FROM readmodel.import_jobs WHERE state IN ('queued', 'running')"
            " ORDER BY requested_at"
        ).fetchall()
    queued = 0
    seen = "since this worker started" if everyone else "lately"
    for job_id, customers_file, loans_file in jobs:
        if everyone and since is not None and _seen_since(str(job_id), since):
            continue
        if _mark_alive(str(job_id), unless_marked=not everyone) is False:
            continue
        import_history.apply_async((str(job_id), customers_file, loans_file))
        log.info("import %s is unfinished and no copy of its task was seen %s: queued again", job_id, seen)
        queued += 1
    return queued


@worker_ready.connect
def _resume_on_start(**_: object) -> None:
    try:
        resume_imports.apply_async(kwargs={"everyone": True, "since": time.time()})
    except Exception:
        log.warning("could not queue the resumption of unfinished imports", exc_info=True)


# Acknowledged when it starts: a rebuild runs once for each request. Delivered again after an hour
# (Redis's visibility timeout) or after its worker died, it would hold the projection lock again
# for nothing; a rebuild that did not finish leaves the live read model as it was, to ask again.
@celery.task(acks_late=False, reject_on_worker_lost=False)
def rebuild_read_model() -> int:
    return rebuild(_ledger(), Settings.from_env().database_url)
