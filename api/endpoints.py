"""The endpoint functions: decode, call the application or a view, encode."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar
from uuid import UUID

from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from api import schemas
from api.errors import ApiError
from api.observability import BOOKINGS, EVENTS_APPENDED, exposition
from api.querycache import KeptAnswers
from api.readyourwrites import PositionWatcher
from api.validation import decode
from infra.config import Settings
from ledger.application import Ledger, Saved
from ledger.domain import (
    OutcomeUnknown,
    customer_uuid,
)
from ledger.money import to_money
from ledger.policy import CreditHistory, CreditScore, LoanRequest, credit_history, credit_score, decide
from ledger.schedule import amortization
from projections import views
from workers import tasks

log = logging.getLogger(__name__)

SavedT = TypeVar("SavedT", bound=Saved)
T = TypeVar("T")
COMMAND_THREADS = 40  # as many as Starlette's threadpool (anyio's default limiter) allowed them

PROJECTION_HEADER = "X-Read-Model"


@dataclass
class ProjectionProgress:
    """Since when the projection has been behind at the same position, as this process's
    `/ready` calls have seen it: a projection that fails on an event (or a worker that never
    runs it) stays a few events behind for good, which the lag alone does not tell."""

    position: int | None = None
    since: float = 0.0

    def stalled_for(self, position: int, behind: bool, now: float) -> float:
        """Seconds the projection has been behind at `position` (0 the first time it is seen there)."""
        if not behind:
            self.position = None
            return 0.0
        if position != self.position:
            self.position, self.since = position, now
        return now - self.since


class Shared(Generic[T]):
    """One run of a blocking call at a time, on a thread, its result shared by every caller that
    comes while it runs. Twenty /ready requests at once each held one of Celery's ten pooled broker
    connections while waiting for another: every thread of the process blocked for good, and
    with them every command's trigger (a review)."""

    def __init__(self) -> None:
        self._running: asyncio.Future[T] | None = None

    async def result(self, call: Callable[[], T]) -> T:
        if self._running is None:
            running = self._running = asyncio.ensure_future(run_in_threadpool(call))
            running.add_done_callback(self._ended)
        return await asyncio.shield(self._running)  # a caller that goes away leaves the run to the others

    def _ended(self, running: asyncio.Future[T]) -> None:
        if self._running is running:
            self._running = None
        if not running.cancelled():
            running.exception()  # retrieved: no "exception was never retrieved" when every caller left


@dataclass
class Services:
    settings: Settings
    ledger: Ledger
    pool: AsyncConnectionPool
    sync_pool: ConnectionPool
    watcher: PositionWatcher
    answers: KeptAnswers = field(default_factory=KeptAnswers)
    progress: ProjectionProgress = field(default_factory=ProjectionProgress)
    broker_checks: Shared[dict[str, schemas.Check]] = field(default_factory=Shared)
    commands: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=COMMAND_THREADS, thread_name_prefix="command")
    )


async def in_thread(threads: ThreadPoolExecutor, call: Callable[..., T], *args: Any) -> T:
    """Run a command's blocking call on one of `threads` (`Services.commands`), in the caller's
    context: asyncio's executor hands a call over and back for about half the CPU that anyio's
    threads (Starlette's `run_in_threadpool`) take, 50 µs against 110. Cancelled as anyio's are by
    a plain cancellation: a call still waiting for a thread never runs, and a caller cancelled
    while its call runs gets the cancellation at once, the call finishing on its thread (the
    lifespan waits for those before it closes the pools)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(threads, functools.partial(context.run, call, *args))


def services(request: Request) -> Services:
    """The app's services, refusing at once (503) while the database is known to be down."""
    svc: Services = request.app.state.services
    if not svc.watcher.connected:
        raise ApiError(503, "database_unavailable", "The database is unavailable; try again shortly")
    return svc


