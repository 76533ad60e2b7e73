"""The Ledger application on eventsourcing's in-memory store: a narrated scenario per rule."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import date, timedelta
from decimal import Decimal as D
from typing import Any
from uuid import UUID, uuid4, uuid5

import msgspec
import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, OperationalError, RecordConflictError

from ledger.application import Ledger
from ledger.domain import (
    NAMESPACE,
    Customer,
    CustomerNotFound,
    IdempotencyKeyReused,
    ImportFilesChanged,
    ImportJob,
    InvalidRepayment,
    Loan,
    LoanClosed,
    LoanNotFound,
    LoanTerms,
    OutcomeUnknown,
    PhoneNumberTaken,
    RowIssue,
    customer_uuid,
    file_customer_uuid,
    idempotency_uuid,
    loan_uuid,
    phone_uuid,
)
from ledger.history import CUSTOMER_COLUMNS, CustomerRecord, LoanRecord, parse_customer
from ledger.importing import HistoryImport
from ledger.policy import Decision, LoanRequest
from ledger.ports import FixedClock

TODAY = date(2026, 11, 22)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(TODAY))


def test_aggregate_ids_stay_the_standard_uuid5_of_their_names() -> None:
    """Stored aggregates are found by these IDs: they must never change."""
    assert customer_uuid(1) == UUID("02b63026-5073-57f9-91b5-b226d6ef32c4")
    assert loan_uuid(57818) == UUID("14eaa4a2-a7d5-58de-9b84-27356ae72bf2")
    for n in (0, 1, 301, 10**12):
        assert customer_uuid(n) == uuid5(NAMESPACE, f"customer:{n}")
        assert loan_uuid(n) == uuid5(NAMESPACE, f"loan:{n}")
        assert file_customer_uuid(n) == uuid5(NAMESPACE, f"file-customer:{n}")
    for text in ("9876543210", "k\u00e9y-\u2713"):
        assert phone_uuid(text) == uuid5(NAMESPACE, f"phone:{text}")
        assert idempotency_uuid(text) == uuid5(NAMESPACE, f"idempotency:{text}")
    assert customer_uuid(7).version == 5


def test_registration_records_the_customer_with_a_limit_from_income(ledger: Ledger) -> None:
    registered = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(12_500))
    customer = ledger.get_customer(registered.customer.customer_id)
    assert (customer.first_name, customer.approved_limit, customer.loans) == ("Ann", D(500_000), [])
    assert registered.last_position is not None


def test_a_second_registration_with_the_same_phone_is_refused_and_records_nothing(ledger: Ledger) -> None:
    ledger.register_customer("Ann", "Lee", 30, "9876543210", D(12_500))
    before = ledger.recorder.max_notification_id()
    with pytest.raises(PhoneNumberTaken):
        ledger.register_customer("Bob", "Roy", 40, "9876543210", D(90_000))
    assert ledger.recorder.max_notification_id() == before


def lose_the_first_answer(ledger: Ledger) -> list[int]:
    """The next insert commits, then its connection breaks before the answer comes: the recorder
    tries it again. Returns the list of tries made, filled as they happen."""
    insert = ledger._insert_once
    tries: list[int] = []

    def insert_once(stored_events: Any, **kwargs: Any) -> Any:
        tries.append(len(stored_events))
        result = insert(stored_events, **kwargs)
        if len(tries) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return result

    ledger._insert_once = insert_once
    return tries


def test_a_save_that_meets_its_own_recorded_events_is_recorded_and_another_conflict_is_not(ledger: Ledger) -> None:
    """A retried insert whose first try committed meets the very same events (tests/stress has
    the real fault: a commit's answer lost on the wire). That is a save, not a concurrent change."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    customer = ledger.get_customer(customer_id)
    customer.book_loan(_terms(900))
    loan = Loan.book(customer_id, _terms(900))
    tries = lose_the_first_answer(ledger)
    before = ledger.recorder.max_notification_id() or 0
    assert ledger._save_once(customer, loan) == {"last_position": before + 2, "events": 2}
    assert tries == [2, 2] and ledger.recorder.max_notification_id() == before + 2

    rival = ledger.get_customer(customer_id)
    mine = copy.deepcopy(rival)
    rival.book_loan(_terms(901))
    ledger.save(rival)
    mine.book_loan(_terms(902))  # the same version, another event: a real conflict
    with pytest.raises(RecordConflictError):
        ledger._save_once(mine)
    assert ledger.recorder.max_notification_id() == before + 3


def test_a_first_try_that_meets_events_just_like_its_own_is_a_conflict(ledger: Ledger) -> None:
    """Two keyless repayments of one loan at once make the same events, timestamps aside; with the
    timestamps alike too, only the retry tells a save's own events from the other writer's."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    customer = ledger.get_customer(customer_id)
    customer.book_loan(_terms(900))
    twin = copy.deepcopy(customer)  # the same pending event, to the microsecond
    ledger.save(twin)
    with pytest.raises(RecordConflictError):
        ledger._save_once(customer)


def test_a_lost_answer_at_the_50th_event_still_snapshots_and_a_snapshot_already_stored_is_no_conflict(ledger: Ledger) -> None:
    customer_id = ledger.register_customer("Raj", "Kumar", 40, "9876500001", D(10_000_000)).customer.customer_id
    for _ in range(48):
        ledger.book_loan(customer_id, LoanRequest(D(10_000), D(16), 12))
    assert ledger.snapshots is not None
    customer = ledger.get_customer(customer_id)
    customer.book_loan(_terms(900))  # version 50: a snapshot is due
    lose_the_first_answer(ledger)  # the first try: the events, then its answer lost
    ledger._save_once(customer)
    assert [s.originator_version for s in ledger.snapshots.get(customer_uuid(customer_id))] == [50]

    other = ledger.register_customer("Raj", "Kumar", 40, "9876500002", D(10_000_000)).customer.customer_id
    for _ in range(48):
        ledger.book_loan(other, LoanRequest(D(10_000), D(16), 12))
    customer = ledger.get_customer(other)
    customer.book_loan(_terms(901))
    snapshots = ledger.snapshots.recorder
    insert_snapshot = snapshots.insert_events

    def stored_then_tried_again(stored_events: Any, **kwargs: Any) -> Any:
        insert_snapshot(stored_events, **kwargs)  # the first try, committed, its answer lost
        return insert_snapshot(stored_events, **kwargs)  # the recorder's retry meets it

    snapshots.insert_events = stored_then_tried_again  # type: ignore[method-assign]
    ledger._save_once(customer)
    assert [s.originator_version for s in ledger.snapshots.get(customer_uuid(other))] == [50]


def test_a_command_whose_save_meets_a_database_outage_says_it_may_have_been_recorded(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder gives up after its retries (tests/stress has the real outage at a commit)."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    loan_id = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6)).response["loan_id"]

    def down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("couldn't get a connection after 2.00 sec")

    monkeypatch.setattr(ledger.recorder, "insert_events", down)
    with pytest.raises(OutcomeUnknown, match="while this command was being recorded, so it may have been"):
        ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6), "key-1")
    with pytest.raises(OutcomeUnknown):
        ledger.record_repayment(loan_id)
    with pytest.raises(OutcomeUnknown):
        ledger.register_customer("Bob", "Roy", 40, "9876543211", D(90_000))
    with pytest.raises(OutcomeUnknown, match=r"import job .* may have been"):
        ledger.request_import("/x/c.xlsx", "/x/l.xlsx")


def test_an_integrity_error_that_is_no_conflict_is_raised_at_once_not_answered_as_contention(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store whose schema was changed by hand refuses the events with a NOT NULL violation: that
    is no concurrent writer, and retrying it for 503 "contention" hid the fault."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    calls = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        try:
            raise psycopg.errors.NotNullViolation('null value in column "channel" of relation "ledger_events"')
        except psycopg.Error as error:
            raise IntegrityError(str(error)) from error  # as the library's PostgreSQL recorder does

    monkeypatch.setattr(ledger.recorder, "insert_events", refuse)
    with pytest.raises(IntegrityError, match="null value"):
        ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6))
    assert len(calls) == 1
    # An import: its job's start goes in, its batch is refused once, not planned and saved 200 times.
    monkeypatch.undo()
    real = ledger.recorder.insert_events
    inserts = []

    def start_then_refuse(events: Any, **kwargs: Any) -> Any:
        inserts.append(1)
        return real(events, **kwargs) if len(inserts) == 1 else refuse()

    monkeypatch.setattr(ledger.recorder, "insert_events", start_then_refuse)
    with pytest.raises(IntegrityError, match="null value"):
        ledger.import_history(job_id, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50)], [], batch_size=2)
    assert len(inserts) == 2


def test_a_snapshot_the_database_cannot_take_leaves_the_booking_recorded_and_answered(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id = ledger.register_customer("Raj", "Kumar", 40, "9876500001", D(10_000_000)).customer.customer_id
    for _ in range(48):
        ledger.book_loan(customer_id, LoanRequest(D(10_000), D(16), 12))
    assert ledger.snapshots is not None

    tried: list[Any] = []

    def down(*args: Any, **kwargs: Any) -> None:
        tried.append(args)
        raise OperationalError("the connection broke")

    monkeypatch.setattr(ledger.snapshots, "put", down)
    booked = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(16), 12))  # the 50th event: a snapshot is due
    assert len(tried) == 1
    assert booked.response["loan_approved"] is True
    assert ledger.get_customer(customer_id).version == 50


def _terms(loan_id: int) -> LoanTerms:
    return LoanTerms(
        loan_id=loan_id,
        amount=D(1000),
        interest_rate=D(12),
        tenure=12,
        monthly_installment=D("88.85"),
        start_date=TODAY,
        end_date=date(2027, 11, 22),
    )


def test_every_event_the_ledger_saves_reads_back_equal_so_a_lost_answer_is_recognised() -> None:
    """`_save_once` knows its own events by equality with what the store holds: that must hold for
    every kind of event, with every field (Decimals, dates, loan terms, timestamps) read back."""
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(date(2020, 6, 1)))
    encoded: list[Any] = []
    to_stored_event = ledger.mapper.to_stored_event
    ledger.mapper.to_stored_event = lambda event: encoded.append(event) or to_stored_event(event)  # type: ignore[method-assign]
    open_loan = LoanRecord(2, 7, 50, D("10000.10"), 12, D("10.5"), D(880), 3, date(2020, 1, 1), date(2021, 1, 1))
    run_import(ledger, [customer_row(2, 7, "9000000007")], [open_loan])
    run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(3, 7, 60)])
    ledger.record_repayment(50, date(2020, 5, 1))
    ledger.record_repayment(50, date(2020, 5, 2), "pay-1")
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D("100000.50")).customer.customer_id
    ledger.book_loan(customer_id, LoanRequest(D("100000.25"), D("8.5"), 12), "key-1")
    job_id, _ = ledger.request_import("/x/c.xlsx", "/x/l.xlsx", uuid4())
    ledger.fail_import(job_id, "the file is gone")
    kinds = {type(event).__qualname__ for event in encoded}
    assert kinds >= {
        "Customer.Registered", "Customer.LoanBooked", "Customer.HistoryImported", "Customer.HistoryExtended",
        "Customer.RepaymentRecorded", "Loan.Booked", "Loan.Opened", "Loan.RepaymentRecorded", "PhoneNumber.Claimed",
        "IdempotencyRecord.Recorded", "ImportJob.Requested", "ImportJob.Started", "ImportJob.Progressed",
        "ImportJob.Completed", "ImportJob.Failed",
    }, kinds  # fmt: skip
    assert [event for event in encoded if not ledger._recorded(event)] == []


def test_a_registration_with_an_idempotency_key_answers_a_repeat_with_the_same_customer(ledger: Ledger) -> None:
    first = ledger.register_customer("Ann", "Lee", 30, "9876543210", D("12500.00"), "reg-1")
    position = ledger.recorder.max_notification_id()
    again = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(12_500), "reg-1")
    assert again.replayed and not first.replayed
    assert again.customer.customer_id == first.customer.customer_id
    assert ledger.recorder.max_notification_id() == position  # nothing more recorded
    with pytest.raises(IdempotencyKeyReused):
        ledger.register_customer("Ann", "Lee", 31, "9876543210", D(12_500), "reg-1")
    with pytest.raises(PhoneNumberTaken):  # without the key, the same body is a second registration
        ledger.register_customer("Ann", "Lee", 30, "9876543210", D(12_500))


def test_booking_records_the_loan_on_the_customer_and_as_a_loan(ledger: Ledger) -> None:
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    booking = ledger.book_loan(customer_id, LoanRequest(D(100_000), D(8), 12))
    assert booking.response["loan_approved"] is True
    loan: Loan = ledger.repository.get(loan_uuid(booking.response["loan_id"]))
    assert (loan.interest_rate, loan.start_date, loan.end_date, loan.emis_paid) == (D(12), TODAY, date(2027, 11, 22), 0)
    assert [terms.loan_id for terms in ledger.get_customer(customer_id).loans] == [loan.loan_id]


def test_an_unknown_customer_cannot_book(ledger: Ledger) -> None:
    with pytest.raises(CustomerNotFound):
        ledger.book_loan(404, LoanRequest(D(1000), D(12), 12))


def test_a_concurrent_booking_conflicts_and_the_loser_decides_again(ledger: Ledger) -> None:
    """Two requests load the customer at the same version; the second save conflicts,
    reloads the customer with the first loan booked and is refused by the 50% rule."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(30_000)).customer.customer_id
    request = LoanRequest(D(100_000), D(12), 12)  # EMI 8,884.88: one fits in 15,000, two do not
    decisions: list[Decision] = []
    decide_for = ledger.decide_for

    def decide_while_another_request_books(customer: Customer, req: LoanRequest, today: date | None = None) -> Decision:
        decision = decide_for(customer, req, today)
        decisions.append(decision)
        if len(decisions) == 1:
            ledger.decide_for = decide_for  # type: ignore[method-assign]
            assert ledger.book_loan(customer_id, request).response["loan_approved"] is True
            ledger.decide_for = decide_while_another_request_books  # type: ignore[method-assign]
        return decision

    ledger.decide_for = decide_while_another_request_books  # type: ignore[method-assign]
    outcome = ledger.book_loan(customer_id, request)
    assert decisions[0].approved is True  # on the stale state it looked affordable
    assert decisions[-1].approved is False  # after the conflict it decided again
    assert outcome.response["loan_approved"] is False
    assert len(ledger.get_customer(customer_id).loans) == 1


def test_a_booking_that_conflicts_keeps_the_loan_id_it_drew(ledger: Ledger) -> None:
    """Each retry after a conflict drew another loan ID: 500 bookings at once for one customer
    used about 34,000 (from a review)."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(300_000)).customer.customer_id
    request = LoanRequest(D(100_000), D(12), 12)
    decide_for = ledger.decide_for
    attempts = []

    def decide_while_another_request_books(customer: Customer, req: LoanRequest, today: date | None = None) -> Decision:
        attempts.append(customer.version)
        if len(attempts) == 1:
            ledger.decide_for = decide_for  # type: ignore[method-assign]
            assert ledger.book_loan(customer_id, request).response["loan_id"] == 1
            ledger.decide_for = decide_while_another_request_books  # type: ignore[method-assign]
        return decide_for(customer, req, today)

    ledger.decide_for = decide_while_another_request_books  # type: ignore[method-assign]
    assert ledger.book_loan(customer_id, request).response["loan_id"] == 2  # drew 2, conflicted, kept it
    assert len(attempts) == 2
    ledger.decide_for = decide_for  # type: ignore[method-assign]
    assert ledger.book_loan(customer_id, request).response["loan_id"] == 3
    assert [t.loan_id for t in ledger.get_customer(customer_id).loans] == [1, 2, 3]


def test_a_booking_whose_drawn_loan_id_was_taken_meanwhile_draws_another(ledger: Ledger) -> None:
    """An import may record a file's Loan ID that the sequence had handed a booking in flight: the
    booking's retry must not meet it again and again."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(300_000)).customer.customer_id
    next_loan_id = ledger.ids.next_loan_id
    taken = []

    def draw_then_an_import_takes_it() -> int:
        loan_id = next_loan_id()
        if not taken:  # the first draw: recorded by someone else before this booking saves
            taken.append(loan_id)
            ledger.save(Loan.book(99, _terms(loan_id)))
        return loan_id

    ledger.ids.next_loan_id = draw_then_an_import_takes_it  # type: ignore[method-assign]
    booked = ledger.book_loan(customer_id, LoanRequest(D(100_000), D(12), 12)).response["loan_id"]
    assert booked != taken[0] and [t.loan_id for t in ledger.get_customer(customer_id).loans] == [booked]


class TickingClock:
    """A clock whose every reading is a day later than the one before: midnight, every time."""

    def __init__(self, first: date) -> None:
        self.readings = 0
        self.first = first

    def today(self) -> date:
        self.readings += 1
        return self.first + timedelta(days=self.readings - 1)


def test_a_booking_starts_on_the_day_it_was_decided_on() -> None:
    """The decision read the clock, then the booking read it again for the start date: across
    midnight, a loan decided on one day's history started the next."""
    clock = TickingClock(TODAY)
    ticking = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock)
    customer_id = ticking.register_customer("Ann", "Lee", 30, "9876543210", D(30_000)).customer.customer_id
    decided_on = clock.today() + timedelta(days=1)  # the booking's first reading
    loan_id = ticking.book_loan(customer_id, LoanRequest(D(100_000), D(12), 12)).response["loan_id"]
    terms = ticking.get_customer(customer_id).loans[0]
    assert (terms.loan_id, terms.start_date, terms.end_date) == (loan_id, decided_on, decided_on.replace(year=2027))


