"""The Celery application. Broker and nothing else on Redis: task results are not kept,
because every outcome that matters is an event in the store."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging

from infra.config import Settings
from infra.logs import configure_logging

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


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    """Celery's own log setup is replaced by the JSON lines the API writes too."""
    configure_logging()
