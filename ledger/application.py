"""The Ledger application: its methods are the commands."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import date
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
from ledger.conflicts import SAVE_ATTEMPTS, another_writer, back_off
from ledger.domain import (
    Contention,
    Customer,
    CustomerNotFound,
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
    idempotency_uuid,
    loan_uuid,
    phone_uuid,
)
from ledger.history import CustomerRecord, LoanRecord
from ledger.importing import HistoryImport, ImportReport
from ledger.mapper import TypedMapper
from ledger.policy import Decision, LoanRequest, approved_limit, decide
from ledger.ports import AggregateIndex, Clock, IdAllocator, InMemoryIds, LoanDirectory, SystemClock
from ledger.schedule import amortization

log = logging.getLogger(__name__)

# The event store stopped answering (the recorder gave up its retries): what was being saved may or may not be.
DATABASE_AWAY = (OperationalError, InterfaceError)

INSERT_ATTEMPTS = 10  # as the library's recorder retries an insert whose connection broke
INSERT_RETRY_SECONDS = 0.2


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

    def select_latest_many(
        self, originator_ids: Collection[UUID], snapshots: Any
    ) -> dict[UUID, tuple[StoredEvent | None, list[StoredEvent]]]:
        """`select_latest` of each aggregate recorded among these."""
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
        return self._project(aggregate_id, version, self._decoded(snapshot, events), projector_func)

    def _decoded(self, snapshot: StoredEvent | None, events: list[StoredEvent]) -> list[Any]:
        """A snapshot (if any) and the events after it, as domain events."""
        assert self.snapshot_store is not None  # only asked with one
        domain_events: list[Any] = [] if snapshot is None else [self.snapshot_store.mapper.to_domain_event(snapshot)]
        domain_events += map(self.event_store.mapper.to_domain_event, events)
        return domain_events

    def get_many(self, aggregate_ids: Collection[UUID]) -> dict[UUID, Any]:
        """The aggregates with these IDs (those recorded: an ID with no events is left out), read
        together in one round trip when the recorder can, else one at a time."""
        recorder = self.event_store.recorder
        found: dict[UUID, Any] = {}
        if not aggregate_ids:
            return found
        if self.snapshot_store is None or not hasattr(recorder, "select_latest_many"):
            for aggregate_id in aggregate_ids:
                with contextlib.suppress(AggregateNotFoundError):
                    found[aggregate_id] = self.get(aggregate_id)
            return found
        latest = cast("LatestReader", recorder).select_latest_many(aggregate_ids, self.snapshot_store.recorder)
        for aggregate_id, (snapshot, events) in latest.items():
            try:
                found[aggregate_id] = self._project(aggregate_id, None, self._decoded(snapshot, events), project_aggregate)
            except MapperDeserialisationError:
                found[aggregate_id] = self.get(aggregate_id)  # its snapshot unreadable: as `get` reads it
        return found

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

    def aggregates(self, aggregate_ids: Collection[UUID]) -> dict[UUID, Any]:
        """Many aggregates at once, by ID (see _Repository.get_many)."""
        return cast(_Repository, self.repository).get_many(aggregate_ids)

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
                if not another_writer(error):
                    raise
                back_off(n)
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
        """Replay the lender's history as events (`ledger.importing`), `batch_size` customers per transaction."""
        return HistoryImport(self).run(
            job_id, customers, loans, issues, batch_size=batch_size, on_batch=on_batch, files_digest=files_digest
        )