def test_an_idempotency_key_returns_the_first_response_and_rejects_another_body(ledger: Ledger) -> None:
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    first = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6), "key-1")
    again = ledger.book_loan(customer_id, LoanRequest(D("10000.00"), D("14.0"), 6), "key-1")
    assert again.replayed and again.response == first.response
    assert len(ledger.get_customer(customer_id).loans) == 1
    with pytest.raises(IdempotencyKeyReused):
        ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 7), "key-1")


def customer_row(row: int, customer_id: int, phone: str) -> CustomerRecord:
    return CustomerRecord(row, customer_id, "F", "L", 40, phone, D(50_000), D(1_800_000))


def loan_row(row: int, customer_id: int, loan_id: int) -> LoanRecord:
    return LoanRecord(row, customer_id, loan_id, D(10_000), 12, D(10), D(880), 12, date(2020, 1, 1), date(2021, 1, 1))


def run_import(ledger: Ledger, customers: list[CustomerRecord], loans: list[LoanRecord]) -> dict[str, object]:
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    report = ledger.import_history(job_id, list(customers), list(loans), [], batch_size=2)  # it empties the lists
    return report.summary() | {"issues": [i.as_dict() for i in report.issues]}


def test_import_keeps_the_file_ids_and_rekeys_a_repeated_loan_id(ledger: Ledger) -> None:
    summary = run_import(
        ledger,
        [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008"), customer_row(4, 9, "9000000009")],
        [loan_row(2, 7, 50), loan_row(3, 8, 50), loan_row(4, 9, 51)],
    )
    assert summary["rekeyed_loans"] == [{"row": 3, "customer_id": 8, "file_loan_id": 50, "loan_id": 52}]
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50]
    assert [(t.loan_id, t.source_loan_id) for t in ledger.get_customer(8).loans] == [(52, 50)]
    assert ledger.register_customer("N", "C", 30, "9111111111", D(1000)).customer.customer_id == 10


