"""Projections on real PostgreSQL: rebuild, atomic pages, the periodic catch-up."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, ClassVar
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.application import Repository, project_aggregate
from eventsourcing.persistence import MapperDeserialisationError, OperationalError, StoredEvent
from starlette.testclient import TestClient

from infra.config import Settings
from infra.postgres import OrderedInsertRecorder, build_ledger, exclusive, setup_schema
from ledger.application import Ledger, PhoneNumberTaken
from ledger.domain import Customer, CustomerNotFound, ImportJob, customer_uuid
from ledger.policy import LoanRequest
from projections import schema as read_model
from projections.projector import REBUILD_PAGE_SIZE, STORE_RECREATED, Projector, rebuild
from tests.integration.conftest import Stack, catch_up_in_process, forget_task_state, registered_without_trigger
from tests.integration.test_import import follow, start
from workers import tasks

TABLES = {
    "customers": "customer_id",
    "loans": "loan_id",
    "repayments": "loan_id, installment",
    "import_jobs": "job_id",
    "tracking": "projection",
}


def snapshot(conn: psycopg.Connection, schema: str = "readmodel") -> dict[str, list[tuple[Any, ...]]]:
    return {table: conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {key}").fetchall() for table, key in TABLES.items()}


def table_setup(conn: psycopg.Connection, schema: str = "readmodel") -> list[tuple[Any, ...]]:
    """Each table's indexes (as they would be created in schema `s`) and storage options."""
    indexes = conn.execute(
        "SELECT tablename, replace(indexdef, %s, 's.') FROM pg_indexes WHERE schemaname = %s ORDER BY 1, 2",
        (f"{schema}.", schema),
    ).fetchall()
    options = conn.execute(
        "SELECT relname, reloptions FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind = 'r' ORDER BY 1",
        (schema,),
    ).fetchall()
    return indexes + options


def rebuilt(stack: Stack, page_size: int = REBUILD_PAGE_SIZE) -> int:
    """A rebuild as `ledger rebuild` runs it, on an application of its own: the events applied."""
    app, pool = build_ledger(stack.settings)
    try:
        return rebuild(app, stack.settings.database_url, page_size=page_size)
    finally:
        pool.close()
        app.close()


def wait_until_caught_up(stack: Stack, timeout: float = 30) -> int:
    app, pool = build_ledger(stack.settings)
    try:
        last = app.recorder.max_notification_id() or 0
    finally:
        pool.close()
        app.close()
    position = stack.wait_for("SELECT position FROM readmodel.tracking", last, timeout)
    assert position == last, f"projection stuck at {position} of {last}"
    return last


@pytest.fixture(scope="module")
def history(stack: Stack, client: TestClient) -> None:
    assert follow(client, start(client))["state"] == "completed"
    customer = client.post(
        "/register",
        json={"first_name": "Kai", "last_name": "Sen", "age": 33, "monthly_income": 90_000, "phone_number": 9600000001},
    ).json()
    for amount in (50_000, 60_000):
        booked = client.post(
            "/create-loan",
            json={"customer_id": customer["customer_id"], "loan_amount": amount, "interest_rate": 15, "tenure": 10},
        ).json()
        assert client.post(f"/loans/{booked['loan_id']}/repayments").status_code == 201
    client.post("/loans/5930/repayments")  # an imported loan's next installment
    wait_until_caught_up(stack)


def test_a_rebuild_gives_exactly_the_tables_incremental_projection_gave(stack: Stack, history: None) -> None:
    with stack.connect() as conn:
        incremental = snapshot(conn)
    applied = rebuilt(stack)
    with stack.connect() as conn:
        fresh = snapshot(conn)
    assert applied == incremental["tracking"][0][1]
    assert len(fresh["customers"]) == 301 and len(fresh["loans"]) == 784 and len(fresh["repayments"]) == 3
    assert fresh == incremental


