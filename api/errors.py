"""Every error leaves as {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from api.schemas import ErrorBody, ErrorResponse, encoder
from ledger.domain import (
    Contention,
    CustomerNotFound,
    DomainError,
    IdempotencyKeyReused,
    ImportFilesChanged,
    InvalidRepayment,
    LoanClosed,
    LoanNotFound,
    OutcomeUnknown,
    PhoneNumberTaken,
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> Response:
    body = ErrorResponse(ErrorBody(code=code, message=message, details=details))
    return Response(encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


def _no_details(error: DomainError) -> Any:
    return None


# How each refusal of the domain leaves the API: status, code, and the details it carries.
DOMAIN_ERRORS: dict[type[DomainError], tuple[int, str, Callable[[DomainError], Any]]] = {
    CustomerNotFound: (404, "customer_not_found", _no_details),
    LoanNotFound: (404, "loan_not_found", _no_details),
    PhoneNumberTaken: (409, "phone_number_taken", lambda error: {"field": "phone_number"}),
    LoanClosed: (409, "loan_closed", _no_details),
    InvalidRepayment: (400, "invalid_repayment", lambda error: [{"field": "paid_on", "message": str(error)}]),
    IdempotencyKeyReused: (422, "idempotency_key_reused", _no_details),
    Contention: (503, "contention", _no_details),
    # Raised in the worker, which fails the job with it; here for completeness.
    ImportFilesChanged: (409, "import_files_changed", _no_details),
    # The endpoints add what to do next (api.endpoints.run_command); this is the shape without it.
    OutcomeUnknown: (503, "database_unavailable", lambda error: {"recorded": "unknown"}),
}


def domain_error_response(error: DomainError) -> Response:
    mapped = next(kind for kind in type(error).__mro__ if kind in DOMAIN_ERRORS)  # a new subclass maps as its parent
    status, code, details = DOMAIN_ERRORS[mapped]
    return error_response(status, code, str(error), details(error))