def test_an_imported_loan_whose_payment_never_repays_takes_repayments(ledger: Ledger) -> None:
    """900 million at 100% over 600 months, nothing paid a month: its schedule's balance grew past
    28 digits, and its repayments raised decimal.InvalidOperation (a 500)."""
    never = LoanRecord(2, 7, 50, D(900_000_000), 600, D(100), D(0), 0, date(2025, 1, 1), date(2075, 1, 1))
    run_import(ledger, [customer_row(2, 7, "9000000007")], [never])
    first = ledger.record_repayment(50, date(2025, 2, 1)).response
    assert (first["installment"], first["amount"], first["repayments_left"]) == (1, D("0.00"), 599)


def test_importing_again_adds_nothing(ledger: Ledger) -> None:
    customers = [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008")]
    loans = [loan_row(2, 7, 50), loan_row(3, 8, 50)]
    run_import(ledger, customers, loans)
    events = ledger.recorder.max_notification_id() or 0
    summary = run_import(ledger, customers, loans)
    assert (summary["customers_imported"], summary["loans_imported"]) == (0, 0)
    assert (summary["customers_already_present"], summary["loans_already_present"]) == (2, 2)
    new_events = ledger.recorder.select_notifications(events, 100, inclusive_of_start=False)
    assert all("ImportJob" in n.topic for n in new_events)


def test_import_reports_a_phone_already_taken_and_a_loan_without_customer(ledger: Ledger) -> None:
    ledger.register_customer("Ann", "Lee", 30, "9000000007", D(10_000))
    summary = run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50), loan_row(3, 99, 51)])
    assert summary["issues"] == [
        {"file": "customers.xlsx", "row": 2, "reason": "Phone Number 9000000007 already belongs to another customer"},
        {
            "file": "loans.xlsx",
            "row": 2,
            "reason": "its customer row 2 was rejected: Phone Number 9000000007 already belongs to another customer",
        },
        {
            "file": "loans.xlsx",
            "row": 3,
            "reason": "Customer ID 99 has no accepted row in the customer file and is not in the ledger",
        },
    ]


def test_repayments_count_on_time_or_late_and_the_last_one_closes_the_loan() -> None:
    clock = FixedClock(date(2026, 1, 10))
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock)
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    loan_id = ledger.book_loan(customer_id, LoanRequest(D(30_000), D(12), 3)).response["loan_id"]
    with pytest.raises(InvalidRepayment, match="before the loan started"):
        ledger.record_repayment(loan_id, date(2026, 1, 9))
    with pytest.raises(InvalidRepayment, match="in the future"):
        ledger.record_repayment(loan_id, date(2026, 1, 11))
    first = ledger.record_repayment(loan_id, date(2026, 1, 10)).response  # due 2026-02-10: early is on time
    clock._today = date(2026, 6, 1)
    late = ledger.record_repayment(loan_id, date(2026, 3, 20)).response  # due 2026-03-10
    last = ledger.record_repayment(loan_id, date(2026, 4, 10), "pay-3").response  # due 2026-04-10: on the day
    assert [(r["installment"], r["on_time"], r["repayments_left"]) for r in (first, late, last)] == [
        (1, True, 2),
        (2, False, 1),
        (3, True, 0),
    ]
    assert last["loan_closed"] is True
    assert ledger.record_repayment(loan_id, date(2026, 4, 10), "pay-3").response == last  # the same key replays
    with pytest.raises(LoanClosed):
        ledger.record_repayment(loan_id)
    terms = ledger.get_customer(customer_id).loans[0]
    assert (terms.emis_paid, terms.emis_paid_on_time) == (3, 2)
    history = ledger.get_customer(customer_id).credit_history(date(2026, 6, 1))
    assert (history.current_loans, history.completed_loans, history.emis_due, history.emis_paid_on_time) == (0, 1, 3, 2)
    assert sum(r["amount"] for r in (first, late, last)) > D(30_000)


def test_installments_are_paid_in_turn_so_none_is_dated_before_the_one_paid_before_it() -> None:
    """A repayment dated before the last one recorded would make an installment paid late look on
    time (and lift the credit score): refused, and nothing is recorded."""
    clock = FixedClock(date(2026, 6, 1))
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock)
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    clock._today = date(2026, 1, 10)
    loan_id = ledger.book_loan(customer_id, LoanRequest(D(30_000), D(12), 3)).response["loan_id"]
    clock._today = date(2026, 6, 1)
    late = ledger.record_repayment(loan_id, date(2026, 3, 1)).response  # due 2026-02-10
    assert (late["installment"], late["on_time"]) == (1, False)
    with pytest.raises(InvalidRepayment, match="before installment 1, which was paid on 2026-03-01"):
        ledger.record_repayment(loan_id, date(2026, 2, 28))  # installment 2, due 2026-03-10: it would be on time
    loan = ledger.repository.get(loan_uuid(loan_id))
    assert (loan.version, loan.emis_paid) == (2, 1)
    same_day = ledger.record_repayment(loan_id, date(2026, 3, 1)).response
    assert (same_day["installment"], same_day["on_time"]) == (2, True)
    assert ledger.repository.get(loan_uuid(loan_id)).last_paid_on == date(2026, 3, 1)  # read back from its events