def json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(schemas.encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


def path_int(request: Request, name: str) -> int:
    raw = request.path_params[name]
    digits = raw.lstrip("0")  # the same number with leading zeros at any length (19 characters was the limit)
    if not re.fullmatch(r"[0-9]{1,19}", digits) or not 1 <= int(digits) <= schemas.BIGINT:
        raise ApiError(
            400,
            "validation_error",
            f"{name} must be a positive integer of at most {schemas.BIGINT}",  # 2**63 was "not a positive integer"
            [{"field": name, "message": f"Expected a positive integer of at most {schemas.BIGINT}, got {raw!r}"}],
        )
    return int(digits)


def _recorded_then_triggered(action: Callable[..., SavedT], *args: Any) -> tuple[SavedT, bool]:
    """Run a command, then ask a worker to project what it recorded: one trip to a worker thread
    for both. False when the trigger could not reach Redis."""
    try:
        saved = action(*args)
    except OutcomeUnknown:
        tasks.trigger_catch_up()  # what may be recorded shows in the views as soon as the database is back
        raise
    return saved, saved.last_position is None or tasks.trigger_catch_up()


KEYED_RETRY = "retry with the same Idempotency-Key, which answers with what was recorded"


def outcome_unknown(error: OutcomeUnknown, what_to_do: str) -> ApiError:
    """The command may or may not be recorded: 503, saying so and what to do next."""
    return ApiError(503, "database_unavailable", f"{error}: {what_to_do}", {"recorded": "unknown"}, {"Retry-After": "1"})


async def run_command(
    svc: Services, action: Callable[..., SavedT], *args: Any, if_unknown: str = KEYED_RETRY
) -> tuple[SavedT, dict[str, str]]:
    """Run a command in a worker thread, trigger the projection, and wait (bounded) until the
    read model shows the command's events: the response headers say whether it does.
    `if_unknown` tells the client what to do when the command may or may not have been recorded."""
    try:
        saved, triggered = await in_thread(svc.commands, _recorded_then_triggered, action, *args)
    except OutcomeUnknown as error:
        raise outcome_unknown(error, if_unknown) from error
    return saved, await after_command(svc, saved, triggered)


async def after_command(svc: Services, saved: Saved, triggered: bool) -> dict[str, str]:
    """Wait (bounded) until the projection, once triggered, shows the command's events."""
    if saved.last_position is None:
        return {}
    EVENTS_APPENDED.inc(saved.events)
    if not triggered:
        return {PROJECTION_HEADER: "behind"}
    caught_up = await svc.watcher.wait_for(saved.last_position, svc.settings.read_your_writes_timeout)
    return {PROJECTION_HEADER: "current" if caught_up else "behind"}


def _look_first(history: str) -> str:
    return (
        f"before sending it again, look at GET {history}, which reads the event store (the other views may not show"
        " it yet); an Idempotency-Key makes such a retry safe"
    )


def _phone(value: int | str) -> str:
    return str(value)


async def register(request: Request) -> Response:
    svc = services(request)
    body = decode(await json_body(request), schemas.RegisterRequest, aliases=schemas.ALIASES[schemas.RegisterRequest])
    key = idempotency_key(request)
    registration, headers = await run_command(
        svc,
        svc.ledger.register_customer,
        body.first_name.strip(),
        body.last_name.strip(),
        body.age,
        _phone(body.phone_number),
        body.monthly_income,
        key,
        if_unknown=KEYED_RETRY
        if key
        else "sending it again is safe: if it was recorded, the answer is 409 phone_number_taken"
        " (with an Idempotency-Key, the retry would answer with the customer)",
    )
    if registration.replayed:
        headers["Idempotent-Replayed"] = "true"
    customer = registration.customer
    return json(
        schemas.RegisterResponse(
            customer_id=customer.customer_id,
            name=f"{customer.first_name} {customer.last_name}",
            age=customer.age,
            monthly_income=to_money(customer.monthly_income),
            approved_limit=to_money(customer.approved_limit),
            phone_number=int(customer.phone_number),
        ),
        201,
        headers,
    )


def _loan_request(body: schemas.LoanRequestBody) -> LoanRequest:
    return LoanRequest(amount=body.loan_amount, interest_rate=body.interest_rate, tenure=body.tenure)


async def check_eligibility(request: Request) -> Response:
    svc = services(request)
    body = decode(await json_body(request), schemas.LoanRequestBody)
    profile, history = await _customer_today(svc, body.customer_id)
    decision = decide(history, profile.monthly_income, profile.approved_limit, _loan_request(body))
    return json(
        schemas.EligibilityResponse(
            customer_id=body.customer_id,
            approval=decision.approved,
            interest_rate=body.interest_rate,
            corrected_interest_rate=decision.corrected_interest_rate,
            tenure=body.tenure,
            monthly_installment=decision.monthly_installment,
            credit_score=decision.credit.score,
            credit_score_breakdown=breakdown(history, decision.credit, profile.approved_limit),
            message=None if decision.approved else decision.message,
        )
    )


async def _customer_today(svc: Services, customer_id: int) -> tuple[views.CustomerProfile, CreditHistory]:
    """The customer and their credit history as of today: read and scored again only when the
    projection has changed them since, or the date has moved (api.querycache)."""
    today = svc.ledger.clock.today()

    async def read() -> tuple[views.CustomerProfile, CreditHistory]:
        async with svc.pool.connection() as conn:
            profile = await views.customer(conn, customer_id)
            if profile is None:
                raise ApiError(404, "customer_not_found", f"customer {customer_id} not found")
            return profile, credit_history(await views.loan_facts(conn, customer_id), today)

    return await svc.answers.answer(customer_id, "history", today, read)


def breakdown(history: CreditHistory, credit: CreditScore, limit: Decimal) -> schemas.CreditScoreBreakdown:
    return schemas.CreditScoreBreakdown(
        base=credit.base,
        payment_history=credit.payment_history,
        completed_loans=credit.completed_loans,
        current_year_activity=credit.current_year_activity,
        credit_utilisation=credit.credit_utilisation,
        over_limit=credit.over_limit,
        inputs=schemas.CreditInputs(
            loans_taken=history.loans_taken,
            completed_loans=history.completed_loans,
            loans_this_year=history.loans_this_year,
            emis_due=history.emis_due,
            emis_paid_on_time=history.emis_paid_on_time,
            current_loans=history.current_loans,
            current_debt=to_money(history.current_debt),
            current_emis=to_money(history.current_emis),
            approved_limit=to_money(limit),
        ),
    )


IDEMPOTENCY_KEY_MAX = 255
JSON_MEDIA = re.compile(r"application/(?:[\w.-]+\+)?json", re.IGNORECASE)


async def json_body(request: Request) -> bytes:
    """The request's body, declared as JSON when there is one. A browser sends a text/plain or
    form body to any site without asking it first (no CORS preflight): a page an operator opened
    could book loans or register customers here with one (a review). A JSON body it cannot send
    unasked, so any other Content-Type, or none, is a 415."""
    body = await request.body()
    if body:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip(" \t")
        if not JSON_MEDIA.fullmatch(media):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the body as JSON, with Content-Type: application/json (not {media or 'no Content-Type'})",
                [{"field": "Content-Type", "message": f"Expected application/json, got {media or 'none'}"}],
            )
    return body


