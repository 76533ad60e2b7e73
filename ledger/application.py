"""The Ledger application: its methods are the commands."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Protocol, cast
from uuid import UUID, uuid4

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProcessingEvent,
    ProjectorFunction,
    Repository,
    project_aggregate,
)
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    InterfaceError,
    JSONTranscoder,
    Mapper,
    MapperDeserialisationError,
    OperationalError,
    RecordConflictError,
    Recording,
    StoredEvent,
    Transcoding,
)

from ledger.calendar import add_months
from ledger.domain import (
    Contention,
    Customer,
    CustomerNotFound,
    FileCustomer,
    IdempotencyKeyReused,
    IdempotencyRecord,
    ImportJob,
    InvalidRepayment,
    Loan,
    LoanClosed,
    LoanNotFound,
    LoanTerms,
    OutcomeUnknown,
    PhoneNumber,
    PhoneNumberTaken,
    RowIssue,
    customer_uuid,
    file_customer_uuid,
    idempotency_uuid,
    loan_uuid,
    phone_uuid,
)
from ledger.history import CUSTOMER_COLUMNS, CustomerRecord, LoanRecord
from ledger.mapper import TypedMapper
from ledger.policy import Decision, LoanRequest, approved_limit, decide
from ledger.ports import AggregateIndex, Clock, IdAllocator, InMemoryIds, LoanDirectory, SystemClock
from ledger.schedule import amortization

log = logging.getLogger(__name__)

# The event store stopped answering (the recorder gave up its retries): what was being saved may or may not be.
DATABASE_AWAY = (OperationalError, InterfaceError)

SAVE_ATTEMPTS = 200
INSERT_ATTEMPTS = 10  # as the library's recorder retries an insert whose connection broke
INSERT_RETRY_SECONDS = 0.2
# One save is one psycopg pipeline carrying every event as a single array parameter; saves of
# several MiB were seen to hang (bench/pipeline_hang.py), so a batch also stops at this many rows.
MAX_ROWS_PER_SAVE = 2000


def _another_writer(error: RecordConflictError) -> bool:
    """Whether a conflict is another writer's: a unique key the save met (an aggregate's version
    recorded first). Any other integrity error (a NOT NULL or CHECK the stored events broke, in a
    store whose schema was changed by hand) is a fault no retry mends, not contention to answer
    503 about after every try. The recorder's error names the database's in its cause."""
    sqlstate = getattr(error.__cause__, "sqlstate", None)
    return sqlstate is None or sqlstate == UNIQUE_VIOLATION


UNIQUE_VIOLATION = "23505"  # SQLSTATE


def _back_off(attempt: int) -> None:
    """After a version conflict: someone else just saved; let them get clear before reloading."""
    time.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


class LoanTermsAsDict(Transcoding):
    type = LoanTerms
    name = "loan_terms"

    def encode(self, obj: LoanTerms) -> dict[str, Any]:
        return obj.as_dict()

    def decode(self, data: dict[str, Any]) -> LoanTerms:
        return LoanTerms(**data)


@dataclass(frozen=True, kw_only=True)
class Saved:
    """What a command recorded: how many events, and the position of its last one in the notification log."""

    last_position: int | None = None
    events: int = 0

    @classmethod
    def of(cls, recordings: Sequence[Any]) -> dict[str, Any]:
        return {"last_position": max((r.notification.id for r in recordings), default=None), "events": len(recordings)}


@dataclass(frozen=True, kw_only=True)
class Registration(Saved):
    customer: Customer
    replayed: bool = False


@dataclass(frozen=True, kw_only=True)
class Booking(Saved):
    response: dict[str, Any]
    replayed: bool = False


@dataclass
class ImportReport:
    customers_imported: int = 0
    customers_already_present: int = 0
    loans_imported: int = 0
    loans_already_present: int = 0
    rekeyed_loans: list[dict[str, int]] = field(default_factory=list)
    rekeyed_customers: list[dict[str, int]] = field(default_factory=list)
    issues: list[RowIssue] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "customers_imported": self.customers_imported,
            "customers_already_present": self.customers_already_present,
            "loans_imported": self.loans_imported,
            "loans_already_present": self.loans_already_present,
            "rows_rejected": len(self.issues),
            "rekeyed_loans": self.rekeyed_loans,
            "rekeyed_customers": self.rekeyed_customers,
        }

    @classmethod
    def recorded_by(cls, job: ImportJob) -> ImportReport:
        """What the job's batches have recorded so far (before an interruption, when it resumes)."""
        return cls(
            customers_imported=job.customers_recorded,
            loans_imported=job.loans_recorded,
            rekeyed_customers=list(job.rekeyed_customers),
            rekeyed_loans=list(job.rekeyed_loans),
        )

    def count_earlier_runs(self, earlier: ImportReport) -> None:
        """A run resumed after an interruption finds what the job's earlier runs recorded already
        present. Those rows are the job's own: the summary counts them as imported, with their
        re-keyings, so that it is the whole job's."""
        self.customers_imported += earlier.customers_imported
        self.customers_already_present -= earlier.customers_imported
        self.loans_imported += earlier.loans_imported
        self.loans_already_present -= earlier.loans_imported
        self.rekeyed_customers[:0] = earlier.rekeyed_customers
        self.rekeyed_loans[:0] = earlier.rekeyed_loans

    def add(self, other: ImportReport) -> None:
        self.customers_imported += other.customers_imported
        self.customers_already_present += other.customers_already_present
        self.loans_imported += other.loans_imported
        self.loans_already_present += other.loans_already_present
        self.rekeyed_loans += other.rekeyed_loans
        self.rekeyed_customers += other.rekeyed_customers
        self.issues += other.issues


class _RepositoryIndex:
    """Asks the repository one aggregate at a time (fine in memory; PostgreSQL has a bulk index)."""

    def __init__(self, app: Application[UUID]) -> None:
        self.app = app

    def existing(self, ids: Collection[UUID]) -> set[UUID]:
        return {i for i in ids if i in self.app.repository}


class _RecordedLoans:
    """Every loan the log records, read from the log itself as it grows (fine in memory; on
    PostgreSQL the read model's loans table answers instead)."""

    def __init__(self, app: Application[UUID]) -> None:
        self.app = app
        self._position = 0
        self._owners: dict[int, int] = {}

    def _read_on(self) -> None:
        while page := self.app.recorder.select_notifications(self._position, 500, inclusive_of_start=False):
            for notification in page:
                event: Any = self.app.mapper.to_domain_event(notification)
                if isinstance(event, (Customer.HistoryImported, Customer.HistoryExtended)):
                    self._owners.update((terms.loan_id, event.customer_id) for terms in event.loans)
                elif isinstance(event, (Loan.Booked, Loan.Imported)):
                    self._owners[event.loan_id] = event.customer_id
            self._position = page[-1].id

    def owner(self, loan_id: int) -> int | None:
        self._read_on()
        return self._owners.get(loan_id)

    def taken(self, loan_ids: Collection[int]) -> set[int]:
        self._read_on()
        return {i for i in loan_ids if i in self._owners}


