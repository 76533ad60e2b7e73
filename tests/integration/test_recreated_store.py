"""An event store recreated under a running API counts its positions from 1 again: a command's
wait must be for the new store's projection, not end at once on the old store's height."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from api.endpoints import PROJECTION_HEADER, Services
from tests.integration.conftest import Stack

PHONES = iter(range(9_600_100_000, 9_600_200_000))


def register(client: TestClient) -> tuple[int, str]:
    body = {"first_name": "Ravi", "last_name": "Iyer", "age": 38, "monthly_income": 90_000, "phone_number": next(PHONES)}
    response = client.post("/register", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["customer_id"]), response.headers[PROJECTION_HEADER]


def test_a_command_after_the_store_is_recreated_waits_for_the_new_stores_projection(stack: Stack, client: TestClient) -> None:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    first = [register(client) for _ in range(8)]
    assert {header for _, header in first} == {"current"}
    booked = client.post(
        "/create-loan", json={"customer_id": first[0][0], "loan_amount": 50_000, "interest_rate": 14, "tenure": 6}
    )
    assert booked.status_code == 201 and booked.headers[PROJECTION_HEADER] == "current", booked.text
    old_height = services.watcher.position
    assert old_height >= 10

    stack.stop_worker()  # nothing projects the new store until the worker is back
    try:
        with stack.connect() as conn:
            conn.execute("ALTER TABLE ledger_events RENAME TO ledger_events_old")
            conn.execute("CREATE TABLE ledger_events (LIKE ledger_events_old INCLUDING ALL)")
            conn.execute("CREATE SEQUENCE ledger_events_renumbered")  # the new store counts from 1 again
            conn.execute("ALTER TABLE ledger_events ALTER notification_id SET DEFAULT nextval('ledger_events_renumbered')")
        # The listener's check (every second) finds the read model made from another store.
        deadline = time.monotonic() + 5
        while services.watcher.position != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert services.watcher.position == 0
        customer_id, header = register(client)  # recorded at position 1 or 2 of the new store
        assert header == "behind"  # not "current": nothing has projected the new store
        assert client.get(f"/customers/{customer_id}").status_code == 404
    finally:
        stack.start_worker()

    # The projector empties the read model and replays the new store; commands are current again.
    later_id, header = register(client)
    assert header == "current", stack.worker_log()[-3000:]
    for shown in (customer_id, later_id):
        assert client.get(f"/customers/{shown}").status_code == 200
    assert client.get(f"/customers/{first[0][0]}").status_code == 404  # the old store's customers are gone
    assert services.watcher.position < old_height
