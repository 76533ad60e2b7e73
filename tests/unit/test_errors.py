"""Every refusal the domain can raise leaves the API with its own status and code, never as a 500."""

from __future__ import annotations

import json

import pytest

from api.errors import DOMAIN_ERRORS, domain_error_response
from ledger import domain


def _domain_errors() -> list[type[domain.DomainError]]:
    found = [value for value in vars(domain).values() if isinstance(value, type) and issubclass(value, domain.DomainError)]
    return [error for error in found if error is not domain.DomainError]


def test_every_domain_error_has_a_status_and_code() -> None:
    assert set(_domain_errors()) == set(DOMAIN_ERRORS)


@pytest.mark.parametrize("error", _domain_errors(), ids=lambda error: error.__name__)
def test_a_domain_error_becomes_the_error_shape(error: type[domain.DomainError]) -> None:
    response = domain_error_response(error("because"))
    status, code, _ = DOMAIN_ERRORS[error]
    body = json.loads(bytes(response.body))["error"]
    assert response.status_code == status and 400 <= status < 600 and status != 500
    assert body["code"] == code and body["message"] == "because"


def test_a_new_kind_of_a_mapped_refusal_answers_as_its_parent() -> None:
    class LoanWrittenOff(domain.LoanNotFound):
        pass

    assert domain_error_response(LoanWrittenOff("gone")).status_code == 404
