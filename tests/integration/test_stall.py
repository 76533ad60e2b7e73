"""A projection that stops at an event it cannot apply, while everything else answers: `/ready`
must say so (its own module, so its own database: the stopped projection harms no other test)."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import replace

from eventsourcing.utils import get_topic
from starlette.testclient import TestClient

from api.app import create_app
from ledger.domain import Customer
from ledger.ports import FixedClock
from tests.integration.conftest import TODAY, Stack


def test_ready_says_a_projection_stopped_at_an_event_is_stalled(stack: Stack) -> None:
    app = create_app(replace(stack.settings, ready_stall_seconds=1.0), clock=FixedClock(TODAY))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/ready").status_code == 200
        # An event the projection cannot apply, written by hand (no command writes one): its
        # state lacks every field a registration has.
        with stack.connect() as conn:
            conn.execute(
                "INSERT INTO ledger_events (originator_id, originator_version, topic, state) VALUES (%s, 1, %s, %s)",
                (uuid.uuid4(), get_topic(Customer.Registered), b"{}"),
            )
        registered = client.post(
            "/register",
            json={"first_name": "Stuck", "last_name": "Behind", "age": 40, "monthly_income": 5000, "phone_number": 9_400_000_001},
        )
        assert registered.status_code == 201  # recorded: the event store takes it
        assert registered.headers["X-Read-Model"] == "behind"  # the projection fails at the event before it
        deadline = time.monotonic() + 30
        while (ready := client.get("/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
    checks = ready.json()["checks"]
    assert ready.status_code == 503, ready.text
    assert checks["worker"]["ok"] and checks["redis"]["ok"] and checks["postgres"]["ok"]  # all answer
    with stack.connect() as conn:
        last, position = conn.execute(
            "SELECT (SELECT max(notification_id) FROM ledger_events), (SELECT coalesce(max(position), 0) FROM readmodel.tracking)"
        ).fetchone() or (None, None)
    assert checks["projection"]["ok"] is False
    stalled = re.fullmatch(
        r"(\d+) events behind, no progress past event (\d+) for (\d+) s: see the worker's log", checks["projection"]["detail"]
    )
    assert stalled is not None, checks["projection"]
    # Behind by the poisoned event and the registration's two (the customer, the phone number's claim)
    assert int(stalled[1]) == last - position == 3
    assert int(stalled[2]) == position
