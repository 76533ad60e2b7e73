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


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


ID = {"type": "integer", "minimum": 1}
E = schemas.ErrorResponse

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/register",
        "POST",
        endpoints.register,
        "Register a customer",
        schemas.RegisterRequest,
        {201: (schemas.RegisterResponse, "Registered"), 400: (E, "Invalid request"), 409: (E, "Phone number already registered")},
    ),
    Endpoint(
        "/check-eligibility",
        "POST",
        endpoints.check_eligibility,
        "Decide whether a loan could be approved",
        schemas.LoanRequestBody,
        {200: (schemas.EligibilityResponse, "The decision"), 400: (E, "Invalid request"), 404: (E, "Unknown customer")},
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
        },
        (
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            },
        ),
    ),
    Endpoint(
        "/view-loan/{loan_id}",
        "GET",
        endpoints.view_loan,
        "One loan and its customer",
        None,
        {200: (schemas.LoanView, "The loan"), 400: (E, "Invalid loan ID"), 404: (E, "Unknown loan")},
        (_path_param("loan_id", ID),),
    ),
    Endpoint(
        "/view-loans/{customer_id}",
        "GET",
        endpoints.view_loans,
        "A customer's current loans",
        None,
        {200: (list[schemas.CustomerLoan], "Current loans"), 400: (E, "Invalid customer ID"), 404: (E, "Unknown customer")},
        (_path_param("customer_id", ID),),
    ),
    Endpoint("/health", "GET", endpoints.health, "The process is up", None, {200: (schemas.Health, "Up")}),
    Endpoint(
        "/imports",
        "POST",
        endpoints.start_import,
        "Import history from files in the import directory",
        schemas.ImportRequest,
        {202: (dict[str, str], "Queued"), 400: (E, "Invalid request"), 503: (E, "Queue unavailable")},
    ),
    Endpoint(
        "/imports/{job_id}",
        "GET",
        endpoints.import_status,
        "An import job's state, progress and report",
        None,
        {200: (schemas.ImportJobView, "The job"), 400: (E, "Invalid job ID"), 404: (E, "Unknown job")},
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