def idempotency_key(request: Request) -> str | None:
    keys = request.headers.getlist("Idempotency-Key")
    if len(keys) > 1:  # which one the client meant is not ours to guess: the first only would replay wrongly
        raise ApiError(
            400,
            "validation_error",
            f"send one Idempotency-Key header, not {len(keys)}",
            [{"field": "Idempotency-Key", "message": f"{len(keys)} headers"}],
        )
    if not keys:
        return None
    # Without the spaces or tabs around it, which are not part of a header's value (RFC 9110, 5.5):
    # "retry-42" and "retry-42 " were two keys, and a retry through a proxy that trims booked twice.
    key = keys[0].strip(" \t")
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not (key.isascii() and key.isprintable()):
        raise ApiError(
            400,
            "validation_error",
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters, not blank",
            [{"field": "Idempotency-Key", "message": "not 1 to 255 printable ASCII characters"}],
        )
    return key


async def create_loan(request: Request) -> Response:
    svc = services(request)
    body = decode(await json_body(request), schemas.LoanRequestBody)
    key = idempotency_key(request)
    booking, headers = await run_command(
        svc,
        svc.ledger.book_loan,
        body.customer_id,
        _loan_request(body),
        key,
        if_unknown=KEYED_RETRY if key else _look_first(f"/customers/{body.customer_id}/history"),
    )
    if booking.replayed:
        headers["Idempotent-Replayed"] = "true"
    response = booking.response
    BOOKINGS.labels("replayed" if booking.replayed else "approved" if response["loan_approved"] else "refused").inc()
    return json(
        schemas.CreateLoanResponse(
            loan_id=response["loan_id"],
            customer_id=response["customer_id"],
            loan_approved=response["loan_approved"],
            message=response["message"],
            monthly_installment=to_money(response["monthly_installment"]),
        ),
        201 if response["loan_id"] is not None else 200,
        headers,
    )