def test_a_rebuild_in_many_pages_ends_with_the_live_tables_rows_indexes_and_options(stack: Stack, history: None) -> None:
    with stack.connect() as conn:
        incremental, setup = snapshot(conn), table_setup(conn)
    assert ("loans", "CREATE INDEX loans_customer_id_idx ON s.loans USING btree (customer_id)") in setup
    # Pages of 60 (read ahead on a second connection): the import's pages load into tables
    # without indexes, which are built before the first page that updates rows by key.
    applied = rebuilt(stack, page_size=60)
    with stack.connect() as conn:
        assert snapshot(conn) == incremental
        assert table_setup(conn) == setup
    assert applied > 60 * 10


@contextlib.contextmanager
def ledger_and_read_models(stack: Stack, **bulk: bool) -> Iterator[tuple[Ledger, psycopg.Connection]]:
    """The application, and fresh read-model schemas beside the live one (`name=True`: set up
    for a bulk load), dropped afterwards."""
    app, pool = build_ledger(stack.settings)
    try:
        with stack.connect() as conn:
            for schema, for_bulk in bulk.items():
                read_model.drop(conn, schema)
                read_model.create(conn, schema, bulk=for_bulk)
            try:
                yield app, conn
            finally:
                for schema in bulk:
                    read_model.drop(conn, schema)
    finally:
        pool.close()
        app.close()


def test_a_bulk_load_defers_the_indexes_until_it_is_finished(stack: Stack, history: None) -> None:
    """A page without updates goes into bare tables; `finish_bulk_load` gives them the live setup."""
    with ledger_and_read_models(stack, bulk_test=True, plain_test=False) as (app, conn):
        bulk = Projector(app, stack.settings.database_url, schema="bulk_test", page_size=100, bulk_load=True)
        plain = Projector(app, stack.settings.database_url, schema="plain_test", page_size=100)
        # The import's first 100 events: the job, customers with their loans, phone claims.
        stored = conn.execute(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM ledger_events ORDER BY notification_id LIMIT 100"
        ).fetchall()
        for projector in (bulk, plain):
            projector._prepare(conn)
            projector.apply_page(conn, projector.collect(stored))
        assert bulk.bulk_load, "a page without updates finished the bulk load"
        bare = table_setup(conn, "bulk_test")
        assert not [index for index in bare if "customers" in str(index) and "UNIQUE" in str(index)]
        assert ("loans", ["autovacuum_enabled=false"]) in bare
        bulk.finish_bulk_load(conn)
        assert not bulk.bulk_load
        assert table_setup(conn, "bulk_test") == table_setup(conn, "plain_test")
        loaded = snapshot(conn, "bulk_test")
        assert loaded == snapshot(conn, "plain_test")
        assert len(loaded["customers"]) > 20 and len(loaded["loans"]) > 50


class _Counting(psycopg.Cursor[Any]):
    """A cursor that keeps the statements it sends (one for each row of an `executemany`)."""

    sent: ClassVar[list[str]] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        self.sent.append(str(query))
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        params_seq = list(params_seq)
        self.sent += [str(query)] * len(params_seq)
        super().executemany(query, params_seq, **kwargs)


