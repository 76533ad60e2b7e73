"""The Celery application. Broker and nothing else on Redis: task results are not kept,
because every outcome that matters is an event in the store."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.apps import worker as celery_worker
from celery.exceptions import SecurityWarning
from celery.signals import celeryd_after_setup, setup_logging
from kombu.transport import redis as kombu_redis

from infra.config import RUN_NOTED_ROOT, Settings
from infra.logs import configure_logging, say_as_json

settings = Settings.from_env()

app = Celery("ledger", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,  # a task whose worker dies is delivered again
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a Redis outage of any length: the worker waits, it never exits
    broker_connection_timeout=2,
    broker_transport_options={"visibility_timeout": 3600, "socket_timeout": 2, "socket_connect_timeout": 2},
    task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    worker_hijack_root_logger=False,
    # A pool process keeps the memory an import took (about 340 MB for a million loans) until it
    # ends: one that ran an import is replaced after it, so the next import starts from a fresh
    # one (a re-import in the same process peaked at 506 MB, the worker's budget being 500).
    worker_max_memory_per_child=settings.worker_max_memory_mb * 1024 or None,  # KiB; billiard reads the peak RSS
    beat_schedule={
        # Each expires at its next: after a time with no worker, one of each runs, not every one sent meanwhile.
        "catch-up": {
            "task": "workers.tasks.catch_up",
            "schedule": settings.projection_poll_seconds,
            "options": {"expires": settings.projection_poll_seconds},
        },
        "resume-imports": {"task": "workers.tasks.resume_imports", "schedule": 60.0, "options": {"expires": 60.0}},
    },
)


# kombu 5.7's Redis transport, when the connection to Redis breaks while a task is unacknowledged
# (Redis killed under load): Celery closes the channel, kombu tries to hand the message back to
# Redis, and a task that finishes later tries to acknowledge it, both on the connection already
# gone. Each then raises AttributeError ('NoneType' object has no attribute 'hostname', or
# 'client'), which Celery takes for an unrecoverable error: the worker exited instead of
# reconnecting. A closed connection is now the connection error it is, which kombu and Celery
# handle: the close goes on, an acknowledgement that cannot be made is logged, and the worker
# reconnects. The message stays in Redis's unacknowledged set, which kombu restores after the
# visibility timeout if Redis kept it; what each task does is asked for again anyway (a catch-up
# by beat every few seconds, an unfinished import every minute), and both are idempotent.
_kombu_connparams = kombu_redis.Channel._connparams
_kombu_restore_unacked = kombu_redis.QoS.restore_unacked


def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.exceptions.ConnectionError("this channel's connection to Redis is closed")
    return _kombu_connparams(self, asynchronous=asynchronous)


def _restore_unacked(self: kombu_redis.QoS, client: Any = None) -> Any:
    try:
        return _kombu_restore_unacked(self, client)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        logging.getLogger(__name__).warning(
            "could not hand %d unacknowledged message(s) back to Redis, which is away (%s): kombu restores them"
            " after the visibility timeout if Redis kept them, and beat asks for catch-ups and unfinished imports again",
            len(self._delivered),
            error,
        )
        self._delivered.clear()  # as kombu's own leaves it: they are Redis's to restore now
        return None


kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
kombu_redis.QoS.restore_unacked = _restore_unacked  # type: ignore[method-assign]


# Celery warns in plain lines that a worker runs with privileges (as root, in the sudo or wheel
# group, with a group the system does not know) before its logging is set up: among the JSON lines
# they broke a log shipper's parsing (a review). They are held, and the worker logs each as one
# JSON line once it starts (`_say_held_warnings`); the one that it runs as root is left out when
# `ledger run` (a throwaway stack, often in a root shell) has said so in a line of its own.
_held_warnings: list[str] = []
RUNS_AS_ROOT = "You're running the worker with superuser privileges"  # how Celery's warning begins


def hold_security_warnings() -> None:
    shown = warnings.showwarning

    def hold(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, SecurityWarning):
            _held_warnings.append(" ".join(str(message).split()))
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = hold


hold_security_warnings()


@celeryd_after_setup.connect
def _say_held_warnings(env: Mapping[str, str] = os.environ, **_: Any) -> None:
    held, _held_warnings[:] = list(_held_warnings), []
    for message in held:
        if not (message.startswith(RUNS_AS_ROOT) and env.get(RUN_NOTED_ROOT) == "1"):
            logging.getLogger("celery.apps.worker").warning(message)


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    """Celery's own log setup is replaced by the JSON lines the API writes too; its banners are
    left out (`ledger worker` and `ledger beat` run Celery with --quiet), and what its worker
    says from its signal handlers is a JSON line too."""
    configure_logging(settings.log_level)
    celery_worker.safe_say = say_as_json("celery.apps.worker")