async def view_loan(request: Request) -> Response:
    svc = services(request)
    loan_id = path_int(request, "loan_id")
    body: bytes | None = svc.answers.loan(loan_id)
    if body is not None:
        return Response(body, media_type="application/json")
    since = svc.answers.since()
    async with svc.pool.connection() as conn:
        row = await views.loan(conn, loan_id)
    if row is None:
        raise ApiError(404, "loan_not_found", f"loan {loan_id} not found")
    body = schemas.encoder.encode(
        schemas.LoanView(
            loan_id=row["loan_id"],
            customer=schemas.LoanCustomer(
                id=row["customer_id"],
                first_name=row["first_name"],
                last_name=row["last_name"],
                phone_number=int(row["phone_number"]),
                age=row["age"],
            ),
            loan_amount=to_money(row["loan_amount"]),
            interest_rate=row["interest_rate"],
            monthly_installment=to_money(row["monthly_installment"]),
            tenure=row["tenure"],
        )
    )
    svc.answers.keep_loan(row["customer_id"], loan_id, body, since)
    return Response(body, media_type="application/json")


async def view_loans(request: Request) -> Response:
    svc = services(request)
    customer_id = path_int(request, "customer_id")
    today = svc.ledger.clock.today()

    async def read() -> bytes:
        async with svc.pool.connection() as conn:
            if not await views.customer_exists(conn, customer_id):
                raise ApiError(404, "customer_not_found", f"customer {customer_id} not found")
            rows = await views.current_loans(conn, customer_id, today)
        return schemas.encoder.encode(
            [
                schemas.CustomerLoan(
                    loan_id=r["loan_id"],
                    loan_amount=to_money(r["loan_amount"]),
                    interest_rate=r["interest_rate"],
                    monthly_installment=to_money(r["monthly_installment"]),
                    repayments_left=r["repayments_left"],
                )
                for r in rows
            ]
        )

    return Response(await svc.answers.answer(customer_id, "loans", today, read), media_type="application/json")


def _inside(directory: Path, name: str) -> Path | None:
    """The file `name` in the import directory, or None when it is not a file there."""
    try:
        path = (directory / name).resolve()
        return path if path.parent == directory.resolve() and path.is_file() else None
    except (OSError, ValueError):
        return None


async def start_import(request: Request) -> Response:
    svc = services(request)
    body = decode(await json_body(request), schemas.ImportRequest, empty_ok=True)
    directory = svc.settings.import_dir
    names = {"customers_file": body.customers_file, "loans_file": body.loans_file}
    paths = {field: _inside(directory, name) for field, name in names.items()}
    missing = [(field, names[field]) for field, path in paths.items() if path is None]
    customers, loans = paths["customers_file"], paths["loans_file"]
    if customers is None or loans is None:  # `missing` names them
        refused = " and ".join(repr(name) for _, name in missing)
        raise ApiError(
            400,
            "validation_error",
            f"{refused} {'is not a file' if len(missing) == 1 else 'are not files'} in the import directory",
            [{"field": field, "message": f"no file {name!r} in the import directory"} for field, name in missing],
        )
    try:
        job_id, saved = await in_thread(svc.commands, svc.ledger.request_import, str(customers), str(loans))
    except OutcomeUnknown as error:
        raise outcome_unknown(error, "sending it again is safe: an import of files already imported adds nothing") from error
    try:
        await run_in_threadpool(tasks.queue_import, str(job_id), str(customers), str(loans))
    except Exception:
        await in_thread(svc.commands, svc.ledger.fail_import, job_id, "the job could not be queued: Redis is unreachable")
        raise ApiError(503, "queue_unavailable", "The import could not be queued: Redis is unreachable") from None
    headers = await after_command(svc, saved, await run_in_threadpool(tasks.trigger_catch_up))
    headers["Location"] = f"/imports/{job_id}"
    return json({"job_id": str(job_id), "state": "queued", "status_url": f"/imports/{job_id}"}, 202, headers)


def job_view(row: dict[str, Any]) -> schemas.ImportJobView:
    return schemas.ImportJobView(
        job_id=str(row["job_id"]),
        state=row["state"],
        customers_file=Path(row["customers_file"]).name,
        loans_file=Path(row["loans_file"]).name,
        total_rows=row["total_rows"],
        rows_done=row["rows_done"],
        rows_rejected=len(row["issues"]),
        issues=[schemas.RowIssueView(**issue) for issue in row["issues"]],
        summary=row["summary"],
        requested_at=row["requested_at"].isoformat(),
        updated_at=row["updated_at"].isoformat(),
    )


_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


