"""Events survive the round trip through the typed mapper with their exact types and values."""

from __future__ import annotations

import json
import logging
from datetime import date
from decimal import Decimal
from uuid import uuid4

import msgspec
import pytest
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import Mapper, MapperDeserialisationError, StoredEvent

from ledger.application import Ledger
from ledger.domain import Customer, IdempotencyRecord, ImportJob, Loan, LoanTerms, customer_uuid
from ledger.mapper import TypedMapper
from ledger.policy import LoanRequest
from ledger.ports import FixedClock


def _ledger() -> Ledger:
    return Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"})


def _round_trip(mapper: Mapper, event: object) -> object:
    return mapper.to_domain_event(mapper.to_stored_event(event))  # type: ignore[arg-type]


def _started(files_digest: str = "") -> ImportJob.Started:
    job = ImportJob.request(uuid4(), "c.xlsx", "l.xlsx")
    job.start(total_rows=10, files_digest=files_digest)
    _requested, started = job.collect_events()
    return started  # type: ignore[return-value]


def test_the_ledger_stores_its_events_with_the_typed_mapper() -> None:
    assert isinstance(_ledger().mapper, TypedMapper)


def _imported(terms: LoanTerms, source_customer_id: int | None = None, monthly_income: Decimal = Decimal(50_000)) -> Customer:
    return Customer.import_history(
        customer_id=1,
        first_name="Aarav",
        last_name="Shah",
        age=30,
        phone_number="9876543210",
        monthly_income=monthly_income,
        approved_limit=Decimal("1800000"),
        loans=[terms],
        source_customer_id=source_customer_id,
    )


def test_typed_events_come_back_with_decimals_dates_and_nested_terms() -> None:
    mapper = _ledger().mapper
    terms = LoanTerms(
        loan_id=7,
        amount=Decimal("100000.005"),
        interest_rate=Decimal("12.5"),
        tenure=12,
        monthly_installment=Decimal("8908.33"),
        start_date=date(2024, 1, 31),
        end_date=date(2025, 1, 31),
        emis_paid=3,
        emis_paid_on_time=2,
    )
    customer = _imported(terms)
    customer.book_loan(terms)
    customer.record_repayment(7, date(2024, 2, 29), True)
    loan = Loan.book(customer_id=1, terms=terms)
    loan.record_repayment(date(2024, 3, 1), date(2024, 2, 29), Decimal("8908.33"))
    events = [*customer.collect_events(), *loan.collect_events()]
    assert len(events) == 5
    for event in events:
        stored = mapper.to_stored_event(event)
        assert b"_type_" not in stored.state
        back = mapper.to_domain_event(stored)
        assert type(back) is type(event)
        assert vars(back) == vars(event)
        for name, value in vars(event).items():
            assert type(getattr(back, name)) is type(value), name
    imported = mapper.to_domain_event(mapper.to_stored_event(events[0]))
    assert imported.loans == [terms] and isinstance(imported.loans[0].amount, Decimal)  # type: ignore[attr-defined]


def _customer_with_history() -> Customer:
    terms = LoanTerms(
        7, Decimal("100000.005"), Decimal("12.5"), 12, Decimal("8908.33"), date(2024, 1, 31), date(2025, 1, 31), 3, 2, 7007
    )
    customer = _imported(terms, source_customer_id=11, monthly_income=Decimal("50000.50"))
    customer.book_loan(msgspec.structs.replace(terms, loan_id=8, source_loan_id=None, emis_paid=0, emis_paid_on_time=0))
    customer.record_repayment(8, date(2024, 2, 29), True)
    customer.collect_events()
    return customer


def test_a_customer_snapshot_is_typed_json_and_reads_back_as_the_same_customer() -> None:
    """A customer's snapshot is read at every command on a long history: it goes by the typed
    JSON, as the events do, not through the library's JSON hook value by value."""
    mapper, customer = _ledger().mapper, _customer_with_history()
    snapshot = Customer.Snapshot.take(customer)
    stored = mapper.to_stored_event(snapshot)
    assert stored.topic == "ledger.domain:Customer.Snapshot" and b"_type_" not in stored.state
    back = mapper.to_domain_event(stored).mutate(None)  # type: ignore[attr-defined]
    assert vars(back) == vars(customer)
    for name, value in vars(customer).items():
        assert type(vars(back)[name]) is type(value), name
    assert [type(t) for t in back.loans] == [LoanTerms, LoanTerms] and type(back.loans[0].amount) is Decimal


def test_a_snapshot_the_library_wrote_still_reads() -> None:
    """Snapshots taken before the customer had its own snapshot class are the library's."""
    mapper, customer = _ledger().mapper, _customer_with_history()
    stored = Mapper.to_stored_event(mapper, Snapshot.take(customer))
    assert stored.topic == "eventsourcing.domain:Snapshot" and b"_type_" in stored.state
    assert vars(mapper.to_domain_event(stored).mutate(None)) == vars(customer)  # type: ignore[attr-defined]


def test_a_customer_attribute_its_snapshot_does_not_declare_fails_the_snapshot_not_the_read_back() -> None:
    customer = _customer_with_history()
    customer.nickname = "A"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="nickname"):
        Customer.Snapshot.take(customer)