def test_a_file_customer_whose_id_was_taken_is_rekeyed_with_its_loans_and_reimport_adds_nothing(ledger: Ledger) -> None:
    registered = ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000)).customer  # takes customer ID 1
    customers, loans = [customer_row(2, 1, "9000000001")], [loan_row(2, 1, 50)]
    summary = run_import(ledger, customers, loans)
    assert summary["issues"] == []
    [rekeyed] = summary["rekeyed_customers"]  # type: ignore[misc]
    assert rekeyed["file_customer_id"] == 1 and rekeyed["customer_id"] > 1
    moved = ledger.get_customer(rekeyed["customer_id"])
    assert (moved.phone_number, moved.source_customer_id, [t.loan_id for t in moved.loans]) == ("9000000001", 1, [50])
    assert ledger.get_customer(1).first_name == registered.first_name
    again = run_import(ledger, customers, loans)
    assert (again["customers_imported"], again["loans_imported"], again["rekeyed_customers"]) == (0, 0, [])
    assert (again["customers_already_present"], again["loans_already_present"]) == (1, 1)


def test_a_reimported_customer_whose_name_or_phone_changed_is_the_same_customer_not_a_new_one(ledger: Ledger) -> None:
    """A customer imported under a file's Customer ID is that file customer, whatever its row says
    in a later file: the ledger keeps what it recorded, adds only the new loans, and reports the
    row's details it did not take."""
    customers, loans = [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008")], [loan_row(2, 7, 50)]
    run_import(ledger, customers, loans)
    corrected = [
        CustomerRecord(2, 7, "F", "Smith", 40, "9200000007", D(50_000), D(1_800_000)),  # other surname and phone
        CustomerRecord(3, 8, "Fay", "L", 40, "9000000008", D(50_000), D(1_800_000)),  # another first name
    ]
    events = ledger.recorder.max_notification_id() or 0
    again = run_import(ledger, corrected, [loan_row(2, 7, 50), loan_row(3, 7, 51), loan_row(4, 8, 52)])
    assert again["rekeyed_customers"] == [] and again["rekeyed_loans"] == []
    assert (again["customers_imported"], again["customers_already_present"]) == (0, 0)
    assert (again["loans_imported"], again["loans_already_present"]) == (2, 1)
    not_taken = ". A recorded customer is not changed: this row's details are not taken, and its loans not yet recorded are imported for the customer as recorded"
    assert again["issues"] == [
        {
            "file": "customers.xlsx",
            "row": 2,
            "reason": "Customer ID 7 is already recorded with other details: Last Name L recorded, Smith in this row,"
            " Phone Number 9000000007 recorded, 9200000007 in this row" + not_taken,
        },
        {
            "file": "customers.xlsx",
            "row": 3,
            "reason": "Customer ID 8 is already recorded with other details: First Name F recorded, Fay in this row" + not_taken,
        },
    ]
    seven, eight = ledger.get_customer(7), ledger.get_customer(8)
    assert (seven.last_name, seven.phone_number, [t.loan_id for t in seven.loans]) == ("L", "9000000007", [50, 51])
    assert (eight.first_name, [t.loan_id for t in eight.loans]) == ("F", [52])
    new_events = ledger.recorder.select_notifications(events, 100, inclusive_of_start=False)
    assert not any("PhoneNumber" in n.topic or "FileCustomer" in n.topic for n in new_events)  # no phone claimed, no ID moved


def test_a_reimported_loan_row_with_other_figures_is_reported_and_the_recorded_loan_kept(ledger: Ledger) -> None:
    """Importing a file again adds nothing; a row whose figures changed since (a corrected amount,
    a date) is not "already present": it is reported, and the recorded loan stays as it was."""
    customers = [customer_row(2, 7, "9000000007")]
    first = [loan_row(2, 7, 50), loan_row(3, 7, 51), loan_row(4, 7, 52), loan_row(5, 7, 52)]  # 52 twice: the second re-keyed
    run_import(ledger, customers, first)
    recorded = list(ledger.get_customer(7).loans)
    edited = [
        msgspec.structs.replace(first[0], amount=D("12000.50")),
        msgspec.structs.replace(first[1], start_date=date(2020, 2, 1), end_date=date(2021, 2, 1)),
        first[2],
        msgspec.structs.replace(first[3], tenure=24),
    ]
    events = ledger.recorder.max_notification_id() or 0
    again = run_import(ledger, customers, edited)
    kept = ". An imported loan is not changed: this row is not imported"
    assert again["issues"] == [
        {
            "file": "loans.xlsx",
            "row": 2,
            "reason": "Loan ID 50 is already recorded with other figures: Loan Amount 10000 recorded, 12000.5 in this row" + kept,
        },
        {
            "file": "loans.xlsx",
            "row": 3,
            "reason": "Loan ID 51 is already recorded with other figures: Date of Approval 2020-01-01 recorded, 2020-02-01 in"
            " this row, End Date 2021-01-01 recorded, 2021-02-01 in this row" + kept,
        },
        {
            "file": "loans.xlsx",
            "row": 5,
            "reason": f"Loan ID 52 is already recorded (as loan {recorded[3].loan_id}) with other figures: Tenure 12"
            " recorded, 24 in this row" + kept,
        },
    ]
    assert (again["customers_already_present"], again["loans_already_present"], again["loans_imported"]) == (1, 1, 0)
    assert ledger.get_customer(7).loans == recorded
    assert topics_after(ledger, events) == []  # nothing recorded but the job
    unchanged = run_import(ledger, customers, first)  # the rows as first imported: present, however often repeated
    assert (unchanged["issues"], unchanged["loans_already_present"]) == ([], 4)


def test_reimported_rows_of_a_repeated_loan_id_are_matched_one_to_one_with_the_recorded_loans(ledger: Ledger) -> None:
    """A customer whose file gives one Loan ID to several loans: each row is matched with one
    recorded loan, exact matches first; a changed row is reported against the loan it stands for,
    and a row beyond the recorded loans is a new loan, as a first import would make it."""
    customers = [customer_row(2, 7, "9000000007")]
    small, large = loan_row(2, 7, 52), msgspec.structs.replace(loan_row(3, 7, 52), amount=D(20_000), monthly_payment=D(1760))
    run_import(ledger, customers, [small, large])
    recorded = list(ledger.get_customer(7).loans)
    moved = recorded[1].loan_id
    assert [(t.loan_id, t.amount) for t in recorded] == [(52, D(10_000)), (moved, D(20_000))]

    longer = msgspec.structs.replace(large, tenure=24)  # only the second row changed
    again = run_import(ledger, customers, [small, longer])
    assert [i["reason"] for i in again["issues"]] == [  # type: ignore[attr-defined]
        f"Loan ID 52 is already recorded (as loan {moved}) with other figures: Tenure 12 recorded, 24 in this row."
        " An imported loan is not changed: this row is not imported"
    ]
    assert (again["loans_already_present"], again["loans_imported"]) == (1, 0)

    swapped = run_import(ledger, customers, [large, small])  # the same loans in another order
    assert (swapped["issues"], swapped["loans_already_present"]) == ([], 2)
    twice = run_import(
        ledger, customers, [small, msgspec.structs.replace(small, row=3)]
    )  # the first matches 52; the second is not the other loan
    assert [i["row"] for i in twice["issues"]] == [3] and twice["loans_already_present"] == 1  # type: ignore[index]

    third = msgspec.structs.replace(loan_row(4, 7, 52), amount=D(5_000), monthly_payment=D(440))
    more = run_import(ledger, customers, [small, large, third])  # a third loan under the ID: new, as a first import makes it
    assert (more["issues"], more["loans_already_present"], more["loans_imported"]) == ([], 2, 1)
    [rekeyed] = more["rekeyed_loans"]  # type: ignore[misc]
    assert (rekeyed["row"], rekeyed["file_loan_id"]) == (4, 52) and rekeyed["loan_id"] > moved
    assert [t.amount for t in ledger.get_customer(7).loans] == [D(10_000), D(20_000), D(5_000)]


def test_a_reimport_draws_new_loan_ids_only_for_the_rows_it_imports(ledger: Ledger) -> None:
    """A re-import's recorded rows keep no ID of the file (another loan holds each), but need none:
    they are counted present. Drawing one for each wasted them (a review: 784 IDs drawn for one
    re-keyed loan on the reference files)."""
    customers = [customer_row(2, 7, "9000000007")]
    first = [loan_row(2, 7, 50), loan_row(3, 7, 51), loan_row(4, 7, 52), loan_row(5, 7, 53)]
    run_import(ledger, customers, first)
    again = run_import(ledger, customers, [*first, msgspec.structs.replace(loan_row(6, 7, 53), amount=D(5_000))])
    [rekeyed] = again["rekeyed_loans"]  # type: ignore[misc]
    assert (again["loans_already_present"], again["loans_imported"]) == (4, 1)
    assert ledger.ids.next_loan_id() == rekeyed["loan_id"] + 1  # no ID drawn and left unused


@pytest.mark.parametrize("edited_first", [True, False])
def test_a_recorded_customers_row_with_another_customers_phone_takes_nothing_from_that_customer(
    ledger: Ledger, edited_first: bool
) -> None:
    """A re-imported row that gives customer 7 customer 8's phone is reported, and 7 keeps the
    recorded phone: the row claims no phone, so 8's own row is not "a repeat" of it, and both
    customers' new loans are imported, whichever row comes first (a review: 8's correct row and
    new loan were refused when 7's row came first)."""
    seven, eight = customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008")
    run_import(ledger, [seven, eight], [loan_row(2, 7, 50), loan_row(3, 8, 60)])
    edited = msgspec.structs.replace(seven, phone_number="9000000008")
    rows = [edited, eight] if edited_first else [msgspec.structs.replace(eight, row=2), msgspec.structs.replace(edited, row=3)]
    again = run_import(ledger, rows, [loan_row(2, 7, 50), loan_row(3, 8, 60), loan_row(4, 7, 51), loan_row(5, 8, 61)])
    edited_row = 2 if edited_first else 3
    assert [(i["row"], i["reason"].split(":")[0]) for i in again["issues"]] == [  # type: ignore[attr-defined]
        (edited_row, "Customer ID 7 is already recorded with other details")
    ]
    assert "Phone Number 9000000007 recorded, 9000000008 in this row" in again["issues"][0]["reason"]  # type: ignore[index]
    assert (again["customers_already_present"], again["loans_already_present"], again["loans_imported"]) == (1, 2, 2)
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50, 51]
    assert [t.loan_id for t in ledger.get_customer(8).loans] == [60, 61]
    assert (ledger.get_customer(7).phone_number, ledger.get_customer(8).phone_number) == ("9000000007", "9000000008")


