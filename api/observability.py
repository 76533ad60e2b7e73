"""Request IDs, one structured log line per request, and Prometheus metrics.

With several uvicorn processes, counters live in PROMETHEUS_MULTIPROC_DIR (set by
`ledger api`) and every scrape sums them; figures that belong to the database (the
notification log, projection lag, import rows) are read from it at scrape time.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from psycopg import Connection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ledger.access")

REQUESTS = Counter("ledger_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "ledger_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BOOKINGS = Counter("ledger_booking_decisions_total", "create-loan decisions", ["outcome"])
EVENTS_APPENDED = Counter("ledger_events_appended_total", "Events appended by this API's commands")

REQUEST_ID = b"x-request-id"
REQUEST_ID_KEY = "ledger.request_id"  # in the scope: the request's ID, for an answer the HTTP protocol writes itself
REFUSED = "ledger.refused"  # in the scope: the status the HTTP protocol answered with, not the app


def request_id(given: bytes | None) -> str:
    """The client's X-Request-ID (up to 200 characters), else a new one."""
    text = (given or b"").decode("latin-1")
    return text if text and len(text) <= 200 else uuid.uuid4().hex


_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "UNPARSED"})


def account(method: str, label: str, route: str, path: str | None, status: int, duration: float, rid: str) -> None:
    """A request's metrics (under the method `label`) and its access line."""
    key = (label, route, status)
    children = _SERIES.get(key)
    if children is None:  # the labelled counter and histogram for one kind of request, looked up once
        children = _SERIES[key] = (REQUESTS.labels(label, route, str(status)), LATENCY.labels(label, route))
    children[0].inc()
    children[1].observe(duration)
    log.info(
        "request",
        extra={"method": method, "path": path, "status": status, "duration_ms": round(duration * 1000, 2), "request_id": rid},
    )


def observe(method: str, path: str, status: int, given_id: bytes | None, duration: float) -> str:
    """The access line and metrics of a request refused before its app ran (by the HTTP protocol,
    api.server); its ID."""
    rid = request_id(given_id)
    method = method or "UNPARSED"  # the request line was not whole
    # The label set stays bounded whatever methods the parser lets through; the line has the method.
    account(method, method if method in _METHODS else "OTHER", "unmatched", path or None, status, duration, rid)
    return rid


class RequestObserver:
    """Pure ASGI middleware: request ID in and out, a log line and metrics per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope[REQUEST_ID_KEY] = request_id(dict(scope["headers"]).get(REQUEST_ID))
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            status = scope.get(REFUSED, status)  # answered by the HTTP protocol (a 408 while the app waited for the body)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            route = route.removeprefix("/api").rstrip("/") or "/"
            account(scope["method"], scope["method"], route, scope["path"], status, duration, rid)


class DatabaseCollector:
    """Figures from PostgreSQL, read at scrape time."""

    def __init__(self, conn: Connection[Any]) -> None:
        self.conn = conn

    def collect(self) -> Any:
        last = self.conn.execute("SELECT coalesce(max(notification_id), 0) FROM ledger_events").fetchone()
        rows = self.conn.execute("SELECT projection, position FROM readmodel.tracking").fetchall()
        jobs = self.conn.execute(
            "SELECT coalesce(sum(rows_done), 0), coalesce(sum(jsonb_array_length(issues)), 0) FROM readmodel.import_jobs"
        ).fetchone()
        assert last is not None and jobs is not None
        yield GaugeMetricFamily("ledger_notification_log_position", "Highest notification ID in the event store", value=last[0])
        position = GaugeMetricFamily("ledger_projection_position", "Last event applied by each projection", labels=["projection"])
        lag = GaugeMetricFamily("ledger_projection_lag_events", "Events recorded but not yet projected", labels=["projection"])
        for name, at in rows or [("ledger", 0)]:
            position.add_metric([name], at)
            lag.add_metric([name], max(0, last[0] - at))
        yield position
        yield lag
        yield GaugeMetricFamily("ledger_import_rows_processed", "Rows processed by every import job", value=jobs[0])
        yield GaugeMetricFamily("ledger_import_rows_rejected", "Rows rejected by every import job", value=jobs[1])


def exposition(conn: Connection[Any]) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        for collector in (REQUESTS, LATENCY, BOOKINGS, EVENTS_APPENDED):
            registry.register(collector)
    registry.register(DatabaseCollector(conn))
    return generate_latest(registry)