def request_fingerprint(customer_id: int, request: LoanRequest) -> str:
    body = {
        "customer_id": customer_id,
        "loan_amount": str(request.amount.normalize()),
        "interest_rate": str(request.interest_rate.normalize()),
        "tenure": request.tenure,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _ProcessingEvent(ProcessingEvent[UUID]):
    """Collects events from this ledger's aggregates by their class. The library's own collection
    asks two runtime-checkable Protocols of every object, about 14 µs each on Python 3.11: a fifth
    of an import's time. Anything else still goes through the library's checks."""

    def collect_events(self, *objs: Any, **kwargs: Any) -> None:
        others = []
        for obj in objs:
            if isinstance(obj, Aggregate):
                self.events.extend(obj.collect_events())
                self.aggregates[obj.id] = obj
            elif obj is not None:
                others.append(obj)
        super().collect_events(*others, **kwargs)


class LatestReader(Protocol):
    def select_latest(self, originator_id: UUID, snapshots: Any) -> tuple[StoredEvent | None, list[StoredEvent]]:
        """The aggregate's latest snapshot in the `snapshots` recorder (None if none), and its events after it."""
        ...


class _Repository(Repository[UUID]):
    """The library's repository, reading an aggregate's latest snapshot and the events after it in
    one round trip when the recorder can (PostgreSQL's, `infra.postgres`), rather than its two:
    one read fewer in every command."""

    def _reconstruct_aggregate(self, aggregate_id: UUID, version: int | None, projector_func: ProjectorFunction[Any, Any]) -> Any:
        try:
            return self._from_latest(aggregate_id, version, projector_func)
        except MapperDeserialisationError:
            if self.snapshot_store is None:
                raise
            # A snapshot is only a shortcut: one this version cannot read (written by another
            # version of the code) must not make its aggregate unreadable. Its events say it all.
            log.warning("the snapshot of %s could not be read: replaying its events", aggregate_id, exc_info=True)
            return self._project(aggregate_id, version, list(self.event_store.get(aggregate_id, lte=version)), projector_func)

    def _from_latest(self, aggregate_id: UUID, version: int | None, projector_func: ProjectorFunction[Any, Any]) -> Any:
        recorder = self.event_store.recorder
        if version is not None or self.snapshot_store is None or not hasattr(recorder, "select_latest"):
            return super()._reconstruct_aggregate(aggregate_id, version, projector_func)
        snapshot, events = cast("LatestReader", recorder).select_latest(aggregate_id, self.snapshot_store.recorder)
        domain_events: list[Any] = [] if snapshot is None else [self.snapshot_store.mapper.to_domain_event(snapshot)]
        domain_events += map(self.event_store.mapper.to_domain_event, events)
        return self._project(aggregate_id, version, domain_events, projector_func)

    @staticmethod
    def _project(
        aggregate_id: UUID, version: int | None, domain_events: list[Any], projector_func: ProjectorFunction[Any, Any]
    ) -> Any:
        if projector_func is project_aggregate:  # the library's, less its runtime-Protocol assert: 14 µs an event
            aggregate = None
            for event in domain_events:
                aggregate = event.mutate(aggregate)
        else:
            aggregate = projector_func(None, domain_events)
        if aggregate is None:  # as the library says it
            raise AggregateNotFoundError(f"Aggregate {aggregate_id!r} version {version!r} not found.")
        return aggregate


class _Inserts(threading.local):
    retried = False  # whether this thread's last save tried its insert again


class Ledger(Application[UUID]):
    name = "Ledger"
    snapshotting_intervals = {Customer: 50}  # noqa: RUF012 (the library's own class attribute)

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        ids: IdAllocator | None = None,
        clock: Clock | None = None,
        index: AggregateIndex | None = None,
        loans: LoanDirectory | None = None,
    ) -> None:
        super().__init__(env)
        self._insert_retries()
        self.ids: IdAllocator = ids or InMemoryIds()
        self.clock: Clock = clock or SystemClock()
        self.index: AggregateIndex = index or _RepositoryIndex(self)
        self.loans: LoanDirectory = loans or _RecordedLoans(self)

    def _insert_retries(self) -> None:
        """The recorder retries an insert whose connection broke (the library's `retry`, 10 tries
        0.2 s apart). The same retry is made here, around the undecorated insert, so that a save
        knows whether its insert was tried again: a conflict on the first try is never the save's
        own events (see _save_once), however alike a concurrent writer's are."""
        recorder = self.recorder
        undecorated = getattr(type(recorder).insert_events, "__wrapped__", type(recorder).insert_events)
        self._insert_once: Callable[..., Any] = lambda stored_events, **kwargs: undecorated(recorder, stored_events, **kwargs)
        self._inserts = _Inserts()

        def insert_events(stored_events: Sequence[StoredEvent], **kwargs: Any) -> Any:
            for attempt in range(INSERT_ATTEMPTS):
                try:
                    return self._insert_once(stored_events, **kwargs)
                except DATABASE_AWAY:
                    self._inserts.retried = True
                    if attempt == INSERT_ATTEMPTS - 1:
                        raise
                    time.sleep(INSERT_RETRY_SECONDS * (1 + 0.1 * (random.random() - 0.5)))
            raise AssertionError("unreachable")

        recorder.insert_events = insert_events  # type: ignore[method-assign]

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        """The library's `save`, with a `ProcessingEvent` that knows this ledger's aggregates by class."""
        processing_event = _ProcessingEvent()
        processing_event.collect_events(*objs, **kwargs)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        self.notify(processing_event.events)  # as the library's save does (its deprecated hook)
        return recordings

    def take_snapshot(
        self, aggregate_id: UUID, version: int | None = None, projector_func: ProjectorFunction[Any, Any] = project_aggregate
    ) -> None:
        """The library's, where a snapshot already stored at that version is as good as a new one:
        when a snapshot's commit answer is lost, the recorder's retry meets it as a conflict, and
        the command that took it must not take that for a concurrent change (see _save_once).
        Nor may a snapshot that cannot be written turn a recorded command into an error."""
        try:
            super().take_snapshot(aggregate_id, version, projector_func)
        except RecordConflictError:
            pass
        except DATABASE_AWAY:  # the command is recorded; a snapshot only saves reading
            log.warning("no snapshot of %s at version %s: the database stopped answering", aggregate_id, version, exc_info=True)
        except Exception:  # nor anything else a snapshot meets: the aggregate reads from its events
            log.exception("no snapshot of %s at version %s: taking it failed", aggregate_id, version)

    def _encode(self, *aggregates: Aggregate) -> tuple[_ProcessingEvent, list[StoredEvent]]:
        """The first half of `save` for the import: the aggregates' new events, collected and encoded."""
        processing_event = _ProcessingEvent()
        processing_event.collect_events(*aggregates)
        return processing_event, list(map(self.mapper.to_stored_event, processing_event.events))

    def _store_encoded(self, processing_event: _ProcessingEvent, stored_events: list[StoredEvent]) -> None:
        """The second half: the insert (which mostly waits on the database, so another thread may
        run it), then what the library's `_record` does with an aggregate cache, and the snapshots.
        Nothing to notify: this application has no followers."""
        self.recorder.insert_events(stored_events)
        if self.repository.cache and not self.repository.fastforward:
            for aggregate_id, aggregate in processing_event.aggregates.items():
                self.repository.cache.put(aggregate_id, aggregate)
        self._take_snapshots(processing_event)

    def construct_repository(self) -> Repository[UUID]:
        """The library's repository with its settings, reading snapshot and events at once."""
        library = super().construct_repository()
        repository = _Repository(
            event_store=library.event_store,
            snapshot_store=library.snapshot_store,
            fastforward=library.fastforward,
            fastforward_skipping=library.fastforward_skipping,
            deepcopy_from_cache=library.deepcopy_from_cache,
        )
        repository.cache = library.cache
        return repository

    def construct_mapper(self) -> Mapper[Any]:
        return self.factory.mapper(transcoder=self.construct_transcoder(), mapper_class=TypedMapper)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())
        transcoder.register(LoanTermsAsDict())

    # Customers

    def register_customer(
        self,
        first_name: str,
        last_name: str,
        age: int,
        phone_number: str,
        monthly_income: Decimal,
        idempotency_key: str | None = None,
    ) -> Registration:
        """Register a customer and claim their phone number, which one customer at most may hold.
        With an Idempotency-Key, a repeat answers with the customer the first request registered."""
        registered: list[Customer] = []

        def attempt() -> tuple[list[Aggregate], dict[str, Any]]:
            # A first attempt learns of a taken phone from its save's conflict; a later one looks.
            if registered and phone_uuid(phone_number) in self.repository:
                raise PhoneNumberTaken(f"phone number {phone_number} already belongs to a customer")
            customer = Customer.register(
                customer_id=self.ids.next_customer_id(),
                first_name=first_name,
                last_name=last_name,
                age=age,
                phone_number=phone_number,
                monthly_income=monthly_income,
                approved_limit=approved_limit(monthly_income),
            )
            registered[:] = [customer]
            claim = PhoneNumber.claim(phone_number, customer.customer_id)
            return [customer, claim], {"customer_id": customer.customer_id}

        fingerprint = [first_name, last_name, age, phone_number, str(monthly_income.normalize())]
        done = self._command(
            attempt,
            idempotency_key,
            lambda: hashlib.sha256(json.dumps(["register", *fingerprint]).encode()).hexdigest(),
            busy=f"phone number {phone_number} is being registered by too many requests at once; try again",
        )
        customer = self.get_customer(done.response["customer_id"]) if done.replayed else registered[0]
        return Registration(last_position=done.last_position, events=done.events, customer=customer, replayed=done.replayed)

    def get_customer(self, customer_id: int) -> Customer:
        try:
            return self.repository.get(customer_uuid(customer_id))
        except AggregateNotFoundError:
            raise CustomerNotFound(f"customer {customer_id} not found") from None

    # Loans

    def decide_for(self, customer: Customer, request: LoanRequest, today: date | None = None) -> Decision:
        """The decision on the customer's history as of `today` (default: the clock's)."""
        return decide(
            customer.credit_history(today or self.clock.today()),
            customer.monthly_income,
            customer.approved_limit,
            request,
        )

    def book_loan(self, customer_id: int, request: LoanRequest, idempotency_key: str | None = None) -> Booking:
        """Decide on the customer's own state and book the loan when approved.

        Two bookings for one customer conflict on the customer's version; the loser
        reloads and decides again, so nothing booked can break the rules.
        """

        drawn: list[int] = []  # the loan ID an attempt drew: a save that conflicted recorded nothing under it

        def attempt() -> tuple[list[Aggregate], dict[str, Any]]:
            customer = self.get_customer(customer_id)
            today = self.clock.today()  # once: a booking at midnight starts on the day it was decided on
            decision = self.decide_for(customer, request, today)
            to_save: list[Aggregate] = []
            loan_id = None
            if decision.approved:
                # Drawn once per command, not per attempt: under contention each retry drew another, and
                # 500 bookings at once for one customer used about 34,000 IDs. An import may have taken the
                # drawn ID meanwhile (a file's Loan ID that no one had recorded): then a new one.
                if not drawn or loan_uuid(drawn[0]) in self.repository:
                    drawn[:] = [self.ids.next_loan_id()]
                terms = LoanTerms(
                    loan_id=drawn[0],
                    amount=request.amount,
                    interest_rate=decision.corrected_interest_rate,
                    tenure=request.tenure,
                    monthly_installment=decision.monthly_installment,
                    start_date=today,
                    end_date=add_months(today, request.tenure),
                )
                customer.book_loan(terms)
                to_save += [customer, Loan.book(customer_id, terms)]
                loan_id = terms.loan_id
            response = {
                "loan_id": loan_id,
                "customer_id": customer_id,
                "loan_approved": decision.approved,
                "message": decision.message,
                "monthly_installment": decision.monthly_installment,
            }
            return to_save, response

        return self._command(
            attempt,
            idempotency_key,
            lambda: request_fingerprint(customer_id, request),
            busy=f"customer {customer_id} is being changed by too many requests at once; try again",
        )

    def _command(
        self,
        attempt: Callable[[], tuple[list[Aggregate], dict[str, Any]]],
        idempotency_key: str | None,
        fingerprinted: Callable[[], str],
        busy: str,
    ) -> Booking:
        """Run `attempt` (it loads aggregates, decides, and returns what to save and the answer)
        until its save meets no concurrent change, reloading and deciding again after a conflict.
        With an Idempotency-Key the answer is saved under the key with the request's fingerprint
        (`fingerprinted()`, computed only then), and a repeat gets it back."""
        fingerprint = "" if idempotency_key is None else fingerprinted()
        for n in range(SAVE_ATTEMPTS):
            if idempotency_key is not None:
                earlier = self._idempotent_response(idempotency_key, fingerprint)
                if earlier is not None:
                    # The first request's events are committed, at or before the log's end now: a
                    # replay, like a first answer, waits for the read model to show them.
                    return Booking(response=earlier, replayed=True, last_position=self.recorder.max_notification_id())
            to_save, response = attempt()
            if idempotency_key is not None:
                to_save.append(IdempotencyRecord.record(idempotency_key, fingerprint, response))
            if not to_save:
                return Booking(response=response)
            try:
                saved = self._save_once(*to_save)
            except RecordConflictError as error:
                if not _another_writer(error):
                    raise
                _back_off(n)
                continue
            except DATABASE_AWAY as error:
                raise OutcomeUnknown(
                    "the database stopped answering while this command was being recorded, so it may have been"
                ) from error
            return Booking(**saved, response=response)
        raise Contention(busy)

    def _save_once(self, *aggregates: Aggregate) -> dict[str, Any]:
        """`save`, telling a conflict with another writer from one with this very save.

        The recorder retries an insert whose connection broke. When the break came after the
        database committed (a crash or a network fault at the commit), the retry conflicts with
        the first try's own events, and a command taking that for a concurrent change would
        decide again: a second loan for one request, or a 409 for the customer it registered.
        So after a conflict, read back the last new event: if the store holds this very event
        (its timestamp to the microsecond and every field), the save was recorded."""
        processing_event = _ProcessingEvent()
        processing_event.collect_events(*aggregates)
        events = processing_event.events
        self._inserts.retried = False
        try:
            saved = Saved.of(self._record(processing_event))
        except RecordConflictError:
            # Only a retried insert can meet its own first try; a first try's conflict is another
            # writer's, even one whose events match these to the microsecond (two keyless
            # repayments of one loan at once differ in nothing else).
            if not events or not self._inserts.retried or not self._recorded(events[-1]):
                raise
            # The first try's notification IDs are lost with its answer; the log's end is at or after them.
            try:
                last: int | None = self.recorder.max_notification_id()
            except DATABASE_AWAY:  # recorded all the same: the views catch up on their own
                last = None
            saved = {"last_position": last, "events": len(events)}
        self._take_snapshots(processing_event)
        return saved  # nothing to notify: this application has no followers

    def _recorded(self, event: Any) -> bool:
        version = event.originator_version
        stored = self.recorder.select_events(event.originator_id, gt=version - 1, lte=version, limit=1)
        return bool(stored) and self.mapper.to_domain_event(stored[0]) == event

    def _idempotent_response(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        try:
            record: IdempotencyRecord = self.repository.get(idempotency_uuid(key))
        except AggregateNotFoundError:
            return None
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused("this Idempotency-Key was already used with a different request; use a new key")
        return record.response

    # Repayments

    def record_repayment(self, loan_id: int, paid_on: date | None = None, idempotency_key: str | None = None) -> Booking:
        """Record the loan's next installment as paid on `paid_on` (default today)."""

        def attempt() -> tuple[list[Aggregate], dict[str, Any]]:
            loan, customer = self._loan_and_customer(loan_id)
            today = self.clock.today()
            day = paid_on or today
            if loan.repayments_left == 0:
                raise LoanClosed(f"loan {loan_id} is closed: all {loan.tenure} installments are paid")
            if day < loan.start_date:
                raise InvalidRepayment(f"paid_on {day} is before the loan started on {loan.start_date}")
            if day > today:
                raise InvalidRepayment(f"paid_on {day} is in the future (today is {today})")
            if loan.last_paid_on is not None and day < loan.last_paid_on:
                # Installments are paid in turn: an earlier date would make a late one on time.
                raise InvalidRepayment(
                    f"paid_on {day} is before installment {loan.emis_paid}, which was paid on {loan.last_paid_on}"
                )
            installment = amortization(loan.amount, loan.interest_rate, loan.tenure, loan.monthly_installment, loan.start_date)[
                loan.emis_paid
            ]
            on_time = loan.record_repayment(day, installment.due_date, installment.payment)
            customer.record_repayment(loan_id, day, on_time)
            response = {
                "loan_id": loan_id,
                "installment": installment.number,
                "paid_on": day.isoformat(),
                "due_date": installment.due_date.isoformat(),
                "on_time": on_time,
                "amount": installment.payment,
                "repayments_left": loan.repayments_left,
                "loan_closed": loan.repayments_left == 0,
            }
            return [loan, customer], response

        return self._command(
            attempt,
            idempotency_key,
            lambda: hashlib.sha256(f"repayment:{loan_id}:{paid_on}".encode()).hexdigest(),
            busy=f"loan {loan_id} is being changed by too many requests at once; try again",
        )

    def _loan_and_customer(self, loan_id: int) -> tuple[Loan, Customer]:
        """The loan's aggregate and its customer. An imported loan that has no aggregate yet gets
        one, opened from the terms its customer's history holds (saved with the first change)."""
        try:
            loan: Loan = self.repository.get(loan_uuid(loan_id))
        except AggregateNotFoundError:
            owner = self.loans.owner(loan_id)
            customer = self.get_customer(owner) if owner is not None else None
            terms = next((t for t in customer.loans if t.loan_id == loan_id), None) if customer else None
            if customer is None or terms is None:
                raise LoanNotFound(f"loan {loan_id} not found") from None
            return Loan.open(customer.customer_id, terms), customer
        return loan, self.get_customer(loan.customer_id)

    def loan_events(self, loan_id: int) -> list[Any]:
        """The loan's events, oldest first. An imported loan's trail starts with its customer's
        events that carry it (the import recorded it there), then its own once it was opened."""
        own: list[Any] = list(self.events.get(loan_uuid(loan_id)))
        if own and not isinstance(own[0], Loan.Opened):
            return own
        owner = own[0].customer_id if own else self.loans.owner(loan_id)
        if owner is None:
            return own
        carried = [e for e in self.events.get(customer_uuid(owner)) if any(t.loan_id == loan_id for t in getattr(e, "loans", ()))]
        return carried + own

    # Import

    def request_import(self, customers_file: str, loans_file: str, job_id: UUID | None = None) -> tuple[UUID, Saved]:
        job = ImportJob.request(job_id or uuid4(), customers_file, loans_file)
        try:
            return job.id, Saved(**self._save_once(job))
        except DATABASE_AWAY as error:
            raise OutcomeUnknown(
                f"the database stopped answering while import job {job.id} was being recorded, so it may have been"
            ) from error

    def get_import_job(self, job_id: UUID) -> ImportJob:
        return self.repository.get(job_id)

    def find_import_job(self, job_id: UUID) -> ImportJob | None:
        """The job as the event store holds it; None when no job has this ID (another kind of
        aggregate may)."""
        try:
            job: Aggregate = self.repository.get(job_id)
        except AggregateNotFoundError:
            return None
        return job if isinstance(job, ImportJob) else None

    def fail_import(self, job_id: UUID, reason: str) -> Saved:
        job = self.get_import_job(job_id)
        job.fail(reason)
        return Saved(**self._save_once(job))

    def import_history(
        self,
        job_id: UUID,
        customers: list[CustomerRecord],
        loans: list[LoanRecord],
        issues: Sequence[RowIssue],
        *,
        batch_size: int = 500,
        on_batch: Callable[[int, int], None] | None = None,
        files_digest: str = "",
    ) -> ImportReport:
        """Replay the lender's history as events, `batch_size` customers per transaction.

        Idempotent: a customer already in the ledger and a loan already recorded for
        that customer (by the file's Loan ID) are skipped, so a re-run adds nothing.

        Takes the rows over: `customers` and `loans` are emptied once their rows are grouped by
        customer, and each batch's rows are let go of once written, so a million rows' memory
        goes back as the import proceeds instead of at its end.
        """
        job = self.get_import_job(job_id)
        job.check_files(files_digest)  # raises ImportFilesChanged: a run resuming it must read the same files
        earlier_runs = ImportReport.recorded_by(job)  # nothing, unless this run resumes the job
        labels = job.file_names
        today = self.clock.today()
        latest = today + timedelta(days=1)  # a day's grace: the file may come from a time zone ahead of this server's
        if any(loan.start_date > latest for loan in loans):  # (a scan; the rows are copied only then)
            # A file of history holds loans already approved: one dated later would count EMIs as
            # paid before they are due, and as a current loan.
            later = [loan for loan in loans if loan.start_date > latest]
            loans[:] = [loan for loan in loans if loan.start_date <= latest]
            issues = [
                *issues,
                *(
                    RowIssue(labels[1], loan.row, f"Date of Approval {loan.start_date} is in the future (today is {today})")
                    for loan in later
                ),
            ]
        report = ImportReport(issues=list(issues))
        loans_by_customer: dict[int, list[LoanRecord]] = {}
        for loan in loans:
            loans_by_customer.setdefault(loan.customer_id, []).append(loan)
        file_customers: dict[int, CustomerRecord] = {}
        phones: dict[str, int] = {}
        refused: dict[int, tuple[int, str]] = {}  # a Customer ID with a row refused -> one such row, and why
        for issue in issues:
            if issue.customer_id is not None:  # a customer row the reader refused
                refused.setdefault(issue.customer_id, (issue.row, issue.reason))
        keeps_its_phone = self._rows_claiming_no_phone(customers)
        for record in customers:
            if record.customer_id in file_customers:
                first = file_customers[record.customer_id]
                report.issues.append(RowIssue(labels[0], record.row, f"Customer ID {record.customer_id} repeats row {first.row}"))
            elif record.row in keeps_its_phone:
                file_customers[record.customer_id] = record
            elif record.phone_number in phones:
                repeated = f"Phone Number {record.phone_number} repeats row {phones[record.phone_number]}"
                report.issues.append(RowIssue(labels[0], record.row, repeated))
                refused.setdefault(record.customer_id, (record.row, repeated))
            else:
                file_customers[record.customer_id] = record
                phones[record.phone_number] = record.row
        refused = {cid: why for cid, why in refused.items() if cid not in file_customers}  # no row accepted
        # Which loan rows keep the file's Loan ID: the first row to use an ID keeps it, unless its
        # customer's row was refused (then the row is refused too, and the next row keeps the ID).
        first_use = _first_rows_of_repeated_ids(loans, refused)

        total_rows = len(customers) + len(loans) + len(issues)
        rows_done = len(report.issues)
        job.start(total_rows, files_digest)
        job.progress(rows_done, [i.as_dict() for i in report.issues], 0, 0, [], [])
        self._save_once(job)
        # Every Customer ID the files name is the file's: neither a customer re-keyed by this import
        # nor one registered later may take an ID that a loan row names without a customer row.
        file_ids = max((c.customer_id for c in customers), default=0), max((ln.customer_id for ln in loans), default=0)
        if max(file_ids) > 0:
            self.ids.reserve_customer_ids_through(max(file_ids))
        # A file's Loan ID above `contested` is held by no one: no booking, no earlier import. Only the
        # IDs at or below it need checking, and claim an aggregate of their own (see _import_unit).
        contested = self.ids.reserve_loan_ids_through(max(ln.loan_id for ln in loans)) if loans else 0

        units: list[tuple[CustomerRecord | None, int, list[LoanRecord]]] = [
            (row, cid, loans_by_customer.pop(cid, [])) for cid, row in file_customers.items()
        ]
        units += [(None, cid, rows) for cid, rows in loans_by_customer.items()]
        batches = _batches(units, batch_size, MAX_ROWS_PER_SAVE)
        del units, loans_by_customer, file_customers, phones
        plan = _ImportPlan(first_use, contested, labels, refused)
        customers.clear()
        loans.clear()

        # Each batch's events are encoded here and inserted by a second thread while this one
        # plans the next batch: the database works while Python builds events (about 5 s of a
        # 100,000-customer import). A batch is handed over only once the one before it is stored,
        # so the job's events stay in order and a conflict stops the import before anything
        # after it is written.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-save") as saver:
            storing: tuple[_PlannedBatch, Future[Any]] | None = None
            for index, units in enumerate(batches):
                batches[index] = []  # `units` holds the rows until the next batch
                planned = self._plan_batch(job, units, rows_done, plan)
                rows_done = planned.rows_after
                if storing is not None:
                    reloaded = self._stored(job_id, *storing, plan, report, on_batch, total_rows)
                    if reloaded is not None:  # planned on a job that has changed since
                        job = reloaded
                        planned = self._plan_batch(job, planned.units, planned.rows_before, plan)
                storing = planned, saver.submit(self._store_encoded, *self._encode(*planned.aggregates))
            if storing is not None:
                job = self._stored(job_id, *storing, plan, report, on_batch, total_rows) or job

        report.count_earlier_runs(earlier_runs)
        job.complete(report.summary())
        self._save_once(job)
        return report

    def _plan_batch(self, job: ImportJob, units: list[Unit], rows_before: int, plan: _ImportPlan) -> _PlannedBatch:
        """The events for a batch of customers and their loans, and the job's progress after it."""
        rows = sum((record is not None) + len(loans) for record, _, loans in units)
        report = ImportReport()
        known = self.index.existing(_candidate_ids(units, plan.contested))
        taken = self.loans.taken({r.loan_id for _, _, rows in units for r in rows if r.loan_id <= plan.contested})
        claims = _Claims(plan.first_use, plan.contested, known, taken, _FreshLoanIds(self.ids))
        claims.decide(r for record, cid, rows in units if not plan.refuses(record, cid) for r in rows)
        aggregates: list[Aggregate] = []
        for record, cid, loans in units:
            aggregates += self._import_unit(record, cid, loans, claims, plan, known, report)
        job.progress(
            rows_before + rows,
            [i.as_dict() for i in report.issues],
            report.customers_imported,
            report.loans_imported,
            list(report.rekeyed_customers),
            list(report.rekeyed_loans),
        )
        aggregates.append(job)
        return _PlannedBatch(units, rows_before, rows_before + rows, aggregates, report, job.pending_events[-1])

    def _stored(
        self,
        job_id: UUID,
        planned: _PlannedBatch,
        saving: Future[Any],
        plan: _ImportPlan,
        report: ImportReport,
        on_batch: Callable[[int, int], None] | None,
        total_rows: int,
    ) -> ImportJob | None:
        """Waits for a batch to be stored and adds it to the report. After a conflict (someone
        registered or imported concurrently) the job is reloaded and the batch planned and saved
        again until it goes in; then the reloaded job is returned, else None."""
        job = None
        try:
            saving.result()
        except RecordConflictError as error:
            if not _another_writer(error):
                raise
            if not self._recorded(planned.last_event):  # else the batch went in, its answer lost (see _save_once)
                planned = self._store_again(job_id, planned, plan)
                job = cast(ImportJob, planned.aggregates[-1])
        report.add(planned.report)
        if on_batch is not None:
            on_batch(planned.rows_after, total_rows)
        return job

    def _store_again(self, job_id: UUID, planned: _PlannedBatch, plan: _ImportPlan) -> _PlannedBatch:
        """Plans the batch again on the reloaded job, and saves it, until it meets no concurrent
        change: after each conflict in halves, down to one customer. Planning 500 customers again
        reads each of them (about a second under load), and a write to any one of them meanwhile
        lost the attempt: an import under a steady 19 repayments a second to its customers failed
        after 200 attempts (a review). The batch's parts are saved in order, each with the job's
        progress after it; the whole batch's report and the job as last saved are returned."""
        pending = [planned.units]
        rows_before, report, last, conflicts = planned.rows_before, ImportReport(), planned, 0
        _back_off(0)  # the first save's conflict: let the other writer get clear
        while pending:
            units = pending.pop(0)
            part = self._plan_batch(self.get_import_job(job_id), units, rows_before, plan)
            try:
                self._save_once(*part.aggregates)
            except RecordConflictError as error:
                if not _another_writer(error):
                    raise
                conflicts += 1
                if conflicts == SAVE_ATTEMPTS:
                    raise Contention(
                        f"other requests kept changing customers of the file ({SAVE_ATTEMPTS} conflicts in a row while"
                        " saving them); what was imported stays: import the files again to add the rest"
                    ) from error
                pending[:0] = [units[: len(units) // 2], units[len(units) // 2 :]] if len(units) > 1 else [units]
                _back_off(conflicts)
                continue
            report.add(part.report)
            rows_before, last = part.rows_after, part
        return _PlannedBatch(planned.units, planned.rows_before, rows_before, last.aggregates, report, last.last_event)

    def _import_unit(
        self,
        record: CustomerRecord | None,
        file_id: int,
        rows: list[LoanRecord],
        claims: _Claims,
        plan: _ImportPlan,
        known: set[UUID],
        report: ImportReport,
    ) -> list[Aggregate]:
        """The events for one customer row (file Customer ID `file_id`) and its loan rows.

        `known` holds which of the batch's candidate aggregates already exist."""
        labels = plan.labels
        existing = self._customer_for_file_id(file_id, known)
        if plan.refuses(record, file_id):
            # The file's row for this customer was refused: its loans are not for whoever the ledger
            # knows by that ID. Those an earlier import of this file recorded are there all the same.
            refused_row, reason = plan.refused[file_id]
            recorded = existing.imported_loans() if existing is not None else {}
            report.issues += [
                RowIssue(labels[1], r.row, f"its customer row {refused_row} was rejected: {reason}")
                for r in _count_recorded(rows, recorded, labels[1], report)
            ]
            return []
        if record is None and existing is not None and not self._is_file_customer(existing, file_id):
            # Loan rows with no customer row go to the file's customer only: the ledger's customer
            # with that ID was registered (or re-keyed from another file ID), and may be anyone.
            report.issues += [
                RowIssue(
                    labels[1],
                    r.row,
                    f"Customer ID {file_id} has no accepted row in the customer file, and the ledger's customer"
                    f" {file_id} is not known to be the file's",
                )
                for r in rows
            ]
            return []
        rekey = record is not None and existing is not None and self._rekeys(existing, record, file_id)
        if record is not None and (existing is None or rekey) and phone_uuid(record.phone_number) in known:
            reason = f"Phone Number {record.phone_number} already belongs to another customer"
            report.issues.append(RowIssue(labels[0], record.row, reason))
            report.issues += [RowIssue(labels[1], r.row, f"its customer row {record.row} was rejected: {reason}") for r in rows]
            return []
        aggregates: list[Aggregate] = []
        customer_id = file_id
        if existing is not None:
            customer_id = existing.customer_id
            if rekey:
                assert record is not None
                # The ID went to someone else (registered before the import): the file's
                # customer gets a new ID, with the file's ID on record, like a repeated Loan ID.
                existing, customer_id = None, self.ids.next_customer_id()
                aggregates.append(FileCustomer.link(file_id, customer_id))
                report.rekeyed_customers.append({"row": record.row, "file_customer_id": file_id, "customer_id": customer_id})
            elif record is not None:
                changed = _changes(existing, record, _CUSTOMER_COMPARED)
                if changed:
                    # The ledger keeps what it recorded; the row still names the customer its new loans go to.
                    as_customer = f" (as customer {customer_id})" if customer_id != file_id else ""
                    report.issues.append(
                        RowIssue(
                            labels[0],
                            record.row,
                            f"Customer ID {file_id} is already recorded{as_customer} with other details:"
                            f" {', '.join(changed)}. A recorded customer is not changed: this row's details are not"
                            " taken, and its loans not yet recorded are imported for the customer as recorded",
                        )
                    )
                else:
                    report.customers_already_present += 1
        elif record is None:
            report.issues += [
                RowIssue(
                    labels[1], r.row, f"Customer ID {file_id} has no accepted row in the customer file and is not in the ledger"
                )
                for r in rows
            ]
            return []

        if existing is None:
            assert record is not None
            aggregates.append(PhoneNumber.claim(record.phone_number, customer_id))

        already = existing.imported_loans() if existing is not None else {}
        terms_list: list[LoanTerms] = []
        for row in _count_recorded(rows, already, labels[1], report) if already else rows:
            terms = self._imported_terms(row, claims)
            if terms.loan_id != row.loan_id:
                report.rekeyed_loans.append(
                    {"row": row.row, "customer_id": customer_id, "file_loan_id": row.loan_id, "loan_id": terms.loan_id}
                )
            terms_list.append(terms)
            if terms.loan_id <= claims.contested:
                # A booking that drew this ID before the import reserved past it may still be saving:
                # the loan's own aggregate makes one of the two saves fail on the event store's key.
                aggregates.append(Loan.open(customer_id, terms))
        report.loans_imported += len(terms_list)

        if existing is None:
            assert record is not None
            aggregates.append(
                Customer.import_history(
                    customer_id=customer_id,
                    first_name=record.first_name,
                    last_name=record.last_name,
                    age=record.age,
                    phone_number=record.phone_number,
                    monthly_income=record.monthly_income,
                    approved_limit=record.approved_limit,
                    loans=terms_list,
                    source_customer_id=file_id if customer_id != file_id else None,
                )
            )
            report.customers_imported += 1
        elif terms_list:
            existing.import_loans(customer_id, terms_list)
            aggregates.append(existing)
        return aggregates

    def _rows_claiming_no_phone(self, customers: Sequence[CustomerRecord]) -> set[int]:
        """The rows, among those whose Phone Number another row repeats, that take no phone, and so
        do not take it from the row that repeats it: a row of a customer recorded before under its
        ID with another phone (the ledger keeps the recorded one; the row is reported as
        differing), and a row for a new (or re-keyed) customer whose phone the ledger holds
        already (refused by `_import_unit`). Repeats are rare: only their rows are looked up."""
        phones = sorted(record.phone_number for record in customers)  # a list, not a dict of 100,000 phones
        repeated = {phones[i] for i in range(1, len(phones)) if phones[i] == phones[i - 1]}
        del phones
        rows = [record for record in customers if record.phone_number in repeated]
        if not rows:
            return set()
        candidates = {
            u for r in rows for u in (customer_uuid(r.customer_id), file_customer_uuid(r.customer_id), phone_uuid(r.phone_number))
        }
        known = self.index.existing(candidates)
        unclaimed: set[int] = set()
        for record in rows:
            existing = self._customer_for_file_id(record.customer_id, known)
            if existing is not None and not self._rekeys(existing, record, record.customer_id):
                if existing.phone_number != record.phone_number:
                    unclaimed.add(record.row)
            elif phone_uuid(record.phone_number) in known:  # a new customer, or one re-keyed
                unclaimed.add(record.row)
        return unclaimed

    def _rekeys(self, existing: Customer, record: CustomerRecord, file_id: int) -> bool:
        """Whether the file's customer `file_id` goes to a new ID, away from the ledger's `existing`.
        A customer imported under this file ID before is the file's customer, however its row
        reads now (a name or a phone number corrected since): only someone else holding the ID
        (registered before the first import) sends the file's customer to a new ID."""
        differs = not existing.same_person(record.first_name, record.last_name, record.phone_number)
        return differs and not self._is_file_customer(existing, file_id)

    def _is_file_customer(self, customer: Customer, file_id: int) -> bool:
        """Whether `customer` is the lender's file customer `file_id`: re-keyed from it, or imported
        under it (its history holds imported loans, or its first event imported it; only loan rows
        without a customer row ask, so reading that event is rare)."""
        if customer.source_customer_id is not None:
            return customer.source_customer_id == file_id
        if customer.customer_id != file_id:
            return False
        if any(loan.source_loan_id is not None for loan in customer.loans):
            return True
        first = next(iter(self.events.get(customer.id, limit=1)), None)
        return isinstance(first, Customer.HistoryImported)

    def _customer_for_file_id(self, file_id: int, known: set[UUID]) -> Customer | None:
        """The ledger's customer for a file's Customer ID: the one it was re-keyed to, or the one holding the ID."""
        if file_customer_uuid(file_id) in known:
            link: FileCustomer = self.repository.get(file_customer_uuid(file_id))
            return self.get_customer(link.customer_id)
        if customer_uuid(file_id) in known:
            return self.get_customer(file_id)
        return None

    def _imported_terms(self, row: LoanRecord, claims: _Claims) -> LoanTerms:
        return LoanTerms(
            loan_id=claims.fresh() if row.row in claims.moved else row.loan_id,
            amount=row.amount,
            interest_rate=row.interest_rate,
            tenure=row.tenure,
            monthly_installment=row.monthly_payment,
            start_date=row.start_date,
            end_date=row.end_date,
            emis_paid=row.emis_paid_on_time,
            emis_paid_on_time=row.emis_paid_on_time,
            source_loan_id=row.loan_id,
        )


# What a re-imported row is compared on: (the file's column, the row's field, the recorded field).
# EMIs paid on Time is not compared: the repayments recorded since the import have added to it.
_CUSTOMER_COMPARED = tuple(
    (column, field, field)
    for column, field in zip(
        CUSTOMER_COLUMNS[1:],
        ("first_name", "last_name", "age", "phone_number", "monthly_income", "approved_limit"),
        strict=True,
    )
)
_LOAN_COMPARED = (
    ("Loan Amount", "amount", "amount"),
    ("Tenure", "tenure", "tenure"),
    ("Interest Rate", "interest_rate", "interest_rate"),
    ("Monthly payment", "monthly_payment", "monthly_installment"),
    ("Date of Approval", "start_date", "start_date"),
    ("End Date", "end_date", "end_date"),
)


def _changes(recorded: object, row: object, compared: tuple[tuple[str, str, str], ...]) -> list[str]:
    """Where a file row differs from what the ledger recorded for it."""
    return [
        f"{column} {_figure(getattr(recorded, kept))} recorded, {_figure(getattr(row, given))} in this row"
        for column, given, kept in compared
        if getattr(row, given) != getattr(recorded, kept)
    ]


def _figure(value: object) -> str:
    """A number as a person writes it (100000, 8.5: a cell read as 100000.0 is the same figure)."""
    return f"{value.normalize():f}" if isinstance(value, Decimal) else str(value)


def _count_recorded(
    rows: list[LoanRecord], recorded: dict[int, list[LoanTerms]], label: str, report: ImportReport
) -> list[LoanRecord]:
    """Count or report the loan rows that stand for loans the customer's history holds already
    (`recorded`, by the file's Loan ID: from this file, or an earlier import of it), and return
    the others, which are new loans. Rows and recorded loans of one Loan ID are matched one to
    one: a row with a recorded loan's figures is already present; a row left over while a
    recorded loan is too is reported against the closest of them (a recorded loan is not
    changed); rows beyond the recorded loans are new (a Loan ID used once more for the customer)."""
    handled: set[int] = set()
    rows_of: dict[int, list[LoanRecord]] = {}
    for row in rows:
        if row.loan_id in recorded:
            rows_of.setdefault(row.loan_id, []).append(row)
    for loan_id, same_id in rows_of.items():
        left = list(recorded[loan_id])
        unmatched: list[LoanRecord] = []
        for row in same_id:
            match = next((terms for terms in left if not _changes(terms, row, _LOAN_COMPARED)), None)
            if match is None:
                unmatched.append(row)
                continue
            left.remove(match)
            handled.add(row.row)
            report.loans_already_present += 1
        for row in unmatched[: len(left)]:
            changes, closest = min(((_changes(t, row, _LOAN_COMPARED), t) for t in left), key=lambda c: len(c[0]))
            left.remove(closest)
            handled.add(row.row)
            as_loan = f" (as loan {closest.loan_id})" if closest.loan_id != loan_id else ""
            report.issues.append(
                RowIssue(
                    label,
                    row.row,
                    f"Loan ID {loan_id} is already recorded{as_loan} with other figures: {', '.join(changes)}. An"
                    " imported loan is not changed: this row is not imported",
                )
            )
    return [row for row in rows if row.row not in handled]


@dataclass(frozen=True)
class _ImportPlan:
    """What every batch of one import is planned with."""

    first_use: dict[int, int]  # a Loan ID used by several rows -> the first of them
    contested: int  # IDs at or below this may already be held (see Ledger.import_history)
    labels: tuple[str, str]
    refused: dict[int, tuple[int, str]]  # Customer IDs whose rows were all refused -> one of them, and why

    def refuses(self, record: CustomerRecord | None, file_id: int) -> bool:
        """Whether a unit's loan rows go with its customer's refused row."""
        return record is None and file_id in self.refused


@dataclass(frozen=True)
class _PlannedBatch:
    units: list[Unit]
    rows_before: int
    rows_after: int
    aggregates: list[Aggregate]  # the job last
    report: ImportReport
    last_event: Any  # the job's progress, saved last: stored means the batch went in


class _FreshLoanIds:
    """New loan IDs for a batch's re-keyed rows, drawn in one round trip when the first is needed
    (a million-loan file re-keys tens of thousands; one query each took a tenth of the import)."""

    def __init__(self, ids: IdAllocator) -> None:
        self._ids = ids
        self.expected = 1  # how many the batch will need: drawn together
        self._again = 1
        self._drawn: list[int] = []

    def __call__(self) -> int:
        if not self._drawn:
            # `expected` may fall short (see _Claims.decide): each draw after the first is twice
            # the one before, so a shortfall costs a few round trips, and wastes fewer IDs than it used.
            count = max(self.expected, self._again)
            self._drawn = self._ids.next_loan_ids(count)[::-1]
            self.expected, self._again = 0, 2 * count
        return self._drawn.pop()


@dataclass(frozen=True)
class _Claims:
    """Which loan rows of a batch keep the file's Loan ID."""

    first_use: dict[int, int]  # a Loan ID used by several rows -> the first of them
    contested: int  # IDs at or below this may already be held (see Ledger.import_history)
    known: set[UUID]
    taken: set[int]
    fresh: _FreshLoanIds  # new IDs for the rows that do not keep theirs
    moved: set[int] = field(default_factory=set)  # the rows (numbers) that get a new ID

    def decide(self, rows: Iterable[LoanRecord]) -> None:
        moved = [row for row in rows if not self.keeps(row)]
        self.moved.update(row.row for row in moved)
        # Drawn together: the moved rows, less those a recorded customer's history likely holds
        # already (a re-import: counted present, they need no ID). A guess short of the need
        # draws the rest one at a time; one over it would waste IDs.
        self.fresh.expected = sum(not self._likely_recorded(row) for row in moved)

    def _likely_recorded(self, row: LoanRecord) -> bool:
        if row.loan_id not in self.taken:  # the common case, and the cheap test: no ID worked out
            return False
        return customer_uuid(row.customer_id) in self.known or file_customer_uuid(row.customer_id) in self.known

    def keeps(self, row: LoanRecord) -> bool:
        loan_id = row.loan_id
        if self.first_use.get(loan_id, row.row) != row.row:
            return False
        return loan_id > self.contested or (loan_uuid(loan_id) not in self.known and loan_id not in self.taken)


def _first_rows_of_repeated_ids(loans: Sequence[LoanRecord], refused: Container[int]) -> dict[int, int]:
    """The first row of each Loan ID that several rows use, not counting the rows of the
    customers in `refused`. Only those IDs: a dict of every ID of a million-loan file takes 40 MB;
    the IDs sorted in a list take 8."""
    ids = sorted(loan.loan_id for loan in loans)
    repeated = {ids[i] for i in range(1, len(ids)) if ids[i] == ids[i - 1]}
    del ids
    first: dict[int, int] = {}
    for loan in loans:
        if loan.loan_id in repeated and loan.customer_id not in refused:
            first.setdefault(loan.loan_id, loan.row)
    return first


def _candidate_ids(batch: Sequence[tuple[CustomerRecord | None, int, list[LoanRecord]]], contested: int) -> set[UUID]:
    """Every aggregate a batch of the import might find already recorded."""
    ids: set[UUID] = set()
    for record, file_id, rows in batch:
        ids |= {customer_uuid(file_id), file_customer_uuid(file_id)}
        if record is not None:
            ids.add(phone_uuid(record.phone_number))
        ids |= {loan_uuid(row.loan_id) for row in rows if row.loan_id <= contested}
    return ids


Unit = tuple[CustomerRecord | None, int, list[LoanRecord]]


def _batches(units: Sequence[Unit], customers: int, rows: int) -> list[list[Unit]]:
    """Consecutive units, at most `customers` of them and about `rows` rows (a customer's loans stay together)."""
    batches: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for unit in units:
        weight = 1 + len(unit[2])
        if current and (len(current) >= customers or size + weight > rows):
            batches.append(current)
            current, size = [], 0
        current.append(unit)
        size += weight
    if current:
        batches.append(current)
    return batches