def test_a_new_row_with_a_phone_the_ledger_holds_takes_nothing_from_its_holders_row(ledger: Ledger) -> None:
    """Row 2, a new customer 9 with customer 8's recorded phone, is refused by the ledger: it must
    not make 8's own row 3 "a repeat" of it and refuse 8's new loan (a review)."""
    eight = customer_row(3, 8, "9000000008")
    run_import(ledger, [eight], [loan_row(3, 8, 60)])
    again = run_import(
        ledger, [customer_row(2, 9, "9000000008"), eight], [loan_row(2, 9, 70), loan_row(3, 8, 60), loan_row(4, 8, 61)]
    )
    taken = "Phone Number 9000000008 already belongs to another customer"
    assert [(i["row"], i["reason"]) for i in again["issues"]] == [  # type: ignore[attr-defined]
        (2, taken),
        (2, f"its customer row 2 was rejected: {taken}"),
    ]
    assert [t.loan_id for t in ledger.get_customer(8).loans] == [60, 61]


def test_new_rows_reusing_a_recorded_loan_id_draw_their_ids_in_a_few_round_trips(ledger: Ledger) -> None:
    """Ten new rows under a Loan ID the customer's history holds: the batch guessed none would
    need an ID (a re-import's rows are present), and then drew one at a time (a review)."""
    customers = [customer_row(2, 7, "9000000007")]
    run_import(ledger, customers, [loan_row(2, 7, 50)])
    draws: list[int] = []
    draw = ledger.ids.next_loan_ids

    def counted(count: int) -> list[int]:
        draws.append(count)
        return draw(count)

    ledger.ids.next_loan_ids = counted  # type: ignore[method-assign]
    new = [msgspec.structs.replace(loan_row(n, 7, 50), amount=D(1_000 + n)) for n in range(3, 13)]
    again = run_import(ledger, customers, [loan_row(2, 7, 50), *new])
    assert (again["loans_imported"], len(again["rekeyed_loans"])) == (10, 10)  # type: ignore[arg-type]
    assert draws == [1, 2, 4, 8]  # 15 drawn for 10, in four round trips rather than ten


def test_two_new_rows_with_one_phone_keep_the_first_and_report_the_second(ledger: Ledger) -> None:
    summary = run_import(ledger, [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000007")], [loan_row(2, 8, 60)])
    assert [(i["row"], i["reason"]) for i in summary["issues"]] == [  # type: ignore[attr-defined]
        (3, "Phone Number 9000000007 repeats row 2"),
        (2, "its customer row 3 was rejected: Phone Number 9000000007 repeats row 2"),
    ]


def test_loan_rows_without_a_customer_row_go_only_to_the_files_customer(ledger: Ledger) -> None:
    """A loan row whose Customer ID has no customer row belongs to the lender's customer with that
    ID: never to a customer registered (or re-keyed) with it, however the IDs fall."""
    early = ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000)).customer  # holds customer ID 1
    unknown = (
        "Customer ID {0} has no accepted row in the customer file, and the ledger's customer {0} is not known to be the file's"
    )
    customers, loans = [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50), loan_row(3, 1, 51), loan_row(4, 9, 52)]
    first = run_import(ledger, customers, loans)
    not_in_ledger = "Customer ID 9 has no accepted row in the customer file and is not in the ledger"
    assert [i["reason"] for i in first["issues"]] == [unknown.format(1), not_in_ledger]  # type: ignore[attr-defined]
    assert ledger.get_customer(early.customer_id).loans == []
    # Customer ID 9 is the file's: a customer registered after the import gets an ID above it.
    later = ledger.register_customer("Late", "Comer", 30, "9222222222", D(10_000)).customer
    assert later.customer_id > 9
    again = run_import(ledger, customers, loans)
    assert (again["loans_imported"], again["customers_imported"]) == (0, 0)
    assert [i["reason"] for i in again["issues"]] == [unknown.format(1), not_in_ledger]  # type: ignore[attr-defined]
    # A later file with loan rows alone for customer 7, imported before: they are 7's.
    extended = run_import(ledger, [], [loan_row(2, 7, 60)])
    assert (extended["loans_imported"], extended["issues"]) == (1, [])
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50, 60]
    # And for customer 8, imported with no loans at all: theirs too.
    run_import(ledger, [customer_row(2, 8, "9000000008")], [])
    later_loans = run_import(ledger, [], [loan_row(2, 8, 70)])
    assert (later_loans["loans_imported"], later_loans["issues"]) == (1, [])
    assert [t.loan_id for t in ledger.get_customer(8).loans] == [70]


def test_a_file_customer_rekeyed_and_refused_for_its_phone_is_not_reported_as_rekeyed(ledger: Ledger) -> None:
    ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000))  # holds customer ID 1
    ledger.register_customer("Same", "Person", 30, "9000000005", D(10_000))  # holds the file customer's phone
    summary = run_import(ledger, [customer_row(2, 1, "9000000005")], [loan_row(2, 1, 50)])
    refused = "Phone Number 9000000005 already belongs to another customer"
    assert [i["reason"] for i in summary["issues"]] == [refused, f"its customer row 2 was rejected: {refused}"]  # type: ignore[attr-defined]
    assert (summary["rekeyed_customers"], summary["customers_imported"]) == ([], 0)
    assert file_customer_uuid(1) not in ledger.repository