def test_a_small_page_of_new_customers_and_loans_is_one_statement_and_writes_what_the_pipeline_wrote(
    stack: Stack, history: None
) -> None:
    """After a command, a page of registrations and bookings commits in one statement: its rows,
    the versions of customers who already had one, the tracking position. Applied page by page
    (50 events each) over the whole store and two new pages, it gives the tables the pipelined
    INSERTs give, to the character and the cent."""
    app, pool = build_ledger(stack.settings)
    try:
        awkward = app.register_customer("Zoë \\ O'Brien", 'Tab\there "quoted"', 61, "9600000021", Decimal("123456.78"))
        plain = app.register_customer("Lee", "Ng", 40, "9600000022", Decimal(80_000))
        new_id, plain_id = awkward.customer.customer_id, plain.customer.customer_id
        registered = app.recorder.max_notification_id()
        terms = LoanRequest(amount=Decimal("100000.05"), interest_rate=Decimal("11.75"), tenure=7)
        for customer_id in (new_id, 14, plain_id):  # 14: an imported customer, whose version moves
            assert app.book_loan(customer_id, terms, None).response["loan_approved"]
    finally:
        pool.close()
        app.close()
    tasks.trigger_catch_up()  # the live read model gets them too, for the tests after this one
    with ledger_and_read_models(stack, one_statement=False, pipelined=False) as (app, conn):
        stored = conn.execute(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM ledger_events ORDER BY notification_id"
        ).fetchall()
        before = [event for event in stored if event[0] <= registered]
        pages = [before[i : i + 50] for i in range(0, len(before), 50)]
        pages.append([event for event in stored if event[0] > registered])  # the three bookings

        def last_page_statements(schema: str, autocommit: bool) -> list[str]:
            """Apply every page into `schema`: the statements the last one sent."""
            projector = Projector(app, stack.settings.database_url, schema=schema)
            with psycopg.connect(stack.settings.database_url, autocommit=autocommit, cursor_factory=_Counting) as applying:
                projector._prepare(applying)
                for page in pages:
                    _Counting.sent = []
                    projector.apply_page(applying, projector.collect(page))
            return _Counting.sent

        one = last_page_statements("one_statement", autocommit=True)
        assert len(one) == 1, one  # the bookings' page
        pipelined = last_page_statements("pipelined", autocommit=False)  # in a transaction: the pipeline
        assert len(pipelined) == 5, pipelined  # three INSERTs, the versions, the tracking
        written = snapshot(conn, "one_statement")
        assert written == snapshot(conn, "pipelined")
        customers = {
            row[0]: row
            for row in conn.execute(
                "SELECT customer_id, first_name, last_name, monthly_income, version FROM one_statement.customers"
            )
        }
        assert customers[new_id][1:4] == ("Zoë \\ O'Brien", 'Tab\there "quoted"', Decimal("123456.78"))
        assert registered < customers[new_id][4] < customers[14][4] < customers[plain_id][4] <= stored[-1][0]
        assert written["tracking"][0][1] == stored[-1][0]
        booked = conn.execute(
            "SELECT customer_id, loan_amount, interest_rate FROM one_statement.loans WHERE origin = 'booked' AND customer_id = ANY(%s)",
            ([new_id, 14, plain_id],),
        ).fetchall()
        # The rates a customer's score sets: 11.75 for 14, the slab's 12 for the new customers
        assert sorted(booked) == [(14, Decimal("100000.05"), Decimal("11.75"))] + [
            (customer_id, Decimal("100000.05"), Decimal("12")) for customer_id in sorted((new_id, plain_id))
        ]


class _Decoded(Projector):
    """A projector that takes every event through its decoded domain event."""

    def _copy_text(self, page: Any, state: bytes, position: int) -> bool:
        return False


class _CountingText(Projector):
    taken = 0

    def _copy_text(self, page: Any, state: bytes, position: int) -> bool:
        taken = super()._copy_text(page, state, position)
        self.taken += taken
        return taken


def test_imported_histories_as_copy_text_give_the_rows_their_decoded_events_give(stack: Stack, history: None) -> None:
    with ledger_and_read_models(stack, text_test=False, decoded_test=False) as (app, conn):
        url = stack.settings.database_url
        with (
            _CountingText(app, url, schema="text_test", page_size=100) as text,
            _Decoded(app, url, schema="decoded_test", page_size=100) as decoded,
        ):
            text.catch_up(wait=True)
            assert isinstance(text, _CountingText)
            decoded.catch_up(wait=True)
        # Every imported customer went as text, but those in a last page small enough for INSERTs.
        assert 250 < text.taken <= 300
        as_text = snapshot(conn, "text_test")
        assert as_text == snapshot(conn, "decoded_test")
        assert len(as_text["customers"]) >= 301 and len(as_text["loans"]) >= 784