async def import_status(request: Request) -> Response:
    svc = services(request)
    raw = request.path_params["job_id"]
    try:
        if not _UUID_TEXT.fullmatch(raw):  # UUID() also takes braces, "urn:uuid:" and other scripts' digits
            raise ValueError(raw)
        job_id = UUID(raw)
    except ValueError:
        raise ApiError(
            400, "validation_error", "job_id must be a UUID", [{"field": "job_id", "message": f"not a UUID: {raw!r}"}]
        ) from None
    async with svc.pool.connection() as conn:
        row = await views.import_job(conn, job_id)
    if row is not None:
        return json(job_view(row))
    # Not in the read model yet (the projection may be busy with another import's report of
    # many rows): the event store has the job from the moment POST /imports answered.
    job = await in_thread(svc.commands, svc.ledger.find_import_job, job_id)
    if job is None:
        raise ApiError(404, "import_not_found", f"import job {job_id} not found")
    recorded = {
        "job_id": job_id,
        "state": job.state,
        "customers_file": job.customers_file,
        "loans_file": job.loans_file,
        "total_rows": job.total_rows,
        "rows_done": job.rows_done,
        "issues": job.issues,
        "summary": job.summary,
        "requested_at": job.created_on,
        "updated_at": job.modified_on,
    }
    return json(job_view(recorded), headers={PROJECTION_HEADER: "behind"})


async def health(request: Request) -> Response:
    """The process is up and serving (no dependency is checked)."""
    return json(schemas.Health(status="ok"))


async def record_repayment(request: Request) -> Response:
    svc = services(request)
    loan_id = path_int(request, "loan_id")
    body = decode(await json_body(request), schemas.RepaymentRequest, empty_ok=True)
    key = idempotency_key(request)
    result, headers = await run_command(
        svc,
        svc.ledger.record_repayment,
        loan_id,
        body.paid_on,
        key,
        if_unknown=KEYED_RETRY if key else _look_first(f"/loans/{loan_id}/history"),
    )
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    r = result.response
    return json(
        schemas.RepaymentResponse(
            loan_id=r["loan_id"],
            installment=r["installment"],
            paid_on=date.fromisoformat(r["paid_on"]),
            due_date=date.fromisoformat(r["due_date"]),
            on_time=r["on_time"],
            amount=Decimal(r["amount"]),  # the schedule's, in cents: exact, however many digits
            repayments_left=r["repayments_left"],
            loan_closed=r["loan_closed"],
        ),
        201,
        headers,
    )


async def loan_schedule(request: Request) -> Response:
    svc = services(request)
    loan_id = path_int(request, "loan_id")
    async with svc.pool.connection() as conn:
        loan = await views.loan_terms(conn, loan_id)
        if loan is None:
            raise ApiError(404, "loan_not_found", f"loan {loan_id} not found")
        recorded = await views.repayments(conn, loan_id)
    rows = []
    for row in amortization(
        loan["loan_amount"], loan["interest_rate"], loan["tenure"], loan["monthly_installment"], loan["start_date"]
    ):
        if row.number in recorded:
            paid, (paid_on, on_time) = True, recorded[row.number]
        elif row.number <= loan["emis_paid"]:  # counted by the imported file, without dates
            paid, paid_on, on_time = True, None, row.number <= loan["emis_paid_on_time"]
        else:
            paid, paid_on, on_time = False, None, None
        rows.append(
            schemas.ScheduleRow(
                number=row.number,
                due_date=row.due_date,
                payment=row.payment,
                interest=row.interest,
                principal=row.principal,
                balance=row.balance,
                paid=paid,
                on_time=on_time,
                paid_on=paid_on,
            )
        )
    return json(
        schemas.Schedule(
            loan_id=loan_id,
            loan_amount=to_money(loan["loan_amount"]),
            interest_rate=loan["interest_rate"],
            tenure=loan["tenure"],
            monthly_installment=to_money(loan["monthly_installment"]),
            start_date=loan["start_date"],
            installments=rows,
        )
    )


async def customer_profile(request: Request) -> Response:
    svc = services(request)
    customer_id = path_int(request, "customer_id")
    profile, history = await _customer_today(svc, customer_id)
    credit = credit_score(history, profile.approved_limit)
    return json(
        schemas.CustomerProfile(
            customer_id=customer_id,
            first_name=profile.first_name,
            last_name=profile.last_name,
            age=profile.age,
            phone_number=int(profile.phone_number),
            monthly_income=to_money(profile.monthly_income),
            approved_limit=to_money(profile.approved_limit),
            current_debt=to_money(history.current_debt),
            current_emis=to_money(history.current_emis),
            current_loans=history.current_loans,
            past_loans=history.loans_taken - history.current_loans,
            credit_score=credit.score,
            credit_score_breakdown=breakdown(history, credit, profile.approved_limit),
        )
    )