def test_two_file_rows_with_one_phone_number_keep_the_first_and_report_the_second(ledger: Ledger) -> None:
    summary = run_import(
        ledger,
        [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000007"), customer_row(4, 9, "9000000009")],
        [loan_row(2, 9, 60), loan_row(3, 8, 61)],
    )
    repeated = "Phone Number 9000000007 repeats row 2"
    assert summary["issues"] == [
        {"file": "customers.xlsx", "row": 3, "reason": repeated},
        {"file": "loans.xlsx", "row": 3, "reason": f"its customer row 3 was rejected: {repeated}"},
    ]
    assert summary["customers_imported"] == 2 and summary["loans_imported"] == 1


def test_a_repeated_loan_id_whose_first_row_is_refused_with_its_customer_stays_with_the_next_row(ledger: Ledger) -> None:
    # Row 2's customer repeats a phone number: row 2 of the loans is refused with it, and loan 60
    # stays with the row that is imported (row 3), as if row 2 had not been there. Loan 61 too.
    # Customer 10 repeats a Loan ID of its own, in the batch (of 2) with customer 8's refused rows.
    customers = [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000007"), customer_row(4, 9, "9000000009")]
    loans = [loan_row(2, 8, 60), loan_row(3, 9, 60), loan_row(4, 8, 61), loan_row(5, 7, 61), loan_row(6, 9, 62)]
    summary = run_import(
        ledger, [*customers, customer_row(5, 10, "9000000010")], [*loans, loan_row(7, 10, 63), loan_row(8, 10, 63)]
    )
    repeated = "Phone Number 9000000007 repeats row 2"
    assert [i["row"] for i in summary["issues"]] == [3, 2, 4]  # type: ignore[attr-defined]
    assert summary["issues"][0] == {"file": "customers.xlsx", "row": 3, "reason": repeated}  # type: ignore[index]
    assert summary["rekeyed_loans"] == [{"row": 8, "customer_id": 10, "file_loan_id": 63, "loan_id": 64}]
    assert [t.loan_id for t in ledger.get_customer(9).loans] == [60, 62]
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [61]
    # No loan ID was drawn for the refused rows: the next booking takes the one after those used.
    assert ledger.book_loan(7, LoanRequest(D(1000), D(14), 6)).response["loan_id"] == 65


def test_a_loan_approved_after_today_is_refused_and_a_repeat_of_its_id_keeps_it(ledger: Ledger) -> None:
    # Today is TODAY: a file of history cannot hold a loan approved later (its EMIs would count as
    # paid before they were due, and it would count as a current loan). Tomorrow is taken: a file
    # from a time zone ahead of the server's may say so.
    def dated(row: int, loan_id: int, days: int) -> LoanRecord:
        start = TODAY + timedelta(days=days)
        return msgspec.structs.replace(loan_row(row, 7, loan_id), start_date=start, end_date=start + timedelta(days=400))

    summary = run_import(
        ledger,
        [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008")],
        [dated(3, 60, 2), loan_row(4, 8, 60), dated(5, 61, 1)],
    )
    reason = f"Date of Approval {TODAY + timedelta(days=2)} is in the future (today is {TODAY})"
    assert summary["issues"] == [{"file": "loans.xlsx", "row": 3, "reason": reason}]
    assert (summary["loans_imported"], summary["rows_rejected"], summary["rekeyed_loans"]) == (2, 1, [])
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [61]
    assert [t.loan_id for t in ledger.get_customer(8).loans] == [60]


def test_the_loans_of_a_refused_customer_row_never_go_to_the_ledgers_customer_with_that_id(ledger: Ledger) -> None:
    early = ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000)).customer  # holds customer ID 1
    summary = run_import(ledger, [customer_row(2, 7, "9000000007"), customer_row(3, 1, "9000000007")], [loan_row(2, 1, 60)])
    repeated = "Phone Number 9000000007 repeats row 2"
    assert summary["issues"] == [
        {"file": "customers.xlsx", "row": 3, "reason": repeated},
        {"file": "loans.xlsx", "row": 2, "reason": f"its customer row 3 was rejected: {repeated}"},
    ]
    assert (summary["customers_imported"], summary["loans_imported"]) == (1, 0)
    assert ledger.get_customer(early.customer_id).loans == []


def test_the_loans_of_a_customer_row_the_reader_refused_say_why_and_never_go_to_the_ledgers_customer(ledger: Ledger) -> None:
    early = ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000)).customer  # holds customer ID 1
    cells = dict(zip(CUSTOMER_COLUMNS, [1, "F", "L", 40, 9000000001, "lots", 1_800_000], strict=True))
    refused = parse_customer("customers.xlsx", 2, cells)
    assert isinstance(refused, RowIssue) and refused.customer_id == 1
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    report = ledger.import_history(
        job_id, [customer_row(3, 7, "9000000007")], [loan_row(2, 1, 60), loan_row(3, 7, 61)], [refused]
    )
    assert [i.as_dict() for i in report.issues] == [
        refused.as_dict(),
        {"file": "loans.xlsx", "row": 2, "reason": f"its customer row 2 was rejected: {refused.reason}"},
    ]
    assert (report.customers_imported, report.loans_imported) == (1, 1)
    assert ledger.get_customer(early.customer_id).loans == []


def test_a_reimport_whose_customer_row_went_bad_counts_the_loans_already_recorded_and_refuses_the_new(ledger: Ledger) -> None:
    run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 60)])
    cells = dict(zip(CUSTOMER_COLUMNS, [7, "F", "L", 40, 9000000007, "lots", 1_800_000], strict=True))
    refused = parse_customer("customers.xlsx", 2, cells)
    assert isinstance(refused, RowIssue)
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    report = ledger.import_history(job_id, [], [loan_row(2, 7, 60), loan_row(3, 7, 61)], [refused])
    assert (report.loans_already_present, report.loans_imported) == (1, 0)
    assert [(i.file, i.row) for i in report.issues] == [("customers.xlsx", 2), ("loans.xlsx", 3)]
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [60]


def test_import_batches_stop_at_a_customer_count_or_a_row_budget_keeping_loans_with_their_customer() -> None:
    from ledger.importing import _batches

    units = [(None, n, [loan_row(n, n, 100 + i) for i in range(loans)]) for n, loans in enumerate([3, 0, 5, 1, 1])]
    assert [[u[1] for u in b] for b in _batches(units, customers=2, rows=100)] == [[0, 1], [2, 3], [4]]
    assert [[u[1] for u in b] for b in _batches(units, customers=100, rows=6)] == [[0, 1], [2], [3, 4]]


def test_a_long_history_is_snapshotted_every_50_events_and_loads_whole(ledger: Ledger) -> None:
    customer_id = ledger.register_customer("Raj", "Kumar", 40, "9876500001", D(10_000_000)).customer.customer_id
    for _ in range(60):
        booked = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(16), 12), None)
        assert booked.response["loan_approved"] is True
    assert ledger.snapshots is not None
    (snapshot,) = ledger.snapshots.get(customer_uuid(customer_id))
    assert snapshot.originator_version == 50
    assert len(ledger.get_customer(customer_id).loans) == 60


def topics_after(ledger: Ledger, position: int) -> list[str]:
    notifications = ledger.recorder.select_notifications(position, 1_000, inclusive_of_start=False)
    return [n.topic.rsplit(":", 1)[-1] for n in notifications if "ImportJob" not in n.topic]


def test_import_records_one_history_event_per_customer_carrying_its_loans_and_no_loan_aggregates(ledger: Ledger) -> None:
    summary = run_import(
        ledger,
        [customer_row(2, 7, "9000000007"), customer_row(3, 8, "9000000008")],
        [loan_row(2, 7, 50), loan_row(3, 7, 51), loan_row(4, 8, 52)],
    )
    assert (summary["customers_imported"], summary["loans_imported"]) == (2, 3)
    # a customer's history and the claim on its phone number: nothing per loan
    assert sorted(topics_after(ledger, 0)) == ["Customer.HistoryImported"] * 2 + ["PhoneNumber.Claimed"] * 2
    assert loan_uuid(50) not in ledger.repository
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50, 51]