def test_a_run_of_progress_reports_lands_as_the_last_count_with_every_issue_in_order(stack: Stack, history: None) -> None:
    app = stack.ledger()
    try:
        job = ImportJob.request(uuid4(), "c.xlsx", "l.xlsx")
        job.start(total_rows=9, files_digest="")
        job.progress(3, [{"row": 2, "reason": "a"}], 0, 0, [], [])
        job.progress(6, [], 0, 0, [], [])
        job.progress(9, [{"row": 8, "reason": "b"}, {"row": 9, "reason": "c"}], 0, 0, [], [])
        app.save(job)  # one transaction: the worker projects the run in one page
    finally:
        app.close()
    query = f"SELECT rows_done FROM readmodel.import_jobs WHERE job_id = '{job.id}'"
    assert stack.wait_for(query, 9) == 9
    with stack.connect() as conn:
        row = conn.execute("SELECT state, total_rows, issues FROM readmodel.import_jobs WHERE job_id = %s", (job.id,)).fetchone()
    assert row == ("running", 9, [{"row": 2, "reason": "a"}, {"row": 8, "reason": "b"}, {"row": 9, "reason": "c"}])


def test_a_failed_page_leaves_nothing_half_applied_and_the_next_run_completes_it(stack: Stack, history: None) -> None:
    settings: Settings = stack.settings
    stack.stop_worker()  # nothing else may advance the projection during this test
    app, pool = build_ledger(settings)
    try:
        customer = app.register_customer("Lia", "Roy", 29, "9600000002", Decimal(80_000))
        booking = app.book_loan(customer.customer.customer_id, LoanRequest(Decimal(40_000), Decimal(15), 10))
        loan_id = booking.response["loan_id"]
        with stack.connect() as conn:
            before = snapshot(conn)
            # Something already occupies the loan's row: applying the page must fail as a whole.
            conn.execute(
                "INSERT INTO readmodel.loans VALUES (%s, 1, NULL, 1, 1, 1, 1, '2020-01-01', '2020-02-01', 0, 0, 'blocker')",
                (loan_id,),
            )
        with pytest.raises(psycopg.errors.UniqueViolation), Projector(app, settings.database_url) as projector:
            projector.catch_up()
        with stack.connect() as conn:
            after_failure = snapshot(conn)
            conn.execute("DELETE FROM readmodel.loans WHERE origin = 'blocker'")
        after_failure["loans"] = [row for row in after_failure["loans"] if row[-1] != "blocker"]
        assert after_failure == before  # the customer row of the same page was rolled back too
        with Projector(app, settings.database_url) as projector:
            projector.catch_up()
        with stack.connect() as conn:
            final = snapshot(conn)
        assert len(final["customers"]) == len(before["customers"]) + 1
        assert len(final["loans"]) == len(before["loans"]) + 1
        assert final["tracking"][0][1] == app.recorder.max_notification_id()
    finally:
        pool.close()
        app.close()
        stack.start_worker()


def test_events_written_without_a_trigger_are_projected_by_the_periodic_catch_up(stack: Stack, history: None) -> None:
    customer_id = registered_without_trigger(stack, "9600000003")
    started = time.monotonic()
    found = stack.wait_for(f"SELECT count(*) FROM readmodel.customers WHERE customer_id = {customer_id}", 1, timeout=15)
    assert found == 1, "beat's periodic catch-up did not project the event"
    assert time.monotonic() - started < 15