def test_state_is_plain_json_not_the_librarys_tagged_objects() -> None:
    mapper = _ledger().mapper
    started = _started()
    state = json.loads(mapper.to_stored_event(started).state)
    assert state["total_rows"] == 10
    assert isinstance(state["timestamp"], str)  # the library's transcoder writes {"_type_": ..., "_data_": ...}


def test_events_stored_by_the_librarys_transcoder_still_load() -> None:
    ledger = _ledger()
    legacy = Mapper(transcoder=ledger.construct_transcoder())
    job = ImportJob.request(uuid4(), "c.xlsx", "l.xlsx")
    job.start(total_rows=10, files_digest="")
    for event in job.collect_events():
        stored = legacy.to_stored_event(event)
        assert b"_type_" in stored.state
        back = ledger.mapper.to_domain_event(stored)
        assert vars(back) == vars(event)


def test_free_form_state_keeps_the_librarys_transcoding() -> None:
    """An idempotent response holds Decimals under `Any`: typed decoding would turn them into strings."""
    mapper = _ledger().mapper
    record = IdempotencyRecord.record("key", "fingerprint", {"monthly_installment": Decimal("8908.33"), "approved": True})
    (recorded,) = record.collect_events()
    stored = mapper.to_stored_event(recorded)
    assert b"_type_" in stored.state
    back = mapper.to_domain_event(stored)
    assert back.response == {"monthly_installment": Decimal("8908.33"), "approved": True}  # type: ignore[attr-defined]
    assert isinstance(back.response["monthly_installment"], Decimal)  # type: ignore[attr-defined]


def test_a_plain_state_that_does_not_match_its_class_is_an_error_not_a_state_of_strings() -> None:
    mapper = _ledger().mapper
    started = _started()
    stored = mapper.to_stored_event(started)
    state = json.loads(stored.state)
    state["total_rows"] = "ten"
    broken = StoredEvent(stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode())
    with pytest.raises(MapperDeserialisationError, match="total_rows"):
        mapper.to_domain_event(broken)


def test_a_plain_state_records_its_class_version_and_an_older_one_is_upcast() -> None:
    """ImportJob.Started is at class_version 2 (it gained `files_digest`): a state written by the
    typed mapper at version 1 has neither the field nor a version, and reads as the library's
    upcast says; a state written now says its version and comes back as it was."""
    mapper = _ledger().mapper
    started = _started(files_digest="abc")
    stored = mapper.to_stored_event(started)
    state = json.loads(stored.state)
    assert (state["class_version"], state["files_digest"]) == (2, "abc") and b"_type_" not in stored.state
    assert vars(mapper.to_domain_event(stored)) == vars(started)
    del state["class_version"], state["files_digest"]  # as version 1 wrote it
    old = mapper.to_domain_event(
        StoredEvent(stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode())
    )
    assert vars(old) == {**vars(started), "files_digest": ""}
    assert "class_version" not in vars(old)


def _customer_with_a_snapshot(ledger: Ledger) -> int:
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", Decimal(10_000_000)).customer.customer_id
    for _ in range(50):  # the 50th event takes a snapshot
        ledger.book_loan(customer_id, LoanRequest(Decimal(10_000), Decimal(16), 24))
    assert ledger.snapshots is not None and list(ledger.snapshots.get(customer_uuid(customer_id)))
    return customer_id


def test_a_snapshot_this_version_cannot_read_leaves_its_customer_readable_from_the_events(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Snapshots are a shortcut. One written by another version of the code (a rollback, old and
    new processes side by side) must not make its customer unreadable, nor every command on it fail."""
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(date(2026, 11, 22)))
    customer_id = _customer_with_a_snapshot(ledger)
    expected = vars(ledger.get_customer(customer_id))
    assert ledger.snapshots is not None
    decode = ledger.snapshots.mapper.to_domain_event

    def unreadable(stored: StoredEvent) -> object:
        if stored.topic.endswith("Snapshot"):
            raise MapperDeserialisationError("missing required field `loans`")
        return decode(stored)

    monkeypatch.setattr(ledger.snapshots.mapper, "to_domain_event", unreadable)
    with caplog.at_level(logging.WARNING, logger="ledger.application"):
        assert vars(ledger.get_customer(customer_id)) == expected
        booked = ledger.book_loan(customer_id, LoanRequest(Decimal(10_000), Decimal(16), 24))
    assert booked.response["loan_approved"] is True
    assert "could not be read: replaying its events" in caplog.text


def test_a_snapshot_that_cannot_be_taken_does_not_fail_the_command_that_was_recorded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(cls: type, aggregate: object) -> object:
        raise TypeError("Customer has attributes CustomerState does not declare: ['kyc']")

    monkeypatch.setattr(Customer.Snapshot, "take", classmethod(refuse))
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(date(2026, 11, 22)))
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", Decimal(10_000_000)).customer.customer_id
    with caplog.at_level(logging.ERROR, logger="ledger.application"):
        for _ in range(50):  # the 50th booking's save would take the snapshot
            ledger.book_loan(customer_id, LoanRequest(Decimal(10_000), Decimal(16), 24))
    assert ledger.get_customer(customer_id).version == 51 and len(ledger.get_customer(customer_id).loans) == 50
    assert "no snapshot of" in caplog.text and "taking it failed" in caplog.text
