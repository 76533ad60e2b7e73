"""An event store recreated or emptied under a running API counts its positions from 1 again: a
command's wait must be for the new store's projection, not end at once on the old store's height.
One dumped and restored (the same events in a new table) keeps its read model."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from api.endpoints import PROJECTION_HEADER, Services
from tests.integration.conftest import Stack, catch_up_in_process

PHONES = iter(range(9_600_100_000, 9_600_200_000))


def register(client: TestClient) -> tuple[int, str]:
    body = {"first_name": "Ravi", "last_name": "Iyer", "age": 38, "monthly_income": 90_000, "phone_number": next(PHONES)}
    response = client.post("/register", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["customer_id"]), response.headers[PROJECTION_HEADER]


def test_a_store_dumped_and_restored_keeps_its_read_model(stack: Stack, client: TestClient) -> None:
    """The same events in a new table (pg_dump and pg_restore, a move to another server): a new
    table OID, but the store still holds the event the read model's position names."""
    customers = [register(client)[0] for _ in range(3)]
    stack.stop_worker()
    try:
        with stack.connect() as conn:
            before = conn.execute("SELECT count(*), max(position) FROM readmodel.customers, readmodel.tracking").fetchone()
            conn.execute("ALTER TABLE ledger_events RENAME TO ledger_events_dumped")
            conn.execute("CREATE TABLE ledger_events (LIKE ledger_events_dumped INCLUDING ALL)")
            conn.execute("INSERT INTO ledger_events SELECT * FROM ledger_events_dumped")
            conn.execute("CREATE SEQUENCE ledger_events_restored OWNED BY ledger_events.notification_id")
            conn.execute("SELECT setval('ledger_events_restored', (SELECT max(notification_id) FROM ledger_events))")
            conn.execute("ALTER TABLE ledger_events ALTER notification_id SET DEFAULT nextval('ledger_events_restored')")
            conn.execute("DROP TABLE ledger_events_dumped")
        notices = catch_up_in_process(stack)
        with stack.connect() as conn:
            after = conn.execute("SELECT count(*), max(position) FROM readmodel.customers, readmodel.tracking").fetchone()
        assert after == before and notices == []  # nothing emptied, nothing replayed
    finally:
        stack.start_worker()
    assert all(client.get(f"/customers/{c}").status_code == 200 for c in customers)
    assert register(client)[1] == "current"


def test_a_position_moved_by_an_earlier_projector_keeps_the_read_model(stack: Stack, client: TestClient) -> None:
    """During a rolling deploy a projector of the version before moves `position` and leaves the
    recorded event alone: that event is still in the store, so nothing is emptied."""
    customers = [register(client)[0] for _ in range(2)]
    stack.stop_worker()
    try:
        later = register(client)[0]  # recorded, not projected
        with stack.connect() as conn:
            conn.execute("UPDATE readmodel.tracking SET position = (SELECT max(notification_id) FROM ledger_events)")
            before = conn.execute("SELECT count(*) FROM readmodel.customers").fetchone()
        notices = catch_up_in_process(stack)
        with stack.connect() as conn:
            assert conn.execute("SELECT count(*) FROM readmodel.customers").fetchone() == before
        assert notices == []  # no page to apply, and nothing emptied
    finally:
        stack.start_worker()
    assert [client.get(f"/customers/{c}").status_code for c in customers] == [200, 200]
    assert client.get(f"/customers/{later}").status_code == 404  # the earlier projector skipped it, as it claimed


def test_a_command_after_the_store_is_emptied_in_place_waits_for_the_new_stores_projection(
    stack: Stack, client: TestClient
) -> None:
    """TRUNCATE ... RESTART IDENTITY keeps the table (and its OID): what tells the store changed is
    that it no longer holds the event at the read model's position."""
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    first = [register(client)[0] for _ in range(6)]
    assert services.watcher.position >= 10
    stack.stop_worker()
    try:
        with stack.connect() as conn:
            conn.execute("TRUNCATE ledger_events RESTART IDENTITY")
        deadline = time.monotonic() + 5
        while services.watcher.position != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert services.watcher.position == 0
        customer_id, header = register(client)
        assert header == "behind"
    finally:
        stack.start_worker()
    later_id, header = register(client)
    assert header == "current", stack.worker_log()[-3000:]
    assert [client.get(f"/customers/{c}").status_code for c in (customer_id, later_id, first[0])] == [200, 200, 404]


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