def test_a_recreated_event_store_empties_the_read_model_instead_of_skipping(stack: Stack, history: None) -> None:
    stack.stop_worker()
    try:
        with stack.connect() as conn:
            conn.execute("ALTER TABLE ledger_events RENAME TO ledger_events_old")
            conn.execute("CREATE TABLE ledger_events (LIKE ledger_events_old INCLUDING ALL)")
            # The new store holds only its first 100 events: fewer than the read model has seen.
            conn.execute("INSERT INTO ledger_events SELECT * FROM ledger_events_old WHERE notification_id <= 100")
            expected = conn.execute(
                "SELECT count(*) FROM ledger_events WHERE topic LIKE '%Customer.HistoryImported' OR topic LIKE '%Customer.Registered'"
            ).fetchone()
        positions = [int(payload) for payload in catch_up_in_process(stack)]
        with stack.connect() as conn:
            customers = conn.execute("SELECT count(*) FROM readmodel.customers").fetchone()
            position = conn.execute("SELECT position FROM readmodel.tracking").fetchone()
        assert position == (100,)
        # The API's listeners hear the read model start again from 0 (api.readyourwrites), then the new store's pages.
        assert positions[0] == STORE_RECREATED and positions[-1] == 100 and positions == sorted(positions), positions
        assert expected is not None and 0 < expected[0] < 301
        assert customers == expected

        # The new store is an import alone: a rebuild updates no row by key, so its bulk load is
        # finished (indexes, autovacuum) only after the last page.
        with stack.connect() as conn:
            projected, setup = snapshot(conn), table_setup(conn)
        assert rebuilt(stack, page_size=60) == 100
        with stack.connect() as conn:
            assert snapshot(conn) == projected
            assert table_setup(conn) == setup
    finally:
        stack.start_worker()