def test_the_first_repayment_of_an_imported_loan_opens_its_aggregate_from_the_customers_terms() -> None:
    clock = FixedClock(date(2020, 6, 1))
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=clock)
    row = LoanRecord(2, 7, 50, D(10_000), 12, D(10), D(880), 3, date(2020, 1, 1), date(2021, 1, 1))
    run_import(ledger, [customer_row(2, 7, "9000000007")], [row])
    assert [type(e).__name__ for e in ledger.loan_events(50)] == ["HistoryImported"]  # before: its customer's record
    position = ledger.recorder.max_notification_id() or 0

    paid = ledger.record_repayment(50, date(2020, 5, 1)).response

    assert (paid["installment"], paid["on_time"], paid["repayments_left"]) == (4, True, 8)
    assert sorted(topics_after(ledger, position)) == ["Customer.RepaymentRecorded", "Loan.Opened", "Loan.RepaymentRecorded"]
    loan: Loan = ledger.repository.get(loan_uuid(50))
    assert (loan.customer_id, loan.emis_paid, loan.source_loan_id) == (7, 4, 50)
    assert ledger.get_customer(7).loans[0].emis_paid == 4
    assert [type(e).__name__ for e in ledger.loan_events(50)] == ["HistoryImported", "Opened", "RepaymentRecorded"]
    assert ledger.record_repayment(50, date(2020, 5, 2)).response["installment"] == 5  # the aggregate is used now


def test_a_repayment_for_a_loan_no_history_holds_is_refused(ledger: Ledger) -> None:
    run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50)])
    with pytest.raises(LoanNotFound):
        ledger.record_repayment(49)


def test_a_file_loan_id_that_a_booking_already_holds_is_rekeyed(ledger: Ledger) -> None:
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    booked = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6)).response["loan_id"]
    summary = run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, booked), loan_row(3, 7, 90)])
    [rekeyed] = summary["rekeyed_loans"]  # type: ignore[misc]
    assert (rekeyed["file_loan_id"], rekeyed["loan_id"] > 90) == (booked, True)
    assert [t.loan_id for t in ledger.get_customer(customer_id).loans] == [booked]


def test_a_later_import_reusing_an_earlier_imports_loan_id_for_another_customer_is_rekeyed(ledger: Ledger) -> None:
    run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50)])
    summary = run_import(ledger, [customer_row(2, 8, "9000000008")], [loan_row(2, 8, 50)])
    [rekeyed] = summary["rekeyed_loans"]  # type: ignore[misc]
    assert (rekeyed["customer_id"], rekeyed["file_loan_id"], rekeyed["loan_id"] > 50) == (8, 50, True)
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50]
    assert ledger.loans.owner(50) == 7 and ledger.loans.owner(rekeyed["loan_id"]) == 8


def test_an_import_claims_a_loan_id_a_booking_drew_but_has_not_saved_and_the_booking_takes_another(
    ledger: Ledger,
) -> None:
    """A booking draws loan ID 1; before it saves, an import whose file uses ID 1 runs. The
    import opens loan 1's aggregate, so the booking's save conflicts and it books under a new ID."""
    customer_id = ledger.register_customer("Ann", "Lee", 30, "9876543210", D(100_000)).customer.customer_id
    draw = ledger.ids.next_loan_id
    drawn: list[int] = []

    def draw_then_import() -> int:
        loan_id = draw()
        drawn.append(loan_id)
        if len(drawn) == 1:
            run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, loan_id)])
        return loan_id

    ledger.ids.next_loan_id = draw_then_import  # type: ignore[method-assign]
    booked = ledger.book_loan(customer_id, LoanRequest(D(10_000), D(14), 6)).response["loan_id"]

    assert drawn[0] == 1 and booked == drawn[-1] != 1
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [1]  # the file's ID was kept
    assert ledger.repository.get(loan_uuid(1)).customer_id == 7
    assert ledger.repository.get(loan_uuid(booked)).customer_id == customer_id


def test_a_later_import_adds_loans_to_a_customer_already_in_the_ledger_in_one_event(ledger: Ledger) -> None:
    run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50)])
    position = ledger.recorder.max_notification_id() or 0
    summary = run_import(ledger, [customer_row(2, 7, "9000000007")], [loan_row(2, 7, 50), loan_row(3, 7, 60), loan_row(4, 7, 61)])
    assert (summary["customers_already_present"], summary["loans_already_present"], summary["loans_imported"]) == (1, 1, 2)
    assert topics_after(ledger, position) == ["Customer.HistoryExtended"]
    assert [t.loan_id for t in ledger.get_customer(7).loans] == [50, 60, 61]
    assert [type(e).__name__ for e in ledger.loan_events(61)] == ["HistoryExtended"]
    assert ledger.loans.owner(61) == 7


def test_a_batch_whose_customers_keep_changing_is_saved_in_halves_down_to_one_customer(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time a batch of more than one customer is planned, one of its customers books a loan (a
    write while a long batch is read): the whole batch was planned again 200 times and the import
    failed (a review, under 19 repayments a second). Halved after each conflict, it goes in."""
    ids = range(7, 15)
    run_import(ledger, [customer_row(i, i, f"90000000{i:02d}") for i in ids], [loan_row(i, i, 100 + i) for i in ids])
    busy = 11
    plan = HistoryImport._plan_batch
    sizes: list[int] = []

    def plan_while_a_customer_books(run: HistoryImport, job: Any, units: Any, rows_before: int, import_plan: Any) -> Any:
        planned = plan(run, job, units, rows_before, import_plan)
        sizes.append(len(units))
        if len(units) > 1 and any(cid == busy for _, cid, _ in units):
            ledger.book_loan(busy, LoanRequest(D(1_000), D(14), 6))
        return planned

    monkeypatch.setattr(HistoryImport, "_plan_batch", plan_while_a_customer_books)
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    customers = [customer_row(i, i, f"90000000{i:02d}") for i in ids]
    report = ledger.import_history(job_id, customers, [loan_row(i, i, 200 + i) for i in ids], [], batch_size=500)

    assert (report.customers_already_present, report.loans_imported) == (8, 8)
    assert all(200 + i in [t.loan_id for t in ledger.get_customer(i).loans] for i in ids)
    assert len(ledger.get_customer(busy).loans) == 2 + 4  # its file loans, and one booking per conflict
    # Planned whole twice (the first save, then again), then in halves until the busy one was alone.
    assert sizes == [8, 8, 4, 4, 2, 1, 1, 2], sizes
    job = ledger.get_import_job(job_id)
    assert (job.state, job.rows_done, job.total_rows, job.loans_recorded) == ("completed", 16, 16, 8)


def test_a_batch_whose_save_conflicts_while_the_next_is_planned_is_planned_again(ledger: Ledger) -> None:
    """Batches are stored by a second thread while the next is planned. A customer registered
    while batch 1 is being stored takes a phone number of that batch: its save conflicts, it is
    planned again (the row is refused), and the job's events stay one per batch, in order."""
    store = ledger._store_encoded
    registered: list[int] = []

    def register_during_the_first_batch(processing_event: Any, stored_events: Any) -> None:
        if not registered and any(getattr(e, "phone_number", None) == "9000000008" for e in processing_event.events):
            registered.append(ledger.register_customer("Ann", "Lee", 30, "9000000008", D(10_000)).customer.customer_id)
        store(processing_event, stored_events)

    ledger._store_encoded = register_during_the_first_batch  # type: ignore[method-assign]
    customers = [customer_row(n, n + 5, f"900000000{n + 5}") for n in range(2, 7)]  # customers 7..11, two a batch
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    report = ledger.import_history(job_id, customers, [loan_row(n, n + 5, 50 + n) for n in range(2, 7)], [], batch_size=2)

    refused = "Phone Number 9000000008 already belongs to another customer"
    assert [i.as_dict()["reason"] for i in report.issues] == [refused, f"its customer row 3 was rejected: {refused}"]
    assert (report.customers_imported, report.loans_imported) == (4, 4)
    assert [c for c in range(7, 12) if customer_uuid(c) in ledger.repository] == [7, 9, 10, 11]
    assert registered == [12] and ledger.get_customer(12).phone_number == "9000000008"
    job = ledger.get_import_job(job_id)  # replaying it checks that its versions run without a gap
    assert (job.state, job.rows_done, job.total_rows) == ("completed", 10, 10)
    progress = [e.rows_done for e in ledger.events.get(job_id) if isinstance(e, ImportJob.Progressed)]
    assert progress == [0, 4, 8, 10]
    assert [i["reason"] for i in job.issues] == [refused, f"its customer row 3 was rejected: {refused}"]


def interrupted_history() -> tuple[list[CustomerRecord], list[LoanRecord]]:
    """Six customers, two a batch. File customer 1's ID is taken (see `with_customer_1_taken`), so
    it is re-keyed; loans 50 and 60 are each used twice, so the second rows are re-keyed: one of
    each in the first batch, one loan in the last."""
    customers = [customer_row(n + 1, n, f"900000000{n}") for n in range(1, 7)]
    loans = [
        loan_row(2, 1, 50),
        loan_row(3, 2, 50),
        loan_row(4, 3, 51),
        loan_row(5, 4, 60),
        loan_row(6, 5, 60),
        loan_row(7, 6, 61),
    ]
    return customers, loans


def with_customer_1_taken() -> Ledger:
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(TODAY))
    ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000))
    return ledger


