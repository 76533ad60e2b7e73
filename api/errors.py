"""Every error leaves as {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from api.schemas import ErrorBody, ErrorResponse, encoder


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> Response:
    body = ErrorResponse(ErrorBody(code=code, message=message, details=details))
    return Response(encoder.encode(body), status_code=status, media_type="application/json", headers=headers)