def test_inserts_take_the_table_lock_whatever_the_environment_says(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's stored-function insert takes no lock, so events could commit out of ID order
    and the projection pass over one for good: the ledger pins it off."""
    monkeypatch.setenv("POSTGRES_ENABLE_DB_FUNCTIONS", "y")
    monkeypatch.setenv("LEDGER_POSTGRES_ENABLE_DB_FUNCTIONS", "y")
    app, pool = build_ledger(stack.settings)
    try:
        assert app.recorder.datastore.enable_db_functions is False  # type: ignore[attr-defined]
    finally:
        pool.close()
        app.close()


def test_a_save_waits_for_the_event_stores_table_lock_and_a_plain_insert_would_not(stack: Stack) -> None:
    """Events commit in notification-ID order because each save, one statement of a stored function
    (infra.postgres.OrderedInsertRecorder), takes the table's EXCLUSIVE lock first: a session holding
    ROW SHARE, which an INSERT alone passes, holds the save back until it lets go."""
    app, pool = build_ledger(stack.settings)
    try:
        assert isinstance(app.recorder, OrderedInsertRecorder)
        saved: list[int] = []
        with stack.connect() as holder, holder.transaction():
            holder.execute("LOCK TABLE ledger_events IN ROW SHARE MODE")
            with stack.connect() as other, other.transaction(force_rollback=True):  # an INSERT alone is not held back
                other.execute(
                    "INSERT INTO ledger_events (originator_id, originator_version, topic, state) VALUES (%s, 1, 'x', '')",
                    (uuid4(),),
                )
            saving = threading.Thread(
                target=lambda: saved.append(
                    app.register_customer("Ana", "Paz", 40, "9600000012", Decimal(60_000)).customer.customer_id
                )
            )
            saving.start()
            saving.join(timeout=1.5)
            assert saving.is_alive() and not saved  # waiting for the table's lock
        saving.join(timeout=15)
        assert saved and not app.recorder._without_function  # recorded, by the function, once the lock was free
    finally:
        pool.close()
        app.close()


def test_a_save_keeps_to_the_lock_timeout_its_process_was_given(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """POSTGRES_LOCK_TIMEOUT is the process's, as in the library's insert: not whatever `ledger
    setup` was given when it made the function."""
    monkeypatch.setenv("POSTGRES_LOCK_TIMEOUT", "1")
    app, pool = build_ledger(stack.settings)
    outcome: list[BaseException] = []

    def save() -> None:
        try:
            OrderedInsertRecorder.insert_events(app.recorder, [StoredEvent(uuid4(), 1, "test:Nothing", b"{}")])  # type: ignore[arg-type]
        except BaseException as error:
            outcome.append(error)

    try:
        with stack.connect() as holder, holder.transaction():
            holder.execute("LOCK TABLE ledger_events IN EXCLUSIVE MODE")
            started = time.monotonic()
            saving = threading.Thread(target=save)
            saving.start()
            saving.join(timeout=10)
            waited = time.monotonic() - started
        saving.join(timeout=10)
        assert 0.9 < waited < 10, waited  # it gave up after its second, while the lock was still held
        assert outcome and isinstance(outcome[0], OperationalError)
        assert isinstance(outcome[0].__cause__, psycopg.errors.LockNotAvailable)
    finally:
        pool.close()
        app.close()


def test_a_store_set_up_without_the_insert_function_is_written_the_librarys_way(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event store an earlier version set up has no such function: saves go the library's way
    (the same lock, in a pipeline) and say so, until `ledger setup` makes it; a running process
    then finds it when it next looks (FUNCTION_RETRY_SECONDS), without a restart."""
    with stack.connect() as conn:
        conn.execute("DROP FUNCTION ledger_events_insert_in_order")
    app, pool = build_ledger(stack.settings)
    recorder: Any = app.recorder
    try:
        app.register_customer("Ivo", "Lind", 52, "9600000013", Decimal(65_000))
        assert recorder._without_function
        with pytest.raises(PhoneNumberTaken):  # a conflict is still one
            app.register_customer("Eva", "Lind", 50, "9600000013", Decimal(65_000))
        assert "run `ledger setup`" in caplog.text
        setup_schema(stack.settings)
        app.register_customer("Eva", "Lind", 50, "9600000014", Decimal(65_000))
        assert recorder._without_function  # it looks again only after FUNCTION_RETRY_SECONDS
        monkeypatch.setattr(OrderedInsertRecorder, "FUNCTION_RETRY_SECONDS", 0.0)
        caplog.clear()
        app.register_customer("Ola", "Lind", 48, "9600000016", Decimal(65_000))
        assert not recorder._without_function and "run `ledger setup`" not in caplog.text
        with pytest.raises(PhoneNumberTaken):
            app.register_customer("Ola", "Berg", 48, "9600000016", Decimal(65_000))
    finally:
        pool.close()
        app.close()
        setup_schema(stack.settings)


def test_a_command_reads_a_customers_latest_snapshot_and_later_events_in_one_statement(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's repository reads a snapshot, then the events after it: two round trips in
    every command. On PostgreSQL one statement reads both (OrderedInsertRecorder.select_latest),
    and the customer it gives is the one the library's two reads give."""
    app, pool = build_ledger(stack.settings)
    try:
        recorder = app.recorder
        assert isinstance(recorder, OrderedInsertRecorder) and app.snapshots is not None
        snapshots = app.snapshots.recorder
        customer_id = app.register_customer("Ada", "Snap", 40, "9600000015", Decimal(10_000_000)).customer.customer_id
        uuid = customer_uuid(customer_id)
        request = LoanRequest(Decimal(10_000), Decimal(16), 12)

        def library_read() -> Customer:
            return Repository._reconstruct_aggregate(app.repository, uuid, None, project_aggregate)

        # no snapshot yet: every event
        app.book_loan(customer_id, request, None)
        assert recorder.select_latest(uuid, snapshots) == (None, recorder.select_events(uuid))
        for _ in range(48):  # the 50th event: a snapshot at 50, and no event after it
            app.book_loan(customer_id, request, None)
        snapshot, after = recorder.select_latest(uuid, snapshots)
        assert snapshot is not None and snapshot.originator_version == 50 and after == []
        assert snapshot == snapshots.select_events(uuid, desc=True, limit=1)[0]
        for _ in range(3):
            app.book_loan(customer_id, request, None)
        snapshot, after = recorder.select_latest(uuid, snapshots)
        assert snapshot is not None and snapshot.originator_version == 50
        assert after == recorder.select_events(uuid, gt=50) and [e.originator_version for e in after] == [51, 52, 53]

        # a command's read goes through it alone, and gives what the library's reads give
        monkeypatch.setattr(snapshots, "select_events", lambda *a, **k: pytest.fail("the snapshot read on its own"))
        customer = app.get_customer(customer_id)
        assert customer.version == 53 and len(customer.loans) == 52
        monkeypatch.undo()
        assert vars(customer) == vars(library_read())
        seen: list[int] = []

        def counting(aggregate: Any, events: Any) -> Any:  # a projector function of the caller's own
            events = list(events)
            seen.extend(e.originator_version for e in events)
            return project_aggregate(aggregate, events)

        assert vars(app.repository.get(uuid, projector_func=counting)) == vars(customer) and seen == [50, 51, 52, 53]
        with pytest.raises(CustomerNotFound):
            app.get_customer(10**9)

        # many at once (a re-import's batch): the same snapshot and events, the same customers; one
        # with no snapshot, and an ID with no events, which is left out
        fresh = customer_uuid(app.register_customer("Bo", "Snap", 41, "9600000017", Decimal(50_000)).customer.customer_id)
        missing = customer_uuid(10**9)
        latest = recorder.select_latest_many([uuid, fresh, missing, uuid], snapshots)
        assert latest == {uuid: (snapshot, after), fresh: (None, recorder.select_events(fresh))}
        many = app.aggregates({uuid, fresh, missing})
        assert many.keys() == {uuid, fresh} and vars(many[uuid]) == vars(customer)
        assert vars(many[fresh]) == vars(app.repository.get(fresh))
        assert app.aggregates(set()) == {}
        decode = app.snapshots.mapper.to_domain_event

        def unreadable(stored: StoredEvent) -> object:  # a snapshot another version of the code wrote
            if stored.topic.endswith("Snapshot"):
                raise MapperDeserialisationError("missing required field `loans`")
            return decode(stored)

        monkeypatch.setattr(app.snapshots.mapper, "to_domain_event", unreadable)
        assert vars(app.aggregates({uuid, fresh})[uuid]) == vars(customer)  # read from its events, as `get` does
        monkeypatch.undo()

        # snapshots kept through another datastore (another application's) cannot be joined: read the library's way
        other = Ledger(stack.settings.eventsourcing_env())
        try:
            assert other.snapshots is not None and other.snapshots.recorder.datastore is not recorder.datastore  # type: ignore[attr-defined]
            assert recorder.select_latest(uuid, other.snapshots.recorder) == (snapshot, after)  # type: ignore[arg-type]
            assert recorder.select_latest_many([uuid, missing], other.snapshots.recorder) == {uuid: (snapshot, after)}  # type: ignore[arg-type]
        finally:
            other.close()
    finally:
        pool.close()
        app.close()


def test_sessions_that_hold_locks_have_the_server_probe_their_peer(stack: Stack) -> None:
    """A worker whose host vanishes holds the projection lock (every catch-up then does nothing)
    or the import lock until the server notices: after two hours and more with the kernel's
    keepalive defaults, about a minute with these."""
    probes = "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')"
    app, pool = build_ledger(stack.settings)
    try:
        with Projector(app, stack.settings.database_url) as projector, projector.connect() as conn:
            assert conn.execute(probes).fetchone() == ("30", "10", "3")
        with exclusive(stack.settings, wait=True) as lock:
            assert lock is not None
            assert lock.execute(probes).fetchone() == ("30", "10", "3")
        with stack.connect() as plain:  # what the server gives a session by default, for contrast
            assert plain.execute(probes).fetchone() != ("30", "10", "3")
    finally:
        pool.close()
        app.close()


def test_a_read_model_made_by_an_earlier_version_gets_the_columns_this_one_reads(stack: Stack, history: None) -> None:
    """A rebuild by the version before (a rolling deploy) makes tracking without the columns that
    say where its event is: this version's projector adds them and goes on, rather than failing
    on every run until someone runs `ledger setup`."""
    tracked = ("identified_at", "originator_id", "originator_version")
    stack.stop_worker()
    try:
        catch_up_in_process(stack)  # what earlier tests recorded without a trigger, beat may not have projected yet
        with stack.connect() as conn:
            conn.execute("ALTER TABLE readmodel.tracking " + ", ".join(f"DROP COLUMN {c}" for c in tracked))
            conn.commit()
        customer_id = registered_without_trigger(stack, "9600000009")
        app, pool = build_ledger(stack.settings)
        try:
            with Projector(app, stack.settings.database_url) as projector:
                assert projector.catch_up() == 2  # the registration's two events (the customer, its phone's claim)
        finally:
            pool.close()
            app.close()
        with stack.connect() as conn:
            assert conn.execute("SELECT count(*) FROM readmodel.customers WHERE customer_id = %s", (customer_id,)).fetchone() == (
                1,
            )
            columns = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'readmodel' AND table_name = 'tracking'"
            ).fetchall()
            assert set(tracked) <= {name for (name,) in columns}
    finally:
        stack.start_worker()


def test_commands_during_a_catch_up_queue_no_run_and_what_they_commit_is_applied_before_it_ends(
    stack: Stack, history: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trigger a command sets stays set until the run it queued ends: a command meanwhile
    queues no run of its own (it would only find the lock taken, or its events applied). What it
    commits after the run's last read is applied by the run's look once the trigger is cleared,
    not left for beat. After the run, a command queues one again."""
    stack.stop_worker()  # nothing else consumes the queue or advances the projection meanwhile
    broker = tasks.redis_client()
    real_catch_up = Projector.catch_up
    during: dict[str, Any] = {}

    def the_run_then_a_command(projector: Projector, *args: Any, **kwargs: Any) -> int | None:
        applied = real_catch_up(projector, *args, **kwargs)
        if not during:  # the run itself, not its look after clearing the trigger
            during["flag"] = broker.exists(tasks.PENDING_KEY)
            queued = broker.llen("celery")
            # A command committing after the run's last read, then asking for a run as every command does
            during["customer"] = registered_without_trigger(stack, "9600000011")
            during["triggered"] = tasks.trigger_catch_up()
            during["queued"] = broker.llen("celery") - queued
        return applied

    monkeypatch.setattr(Projector, "catch_up", the_run_then_a_command)
    forget_task_state()  # this module's database
    try:
        broker.set(tasks.PENDING_KEY, 1, ex=30)  # as the command that queued this run left it
        tasks.catch_up()
        assert during["flag"] == 1 and during["triggered"] is True
        assert during["queued"] == 0  # the running run applies it: no run queued
        with stack.connect() as conn:
            projected = conn.execute("SELECT count(*) FROM readmodel.customers WHERE customer_id = %s", (during["customer"],))
            assert projected.fetchone() == (1,)  # by the run's last look, as it ended
            assert (
                conn.execute("SELECT max(notification_id) FROM ledger_events").fetchone()
                == conn.execute("SELECT position FROM readmodel.tracking").fetchone()
            )
        assert not broker.exists(tasks.PENDING_KEY)
        queued = broker.llen("celery")
        assert tasks.trigger_catch_up() and broker.llen("celery") == queued + 1  # the run over, a command queues one
    finally:
        broker.delete("celery", tasks.PENDING_KEY)
        forget_task_state()
        stack.start_worker()


def test_a_trigger_whose_run_could_not_be_queued_is_cleared(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set with no run queued, it would keep every command of the next 30 s from queueing one."""
    broker = tasks.redis_client()
    broker.delete(tasks.PENDING_KEY)

    def broker_gone(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker went away between the flag and the message")

    monkeypatch.setattr(tasks.catch_up, "apply_async", broker_gone)
    assert tasks.trigger_catch_up() is False  # the command answers that the read model is behind
    assert not broker.exists(tasks.PENDING_KEY)
