"""The route table: every endpoint, its bodies and statuses, in one place.

Each path is served as written, with a trailing slash, and under /api.
The OpenAPI document is generated from this table and the msgspec structs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.routing import Route

from api import endpoints, schemas
from api.endpoints import Handler


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    handler: Handler
    summary: str
    request: type | None = None
    responses: dict[int, tuple[Any, str]] = field(default_factory=dict)
    parameters: tuple[dict[str, Any], ...] = ()
    media_type: str = "application/json"


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


ID = {"type": "integer", "minimum": 1, "maximum": schemas.BIGINT}
E = schemas.ErrorResponse
LOAN_ID = (_path_param("loan_id", ID),)
CUSTOMER_ID = (_path_param("customer_id", ID),)
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    # The value without the spaces or tabs around it (RFC 9110's OWS, which `idempotency_key` strips).
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[!-~](?:[ -~]*[!-~])?$"},
    "description": "1 to 255 printable ASCII characters (spaces inside taken as they are); a retry with the same key"
    " answers with the first response and records nothing more",
}

DATABASE_AWAY = (E, "The database is unavailable (database_unavailable)")
UNKNOWN_OUTCOME = (
    '(database_unavailable; details.recorded is "unknown" when the database stopped answering during the commit,'
    " and the message says how to retry safely)"
)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/register",
        "POST",
        endpoints.register,
        "Register a customer",
        schemas.RegisterRequest,
        {
            201: (schemas.RegisterResponse, "Registered"),
            400: (E, "Invalid request"),
            409: (E, "Phone number already registered"),
            422: (E, "Idempotency-Key reused with a different request"),
            503: (E, "The database is unavailable " + UNKNOWN_OUTCOME),
        },
        (IDEMPOTENCY_KEY,),
    ),
    Endpoint(
        "/check-eligibility",
        "POST",
        endpoints.check_eligibility,
        "Decide whether a loan could be approved",
        schemas.LoanRequestBody,
        {
            200: (schemas.EligibilityResponse, "The decision"),
            400: (E, "Invalid request"),
            404: (E, "Unknown customer"),
            503: DATABASE_AWAY,
        },
    ),
    Endpoint(
        "/create-loan",
        "POST",
        endpoints.create_loan,
        "Decide and, when approved, book a loan",
        schemas.LoanRequestBody,
        {
            201: (schemas.CreateLoanResponse, "Loan booked"),
            200: (schemas.CreateLoanResponse, "Not approved; nothing booked"),
            400: (E, "Invalid request"),
            404: (E, "Unknown customer"),
            422: (E, "Idempotency-Key reused with a different request"),
            503: (E, "Too many concurrent changes (contention), or the database is unavailable " + UNKNOWN_OUTCOME),
        },
        (IDEMPOTENCY_KEY,),
    ),
    Endpoint(
        "/view-loan/{loan_id}",
        "GET",
        endpoints.view_loan,
        "One loan and its customer",
        None,
        {200: (schemas.LoanView, "The loan"), 400: (E, "Invalid loan ID"), 404: (E, "Unknown loan"), 503: DATABASE_AWAY},
        LOAN_ID,
    ),
    Endpoint(
        "/view-loans/{customer_id}",
        "GET",
        endpoints.view_loans,
        "A customer's current loans",
        None,
        {
            200: (list[schemas.CustomerLoan], "Current loans"),
            400: (E, "Invalid customer ID"),
            404: (E, "Unknown customer"),
            503: DATABASE_AWAY,
        },
        CUSTOMER_ID,
    ),
    Endpoint(
        "/loans/{loan_id}/repayments",
        "POST",
        endpoints.record_repayment,
        "Record the loan's next installment as paid",
        schemas.RepaymentRequest,
        {
            201: (schemas.RepaymentResponse, "Recorded"),
            400: (
                E,
                "Invalid request, or a date before the loan started, in the future, or before the last installment was paid",
            ),
            404: (E, "Unknown loan"),
            409: (E, "The loan is closed"),
            422: (E, "Idempotency-Key reused with a different request"),
            503: (E, "Too many concurrent changes (contention), or the database is unavailable " + UNKNOWN_OUTCOME),
        },
        (*LOAN_ID, IDEMPOTENCY_KEY),
    ),
    Endpoint(
        "/loans/{loan_id}/schedule",
        "GET",
        endpoints.loan_schedule,
        "The loan's amortization schedule, installment by installment",
        None,
        {200: (schemas.Schedule, "The schedule"), 400: (E, "Invalid loan ID"), 404: (E, "Unknown loan"), 503: DATABASE_AWAY},
        LOAN_ID,
    ),
    Endpoint(
        "/loans/{loan_id}/history",
        "GET",
        endpoints.loan_history,
        "The loan's events, oldest first, straight from the event store",
        None,
        {
            200: (list[schemas.HistoryEvent], "The events"),
            400: (E, "Invalid loan ID"),
            404: (E, "Unknown loan"),
            503: DATABASE_AWAY,
        },
        LOAN_ID,
    ),
    Endpoint(
        "/customers/{customer_id}",
        "GET",
        endpoints.customer_profile,
        "The customer's profile, current debt and credit score as of today",
        None,
        {
            200: (schemas.CustomerProfile, "The customer"),
            400: (E, "Invalid customer ID"),
            404: (E, "Unknown customer"),
            503: DATABASE_AWAY,
        },
        CUSTOMER_ID,
    ),
    Endpoint(
        "/customers/{customer_id}/history",
        "GET",
        endpoints.customer_history,
        "The customer's events, oldest first, straight from the event store",
        None,
        {
            200: (list[schemas.HistoryEvent], "The events"),
            400: (E, "Invalid customer ID"),
            404: (E, "Unknown customer"),
            503: DATABASE_AWAY,
        },
        CUSTOMER_ID,
    ),
    Endpoint("/health", "GET", endpoints.health, "The process is up", None, {200: (schemas.Health, "Up")}),
    Endpoint(
        "/ready",
        "GET",
        endpoints.ready,
        "Ready to serve: PostgreSQL, Redis and a worker answer, and the projection lag is within READY_MAX_LAG"
        " and not stuck at one event for READY_STALL_SECONDS",
        None,
        {200: (schemas.Readiness, "Ready"), 503: (schemas.Readiness, "Not ready: see which check failed")},
    ),
    Endpoint(
        "/metrics",
        "GET",
        endpoints.metrics,
        "Prometheus metrics (text exposition format)",
        None,
        {200: (str, "Metrics")},
        media_type="text/plain",
    ),
    Endpoint(
        "/imports",
        "POST",
        endpoints.start_import,
        "Import history from files in the import directory",
        schemas.ImportRequest,
        {
            202: (dict[str, str], "Queued"),
            400: (E, "Invalid request"),
            503: (E, "Queue unavailable, or the database is unavailable " + UNKNOWN_OUTCOME),
        },
    ),
    Endpoint(
        "/imports/{job_id}",
        "GET",
        endpoints.import_status,
        "An import job's state, progress and report",
        None,
        {200: (schemas.ImportJobView, "The job"), 400: (E, "Invalid job ID"), 404: (E, "Unknown job"), 503: DATABASE_AWAY},
        (_path_param("job_id", {"type": "string", "format": "uuid"}),),
    ),
)


def path_variants(path: str) -> list[str]:
    return [path, path + "/", "/api" + path, "/api" + path + "/"]


def starlette_routes() -> list[Route]:
    by_path: dict[str, list[Endpoint]] = {}
    for endpoint in ENDPOINTS:
        by_path.setdefault(endpoint.path, []).append(endpoint)
    routes = []
    for path, group in by_path.items():
        assert len(group) == 1, f"one method per path: {path}"
        endpoint = group[0]
        for variant in path_variants(path):
            routes.append(Route(variant, endpoint.handler, methods=[endpoint.method]))
    return routes
