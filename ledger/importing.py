"""Importing the lender's history: a job's rows grouped by customer and planned in batches,
each batch's events saved while the next is planned; Loan IDs claimed or re-keyed; rows a
ledger holds already matched against what it recorded."""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import RecordConflictError

from ledger.conflicts import SAVE_ATTEMPTS, another_writer, back_off
from ledger.domain import (
    Contention,
    Customer,
    FileCustomer,
    ImportJob,
    Loan,
    LoanTerms,
    PhoneNumber,
    RowIssue,
    customer_uuid,
    file_customer_uuid,
    loan_uuid,
    phone_uuid,
)
from ledger.history import CUSTOMER_COLUMNS, CustomerRecord, LoanRecord
from ledger.ports import IdAllocator

if TYPE_CHECKING:
    from ledger.application import Ledger

# One save is one psycopg pipeline carrying every event as a single array parameter; saves of
# several MiB were seen to hang (bench/pipeline_hang.py), so a batch also stops at this many rows.
MAX_ROWS_PER_SAVE = 2000
CUSTOMERS_READ_AT_ONCE = 500  # as a batch of the default size reads them


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


class HistoryImport:
    """One run of an import job over the rows read from its files, on `ledger`'s event store."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def run(
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
        job = self.ledger.get_import_job(job_id)
        job.check_files(files_digest)  # raises ImportFilesChanged: a run resuming it must read the same files
        earlier_runs = ImportReport.recorded_by(job)  # nothing, unless this run resumes the job
        labels = job.file_names
        today = self.ledger.clock.today()
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
        self.ledger._save_once(job)
        # Every Customer ID the files name is the file's: neither a customer re-keyed by this import
        # nor one registered later may take an ID that a loan row names without a customer row.
        file_ids = max((c.customer_id for c in customers), default=0), max((ln.customer_id for ln in loans), default=0)
        if max(file_ids) > 0:
            self.ledger.ids.reserve_customer_ids_through(max(file_ids))
        # A file's Loan ID above `contested` is held by no one: no booking, no earlier import. Only the
        # IDs at or below it need checking, and claim an aggregate of their own (see _import_unit).
        contested = self.ledger.ids.reserve_loan_ids_through(max(ln.loan_id for ln in loans)) if loans else 0

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
                storing = planned, saver.submit(self.ledger._store_encoded, *self.ledger._encode(*planned.aggregates))
            if storing is not None:
                job = self._stored(job_id, *storing, plan, report, on_batch, total_rows) or job

        report.count_earlier_runs(earlier_runs)
        job.complete(report.summary())
        self.ledger._save_once(job)
        return report

    def _plan_batch(self, job: ImportJob, units: list[Unit], rows_before: int, plan: _ImportPlan) -> _PlannedBatch:
        """The events for a batch of customers and their loans, and the job's progress after it."""
        rows = sum((record is not None) + len(loans) for record, _, loans in units)
        report = ImportReport()
        known = self.ledger.index.existing(_candidate_ids(units, plan.contested))
        recorded = self._customers_for_file_ids([cid for _, cid, _ in units], known)
        taken = self.ledger.loans.taken({r.loan_id for _, _, rows in units for r in rows if r.loan_id <= plan.contested})
        claims = _Claims(plan.first_use, plan.contested, known, taken, _FreshLoanIds(self.ledger.ids))
        claims.decide(r for record, cid, rows in units if not plan.refuses(record, cid) for r in rows)
        aggregates: list[Aggregate] = []
        for record, cid, loans in units:
            aggregates += self._import_unit(record, cid, loans, recorded.get(cid), claims, plan, known, report)
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
            if not another_writer(error):
                raise
            if not self.ledger._recorded(planned.last_event):  # else the batch went in, its answer lost (see Ledger._save_once)
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
        back_off(0)  # the first save's conflict: let the other writer get clear
        while pending:
            units = pending.pop(0)
            part = self._plan_batch(self.ledger.get_import_job(job_id), units, rows_before, plan)
            try:
                self.ledger._save_once(*part.aggregates)
            except RecordConflictError as error:
                if not another_writer(error):
                    raise
                conflicts += 1
                if conflicts == SAVE_ATTEMPTS:
                    raise Contention(
                        f"other requests kept changing customers of the file ({SAVE_ATTEMPTS} conflicts in a row while"
                        " saving them); what was imported stays: import the files again to add the rest"
                    ) from error
                pending[:0] = [units[: len(units) // 2], units[len(units) // 2 :]] if len(units) > 1 else [units]
                back_off(conflicts)
                continue
            report.add(part.report)
            rows_before, last = part.rows_after, part
        return _PlannedBatch(planned.units, planned.rows_before, rows_before, last.aggregates, report, last.last_event)

    def _import_unit(
        self,
        record: CustomerRecord | None,
        file_id: int,
        rows: list[LoanRecord],
        existing: Customer | None,
        claims: _Claims,
        plan: _ImportPlan,
        known: set[UUID],
        report: ImportReport,
    ) -> list[Aggregate]:
        """The events for one customer row (file Customer ID `file_id`) and its loan rows.

        `existing` is the ledger's customer for the file ID, if any; `known` holds which of the
        batch's candidate aggregates already exist."""
        labels = plan.labels
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
                existing, customer_id = None, self.ledger.ids.next_customer_id()
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
        known = self.ledger.index.existing(candidates)
        unclaimed: set[int] = set()
        for start in range(0, len(rows), CUSTOMERS_READ_AT_ONCE):  # a file of repeats: not all its customers in memory
            some = rows[start : start + CUSTOMERS_READ_AT_ONCE]
            recorded = self._customers_for_file_ids([record.customer_id for record in some], known)
            for record in some:
                existing = recorded.get(record.customer_id)
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
        first = next(iter(self.ledger.events.get(customer.id, limit=1)), None)
        return isinstance(first, Customer.HistoryImported)

    def _customers_for_file_ids(self, file_ids: Collection[int], known: set[UUID]) -> dict[int, Customer]:
        """The ledger's customer for each of these file Customer IDs that has one: the one it was
        re-keyed to, or the one holding the ID. Read together, in two round trips: a re-import finds
        every customer of its file recorded, and a read each took about half its time."""
        linked = {file_id: file_customer_uuid(file_id) for file_id in file_ids if file_customer_uuid(file_id) in known}
        links = self.ledger.aggregates(set(linked.values()))
        holders = {file_id: cast(FileCustomer, links[link]).customer_id for file_id, link in linked.items()}
        holders.update({file_id: file_id for file_id in file_ids if file_id not in holders and customer_uuid(file_id) in known})
        customers = self.ledger.aggregates({customer_uuid(customer_id) for customer_id in holders.values()})
        found = {}
        for file_id, customer_id in holders.items():
            customer = customers.get(customer_uuid(customer_id))
            found[file_id] = customer if customer is not None else self.ledger.get_customer(customer_id)  # raises
        return found

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
    contested: int  # IDs at or below this may already be held (see HistoryImport.run)
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
    contested: int  # IDs at or below this may already be held (see HistoryImport.run)
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