_BASE_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}


async def _history(svc: Services, aggregate_id: Any) -> list[schemas.HistoryEvent]:
    return _as_history(await run_in_threadpool(lambda: list(svc.ledger.events.get(aggregate_id))))


def _as_history(events: list[Any]) -> list[schemas.HistoryEvent]:
    return [
        schemas.HistoryEvent(
            type=type(event).__qualname__,
            recorded_at=event.timestamp,  # type: ignore[attr-defined]
            version=event.originator_version,
            data={k: v for k, v in vars(event).items() if k not in _BASE_FIELDS},
        )
        for event in events
    ]


async def customer_history(request: Request) -> Response:
    svc = services(request)
    customer_id = path_int(request, "customer_id")
    events = await _history(svc, customer_uuid(customer_id))
    if not events:
        raise ApiError(404, "customer_not_found", f"customer {customer_id} not found")
    return json(events)


async def loan_history(request: Request) -> Response:
    svc = services(request)
    loan_id = path_int(request, "loan_id")
    events = _as_history(await run_in_threadpool(svc.ledger.loan_events, loan_id))
    if not events:
        raise ApiError(404, "loan_not_found", f"loan {loan_id} not found")
    return json(events)


def _unreachable(what: str, error: Exception) -> schemas.Check:
    """A failed check says what failed and where to look. The error's own text (hosts, ports,
    user names) goes to the API's log, not to whoever can reach `/ready`."""
    log.warning("/ready: %s did not answer: %s: %s", what, type(error).__name__, error)
    return schemas.Check(ok=False, detail=f"{what} did not answer ({type(error).__name__}); the API's log has the error")


def _broker_checks() -> dict[str, schemas.Check]:
    """Redis's and a worker's answers. The worker's ping ends as soon as one answers (it waited
    out its whole second: a /ready took over 1 s, more than a probe's default timeout)."""
    checks: dict[str, schemas.Check] = {}
    try:
        tasks.redis_client().ping()
        checks["redis"] = schemas.Check(ok=True)
    except Exception as error:
        checks["redis"] = _unreachable("Redis", error)
    try:
        replies = tasks.ping_workers(timeout=1.0, enough=1)
        checks["worker"] = schemas.Check(
            ok=bool(replies), detail="a worker answered" if replies else "no worker answered within 1 s"
        )
    except Exception as error:
        checks["worker"] = _unreachable("Celery's broker", error)
    return checks


async def ready(request: Request) -> Response:
    """Ready when PostgreSQL, Redis and a worker answer and the projection is within its lag
    bound and not stalled (behind at one position for READY_STALL_SECONDS)."""
    svc: Services = request.app.state.services
    checks: dict[str, schemas.Check] = {}
    lag: int | None = None
    position = 0
    try:
        async with svc.pool.connection(timeout=2) as conn:
            cur = await conn.execute(
                "SELECT (SELECT coalesce(max(notification_id), 0) FROM ledger_events),"
                " coalesce((SELECT position FROM readmodel.tracking WHERE projection = 'ledger'), 0)"
            )
            row = await cur.fetchone()
            if row:
                position = int(row[1])
                lag = int(row[0]) - position
        checks["postgres"] = schemas.Check(ok=True)
    except Exception as error:
        checks["postgres"] = _unreachable("PostgreSQL", error)
    checks.update(await svc.broker_checks.result(_broker_checks))
    bound, stall = svc.settings.ready_max_lag, svc.settings.ready_stall_seconds
    if lag is None:
        checks["projection"] = schemas.Check(ok=False, detail="unknown: PostgreSQL did not answer")
    elif (stalled := svc.progress.stalled_for(position, lag > 0, time.monotonic())) >= stall:
        detail = f"{lag} events behind, no progress past event {position} for {stalled:.0f} s: see the worker's log"
        checks["projection"] = schemas.Check(ok=False, detail=detail)
    else:
        checks["projection"] = schemas.Check(ok=lag <= bound, detail=f"{lag} events behind (at most {bound})")
    ok = all(check.ok for check in checks.values())
    return json(schemas.Readiness(status="ready" if ok else "not ready", checks=checks), 200 if ok else 503)


async def metrics(request: Request) -> Response:
    svc: Services = request.app.state.services

    def scrape() -> bytes:
        with svc.sync_pool.connection(timeout=2) as conn:
            return exposition(conn)

    return Response(await run_in_threadpool(scrape), media_type="text/plain; version=0.0.4; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]