def interrupted_at_the_third_batch(ledger: Ledger, files_digest: str = "") -> UUID:
    """Runs an import of `interrupted_history()` whose third batch meets a database error: the
    first two are stored, and the job stays running, as after a worker's death."""
    store, stores = ledger._store_encoded, [0]

    def fail_the_third_batch(processing_event: Any, stored_events: Any) -> None:
        stores[0] += 1
        if stores[0] == 3:
            raise OperationalError("the connection broke")
        store(processing_event, stored_events)

    ledger._store_encoded = fail_the_third_batch  # type: ignore[method-assign]
    job_id, _ = ledger.request_import("/x/customers.xlsx", "/x/loans.xlsx", uuid4())
    with pytest.raises(OperationalError):
        ledger.import_history(job_id, *interrupted_history(), [], batch_size=2, files_digest=files_digest)
    return job_id


def test_an_import_resumed_after_an_interruption_reports_the_whole_job_as_an_uninterrupted_one_does() -> None:
    """The first run stores two batches of three and stops (a database error on the third). The run
    that resumes the job finds those rows already present: they are the job's own, so its summary
    counts them as imported, with their re-keyings, and says what an uninterrupted import says."""
    uninterrupted = with_customer_1_taken()
    expected = run_import(uninterrupted, *interrupted_history())

    ledger = with_customer_1_taken()
    job_id = interrupted_at_the_third_batch(ledger)
    assert ledger.get_import_job(job_id).state == "running"
    assert [c for c in range(2, 7) if customer_uuid(c) in ledger.repository] == [2, 3, 4]  # two batches went in

    summary = ledger.import_history(job_id, *interrupted_history(), [], batch_size=2).summary()
    counts = ("customers_imported", "customers_already_present", "loans_imported", "loans_already_present")
    assert [summary[k] for k in counts] == [expected[k] for k in counts] == [6, 0, 6, 0]
    assert ledger.get_import_job(job_id).summary == summary

    # The same rows re-keyed; a re-keyed row's new ID may differ (a discarded plan drew one), so each
    # is checked against the customer who holds it.
    def without_new_ids(rekeyed: Any) -> list[dict[str, int]]:
        return [{k: v for k, v in r.items() if k not in ("loan_id", "customer_id")} for r in rekeyed]

    for kind in ("rekeyed_customers", "rekeyed_loans"):
        assert without_new_ids(summary[kind]) == without_new_ids(expected[kind])
    assert [r["file_loan_id"] for r in summary["rekeyed_loans"]] == [50, 60]
    [moved] = summary["rekeyed_customers"]
    assert ledger.get_customer(moved["customer_id"]).source_customer_id == 1
    for r in summary["rekeyed_loans"]:
        assert (r["loan_id"], r["file_loan_id"]) in {
            (t.loan_id, t.source_loan_id) for t in ledger.get_customer(r["customer_id"]).loans
        }


def test_an_import_job_recorded_before_its_batches_said_what_they_recorded_still_reads() -> None:
    """Progress reports stored before class_version 2 have no counts: they read as recording nothing."""
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=FixedClock(TODAY))
    job = ImportJob.request(uuid4(), "c.xlsx", "l.xlsx")
    job.start(total_rows=3, files_digest="")
    job.progress(3, [{"row": 2, "reason": "a"}], 1, 2, [], [{"row": 3, "customer_id": 7, "file_loan_id": 50, "loan_id": 52}])
    stored = ledger.mapper.to_stored_event(job.pending_events[-1])
    state = json.loads(stored.state)
    assert state.pop("class_version") == 2
    for new_field in ("customers_imported", "loans_imported", "rekeyed_customers", "rekeyed_loans"):
        del state[new_field]
    old = ledger.mapper.to_domain_event(dataclasses.replace(stored, state=json.dumps(state).encode()))
    assert isinstance(old, ImportJob.Progressed)
    assert (old.rows_done, old.issues, old.customers_imported, old.loans_imported) == (3, [{"row": 2, "reason": "a"}], 0, 0)
    assert (old.rekeyed_customers, old.rekeyed_loans) == ([], [])


def test_a_resumed_import_that_finds_other_files_stops_and_keeps_what_it_recorded() -> None:
    """Its summary could not be the whole job's (the earlier runs' rows are counted as its own): the
    job fails and says why, and nothing more is recorded. With the same files it resumes."""
    ledger = with_customer_1_taken()
    job_id = interrupted_at_the_third_batch(ledger, files_digest="first")
    position = ledger.recorder.max_notification_id()
    with pytest.raises(ImportFilesChanged, match=r"customers\.xlsx or loans\.xlsx changed after this import started"):
        ledger.import_history(job_id, *interrupted_history(), [], batch_size=2, files_digest="other")
    assert ledger.recorder.max_notification_id() == position
    summary = ledger.import_history(job_id, *interrupted_history(), [], batch_size=2, files_digest="first").summary()
    assert (summary["customers_imported"], summary["loans_imported"], summary["customers_already_present"]) == (6, 6, 0)


def test_the_customers_of_rows_with_repeated_phones_are_read_a_batch_at_a_time(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-import reads the customers whose rows repeat a phone to see which row keeps it: read
    together, a file of repeats would hold every such customer in memory at once (a review)."""
    ids = range(1, 1201)
    run_import(ledger, [customer_row(i, i, f"9{i:09d}") for i in ids], [])
    reads: list[int] = []
    read = ledger.aggregates

    def counted(aggregate_ids: Any) -> Any:
        reads.append(len(aggregate_ids))
        return read(aggregate_ids)

    monkeypatch.setattr(ledger, "aggregates", counted)
    again = [customer_row(i, i, f"9{i + i % 2:09d}") for i in ids]  # 1 and 2 give 2's phone, 3 and 4 4's, ...
    unclaimed = HistoryImport(ledger)._rows_claiming_no_phone(again)
    assert unclaimed == {i for i in ids if i % 2}  # the rows whose customer holds another phone take none
    assert max(reads) == 500 and sum(reads) == 1200


def test_two_file_ids_that_reach_one_customer_in_one_batch_add_to_it_without_a_conflict(ledger: Ledger) -> None:
    """File Customer ID 7 was re-keyed to a new customer (7 was registered before the import); a
    later file has rows for both file ID 7 and that customer's own ID. Each unit loaded a copy of
    the customer, and the batch's two saves of it conflicted with each other until halved; read
    once for the batch, the customer takes both units' loans in one save."""
    registered = ledger.register_customer("Early", "Bird", 30, "9111111111", D(10_000)).customer.customer_id
    first = run_import(ledger, [customer_row(2, registered, "9000000001")], [loan_row(2, registered, 50)])
    moved = first["rekeyed_customers"][0]["customer_id"]  # type: ignore[index]
    inserts = ledger.recorder.insert_events
    conflicts = [0]

    def counting(events: Any, **kwargs: Any) -> Any:
        try:
            return inserts(events, **kwargs)
        except RecordConflictError:
            conflicts[0] += 1
            raise

    ledger.recorder.insert_events = counting  # type: ignore[method-assign]
    second = run_import(
        ledger,
        [customer_row(2, registered, "9200000001"), customer_row(3, moved, "9000000001")],
        [loan_row(2, registered, 60), loan_row(3, moved, 61)],
    )
    assert conflicts == [0]
    assert second["loans_imported"] == 2
    assert sorted(t.source_loan_id for t in ledger.get_customer(moved).loans) == [50, 60, 61]
