"""Request decoding: exact decimals, every bad field reported, nothing else accepted."""

from __future__ import annotations

from decimal import Decimal

import pytest

from api.errors import ApiError
from api.schemas import LoanRequestBody, RegisterRequest
from api.validation import decode


def test_numbers_are_read_as_exact_decimals() -> None:
    body = decode(b'{"customer_id": 1, "loan_amount": 100000.10, "interest_rate": 8.2, "tenure": 12}', LoanRequestBody)
    assert body.loan_amount == Decimal("100000.10")
    assert body.interest_rate == Decimal("8.2")


def test_every_bad_field_is_reported() -> None:
    with pytest.raises(ApiError) as raised:
        decode(b'{"customer_id": -1, "loan_amount": "NaN", "interest_rate": 1e400, "tenure": true}', LoanRequestBody)
    assert raised.value.status == 400
    assert [d["field"] for d in raised.value.details] == ["customer_id", "loan_amount", "interest_rate", "tenure"]


def test_the_alias_fills_the_field_only_when_it_is_missing() -> None:
    body = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_salary": 5000, "phone_number": "9000000000"}'
    assert decode(body, RegisterRequest, {"monthly_salary": "monthly_income"}).monthly_income == Decimal(5000)
    both = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_income": 7000, "monthly_salary": 5000, "phone_number": 9000000000}'
    assert decode(both, RegisterRequest, {"monthly_salary": "monthly_income"}).monthly_income == Decimal(7000)


@pytest.mark.parametrize("raw", [b"", b"   ", b"[]", b"{", b"1"])
def test_anything_but_a_json_object_is_malformed(raw: bytes) -> None:
    with pytest.raises(ApiError) as raised:
        decode(raw, LoanRequestBody)
    assert raised.value.code == "malformed_json"


def test_money_has_at_most_two_decimals() -> None:
    with pytest.raises(ApiError) as raised:
        decode(b'{"customer_id": 1, "loan_amount": 100.001, "interest_rate": 8.25, "tenure": 12}', LoanRequestBody)
    assert raised.value.details == [{"field": "loan_amount", "message": "Expected a multiple of 0.01 (at most 2 decimals)"}]


def test_values_the_ledger_could_not_store_are_refused() -> None:
    body = b'{"first_name": "A\\u0000", "last_name": "B", "age": 30, "monthly_income": 1e-999999999, "phone_number": 9000000000}'
    with pytest.raises(ApiError) as raised:
        decode(body, RegisterRequest)
    assert [d["field"] for d in raised.value.details] == ["first_name", "monthly_income"]
    with pytest.raises(ApiError) as raised:
        decode(b'{"customer_id": 1, "loan_amount": 100, "interest_rate": 1e-99999, "tenure": 12}', LoanRequestBody)
    assert raised.value.details == [{"field": "interest_rate", "message": "Expected a multiple of 0.000001 (at most 6 decimals)"}]
