"""Request decoding: exact decimals, every bad field reported, nothing else accepted."""

from __future__ import annotations

import re
from decimal import Decimal

import msgspec
import pytest

from api.errors import ApiError
from api.schemas import ImportRequest, LoanRequestBody, RegisterRequest, RepaymentRequest
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


def test_the_alias_fills_the_field_and_may_repeat_its_value() -> None:
    body = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_salary": 5000, "phone_number": "9000000000"}'
    assert decode(body, RegisterRequest, {"monthly_salary": "monthly_income"}).monthly_income == Decimal(5000)
    same = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_income": 7000, "monthly_salary": 7000.0, "phone_number": 9000000000}'
    assert decode(same, RegisterRequest, {"monthly_salary": "monthly_income"}).monthly_income == Decimal(7000)


def test_a_field_and_its_alias_with_two_values_are_refused_and_an_alias_error_names_the_alias() -> None:
    aliases = {"monthly_salary": "monthly_income"}
    both = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_income": 7000, "monthly_salary": 1e400, "phone_number": 9000000000}'
    with pytest.raises(ApiError) as raised:
        decode(both, RegisterRequest, aliases)
    assert raised.value.details == [
        {"field": "monthly_salary", "message": "monthly_salary is an alias of monthly_income, which has another value"}
    ]
    boolean = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_income": 1, "monthly_salary": true, "phone_number": 9000000000}'
    with pytest.raises(ApiError):
        decode(boolean, RegisterRequest, aliases)
    alone = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_salary": -5, "phone_number": 9000000000}'
    with pytest.raises(ApiError) as raised:
        decode(alone, RegisterRequest, aliases)
    assert [d["field"] for d in raised.value.details] == ["monthly_salary"]


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


def test_a_number_spelled_with_more_zeros_than_decimals_allowed_goes_on_as_the_same_plain_number() -> None:
    # Kept as given, 16,400 zeros or an exponent of -9,999,999,999 reached the events, and PostgreSQL's
    # numeric (at most 16,383 decimals) refused them: the read model stopped at that event.
    zeros = b"0" * 16_400
    body = b'{"first_name": "A", "last_name": "B", "age": 30, "monthly_income": 12500.' + zeros + b', "phone_number": 9000000000}'
    income = decode(body, RegisterRequest).monthly_income
    assert (income, income.as_tuple().exponent) == (Decimal("12500.00"), -2)
    loan = decode(b'{"customer_id": 1, "loan_amount": 1e3, "interest_rate": 0e-9999999999, "tenure": 12}', LoanRequestBody)
    assert (str(loan.loan_amount), str(loan.interest_rate)) == ("1000", "0.000000")  # as clients get it back
    assert (
        str(
            decode(
                b'{"customer_id": 1, "loan_amount": 1.5E+3, "interest_rate": 1E+1, "tenure": 12}', LoanRequestBody
            ).interest_rate
        )
        == "10"
    )
    negative_zero = decode(b'{"customer_id": 1, "loan_amount": 5.50, "interest_rate": -0.0, "tenure": 12}', LoanRequestBody)
    assert str(negative_zero.interest_rate) == "0.0"
    # A zero's exponent can be anything: 1,073,741,823 or more overflows PostgreSQL's numeric.
    for zero in (b"0E+1073741823", b"-0E+3000000000"):
        body = b'{"customer_id": 1, "loan_amount": 5, "interest_rate": %s, "tenure": 12}' % zero
        assert str(decode(body, LoanRequestBody).interest_rate) == "0"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"first_name": "\xff\xfe"}', "not valid UTF-8"),
        (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
        (b'{"a":' * 100_000, "nested too deeply"),
        (b'{"monthly_income": 0e-99999999999999999999}', "exponent is out of range"),  # Decimal refuses it
        (b'{"unknown": 1e99999999999999999999}', "exponent is out of range"),  # in a field no one reads too
    ],
)
def test_bytes_that_are_not_utf8_and_deep_nesting_are_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode(raw, RegisterRequest)
    assert (raised.value.status, raised.value.code) == (400, "malformed_json")
    assert message in raised.value.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"customer_id": %s, "loan_amount": 1000, "interest_rate": 10, "tenure": 12}' % (b"9" * 4301), "customer_id"),
        (b'{"tenure": 12, "loan_amount": -%s}' % (b"1" * 9000), "loan_amount"),
        (b'{"customer_\\u0069d" : %s}' % (b"7" * 5000), "customer_id"),  # named as decoded
        (b'{"customer_id": {"loan_amount": %s}, "loan_amount": 1}' % (b"7" * 5000), "customer_id"),  # the field it is in
        (b'{"tenure": [[%s]], "\\udc00": %s}' % (b"7" * 5000, b"7" * 5000), "tenure"),  # not a name no one can read
        # Crafted text after the digits: a search of the body for their key took minutes (quadratic).
        (b'{"n": [%s], "s": "%s"}' % (b"1" * 4301, b'\\"' * 200_000), "n"),
    ],
)
def test_an_integer_longer_than_the_decoder_reads_names_its_field(body: bytes, field: str) -> None:
    """Past Python's 4,300 digits the decoder stops: it was answered "not valid JSON", naming nothing."""
    with pytest.raises(ApiError) as raised:
        decode(body, LoanRequestBody)
    assert (raised.value.code, raised.value.details) == (
        "validation_error",
        [{"field": field, "message": "Expected a number of at most 4,300 digits"}],
    )


def test_an_integer_longer_than_the_decoder_reads_outside_an_object_is_said_so() -> None:
    for not_json in (b'{"tenure": [%s] ]] "phone_number": 1' % (b"9" * 4301), b'[%s] "\\ud800": 1' % (b"9" * 4301)):
        with pytest.raises(ApiError) as raised:  # the decoder stops at the digits; what follows is not JSON either
            decode(not_json, LoanRequestBody)
        assert (raised.value.code, raised.value.details) == ("malformed_json", None)
        assert raised.value.message.startswith("The request body is not valid JSON: ")
    with pytest.raises(ApiError) as raised:
        decode(b"[%s]" % (b"9" * 4301), LoanRequestBody)
    assert (raised.value.code, raised.value.message) == (
        "malformed_json",
        "The request body holds a number of more than 4,300 digits",
    )
    with pytest.raises(ApiError) as raised:  # 4,300 digits are read, and refused as any number too large
        decode(b'{"customer_id": %s, "loan_amount": 1000, "interest_rate": 10, "tenure": 12}' % (b"9" * 4300), LoanRequestBody)
    assert raised.value.details == [{"field": "customer_id", "message": "Expected `int` <= 9223372036854775807"}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phone_number", "9876543210\n"),  # `$` in Python's re also matches before a last newline
        ("first_name", "Bob\n"),
        ("first_name", "a\x85b"),  # C1 controls are control characters too
        ("last_name", "\x9b"),
        ("first_name", "Asha\u202eayi"),  # a right-to-left override: the name shows reversed
        ("last_name", "Iyer\u2066"),  # a bidirectional isolate
        ("first_name", "A\u2028B"),  # a line separator
        ("last_name", "Rao\uffff"),  # noncharacters, never meant for interchange
        ("first_name", "\ufdd0Ann"),
    ],
)
def test_a_last_newline_a_c1_control_or_a_bidirectional_override_is_refused(field: str, value: str) -> None:
    fields = {"first_name": "A", "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": "9000000000", field: value}
    with pytest.raises(ApiError) as raised:
        decode(msgspec.json.encode(fields), RegisterRequest)
    assert [d["field"] for d in raised.value.details] == [field]


def test_names_in_any_script_with_accents_and_joiners_inside_are_taken() -> None:
    for first, last in [("Zoë", "Ñúñez"), ("محمد", "علي"), ("अ\u200dनु", "O'Brien-Smith")]:
        fields = {"first_name": first, "last_name": last, "age": 30, "monthly_income": 1000, "phone_number": "9000000000"}
        assert decode(msgspec.json.encode(fields), RegisterRequest).first_name == first


@pytest.mark.parametrize(("field", "raw"), [("phone_number", b"1e10"), ("age", b"30.5"), ("age", b"3E1")])
def test_a_number_with_a_fraction_or_an_exponent_for_a_whole_number_is_named_so(field: str, raw: bytes) -> None:
    """msgspec said "Expected `int | str`, got `decimal`": the client sent no decimal (from a review)."""
    body = b'{"first_name": "A", "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": 9876543210}'
    body = body.replace(b'"age": 30', b'"age": ' + raw) if field == "age" else body.replace(b"9876543210", raw)
    with pytest.raises(ApiError) as refused:
        decode(body, RegisterRequest)
    [detail] = refused.value.details
    assert detail["field"] == field
    assert detail["message"].endswith("got a number with a fraction or an exponent"), detail


def test_a_phone_string_with_a_leading_zero_is_refused_saying_why() -> None:
    body = b'{"first_name": "A", "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": "0987654321"}'
    with pytest.raises(ApiError) as raised:
        decode(body, RegisterRequest)
    assert raised.value.details == [{"field": "phone_number", "message": "Expected 10 to 15 digits, no leading zero"}]


@pytest.mark.parametrize(
    "blank",
    # The Hangul fillers, the blank braille pattern and the grapheme joiner were taken as visible (a review).
    [
        *("\u200b", " \ufeff ", "\u00ad\u2060", "\u200c\u200d", "\u3164", "\u2800\u2800", "\uffa0", "\u115f\u1160", "\u034f"),
        # A variation selector, a lone combining accent, a tag space, a musical format character, a
        # Mongolian free variation selector, a Khmer inherent vowel, an annotation anchor, the
        # Arabic letter mark: registered as names (the twenty-sixth pass's review).
        *("\ufe0f", "\u0301", "\U000e0020", "\U0001d173", "\u180b", "\u17b4", "\ufff9", "\u061c"),
        "Asha\U0001fffe",  # a noncharacter past the BMP, as U+FFFE is refused
    ],
)
def test_a_name_of_invisible_characters_is_blank(blank: str) -> None:
    fields = {"first_name": blank, "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": "9000000000"}
    with pytest.raises(ApiError) as raised:
        decode(msgspec.json.encode(fields), RegisterRequest)
    assert raised.value.details == [
        {
            "field": "first_name",
            "message": "Expected non-blank, at most 100 characters, no control characters, line separators or bidirectional overrides",
        }
    ]


def test_a_name_may_hold_joiners_among_letters_that_show() -> None:
    fields = {
        "first_name": "\u0d28\u0d4d\u200d",
        "last_name": "Das\u200b",
        "age": 30,
        "monthly_income": 1000,
        "phone_number": 9000000000,
    }
    request = decode(msgspec.json.encode(fields), RegisterRequest)
    assert (request.first_name, request.last_name) == ("\u0d28\u0d4d\u200d", "Das\u200b")


def test_an_optional_body_may_be_absent_but_whitespace_is_not_json() -> None:
    assert decode(b"", ImportRequest, empty_ok=True) == decode(b"{}", ImportRequest)
    for raw in (b"\r\n", b"  "):
        with pytest.raises(ApiError) as raised:
            decode(raw, ImportRequest, empty_ok=True)
        assert (raised.value.status, raised.value.code) == (400, "malformed_json")


def test_a_field_given_twice_is_refused_however_its_name_is_spelt() -> None:
    """A JSON decoder keeps the last of two values: the first was dropped without a word."""
    for body in (
        b'{"customer_id": 1, "loan_amount": 100000, "interest_rate": 12, "tenure": 12, "loan_amount": 9000000}',
        b'{"customer_id": 1, "loan_amount": 100000, "interest_rate": 12, "tenure": 12, "\\u006coan_amount": 9000000}',
    ):
        with pytest.raises(ApiError) as raised:
            decode(body, LoanRequestBody)
        assert raised.value.details == [{"field": "loan_amount", "message": "This field is given more than once"}], body
    aliases = {"monthly_salary": "monthly_income"}
    twice = b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_salary": 5000, "phone_number": 9000000000, "monthly_salary": 6000}'
    with pytest.raises(ApiError) as raised:
        decode(twice, RegisterRequest, aliases)
    assert [d["field"] for d in raised.value.details] == ["monthly_salary"]
    # A field's name inside a value (and a colon, which makes the exact look happen) is not the field given again.
    quoted = b'{"first_name": "x\\"first_name\\":", "last_name": "\\"last_name\\"", "age": 20, "monthly_income": 1, "phone_number": 9000000000}'
    assert decode(quoted, RegisterRequest, aliases).first_name == 'x"first_name":'


def test_a_field_the_request_does_not_have_is_refused_naming_the_fields_it_has() -> None:
    """A misspelt optional field was dropped: {"paidOn": ...} recorded a repayment paid today, for good."""
    with pytest.raises(ApiError) as raised:
        decode(b'{"paidOn": "2026-01-01"}', RepaymentRequest, empty_ok=True)
    assert raised.value.code == "validation_error"
    assert raised.value.details == [{"field": "paidOn", "message": "Unknown field; the fields are paid_on"}]
    with pytest.raises(ApiError) as raised:
        decode(b'{"customer_file": "c.xlsx", "loans_file": "l.xlsx"}', ImportRequest, empty_ok=True)
    assert raised.value.details == [
        {"field": "customer_file", "message": "Unknown field; the fields are customers_file, loans_file"}
    ]
    extra = (
        b'{"first_name": "A", "last_name": "B", "age": 20, "monthly_income": 1, "phone_number": 9000000000, "approved_limit": 1}'
    )
    with pytest.raises(ApiError) as raised:
        decode(extra, RegisterRequest, {"monthly_salary": "monthly_income"})
    assert raised.value.details == [
        {
            "field": "approved_limit",
            "message": "Unknown field; the fields are first_name, last_name, age, monthly_income, phone_number, monthly_salary",
        }
    ]


def test_the_second_parse_for_repeated_fields_is_only_of_a_valid_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB body of escapes was parsed twice, five times msgspec's time, on the event loop (a
    review): a body with an invalid or unknown field is refused without the second parse. And a
    body the second parse cannot read (a few levels deeper than it goes, which msgspec took) is
    refused, not taken with the last of two values (a review)."""
    import api.validation

    parsed: list[object] = []

    def refuse(body: object, **kwargs: object) -> object:
        parsed.append(body)
        raise RecursionError

    monkeypatch.setattr(api.validation.json, "loads", refuse)
    escaped = b'{"customer_id": 1, "loan_amount": 100, "interest_rate": 12, "tenure": 12, "x": "' + b"\\u0041" * 1000 + b'"}'
    with pytest.raises(ApiError) as raised:
        decode(escaped, LoanRequestBody)
    assert [d["field"] for d in raised.value.details] == ["x"] and parsed == []  # unknown, refused: no second parse
    valid = b'{"customer_id": 1, "loan_amount": 100, "interest_rate": 12, "tenure": 12, "tenure": 12}'
    with pytest.raises(ApiError) as raised:
        decode(valid, LoanRequestBody)
    assert (raised.value.code, raised.value.message) == ("malformed_json", "The request body is nested too deeply")
    assert parsed == [valid]


def test_a_name_in_characters_newer_than_python_s_unicode_or_of_private_use_is_taken() -> None:
    """Python 3.11 knows Unicode 14: CJK Extension H's ideographs (Unicode 15), made for names,
    were refused as showing nothing (a review)."""
    for name in ("\U00031350", "\ue000", "\U00031350\u0301"):
        fields = {"first_name": name, "last_name": "B", "age": 30, "monthly_income": 1000, "phone_number": 9000000000}
        assert decode(msgspec.json.encode(fields), RegisterRequest).first_name == name


def test_the_documented_idempotency_key_is_the_one_taken() -> None:
    """The OpenAPI document's pattern for the header agrees with what the API takes (a tab inside a
    key was refused though the document allowed any string of 1 to 255 characters)."""
    from starlette.requests import Request

    from api.endpoints import idempotency_key
    from api.routes import IDEMPOTENCY_KEY

    pattern = re.compile(IDEMPOTENCY_KEY["schema"]["pattern"])
    values = ["k", "retry-42", "a b", " padded\t", "a\tb", "\x7f", "a\x00b", "caf\xe9", "a\xa0", " ", "k" * 255, "k" * 256]
    for value in values:
        request = Request({"type": "http", "headers": [(b"idempotency-key", value.encode("latin-1"))]})
        try:
            taken = idempotency_key(request) is not None
        except ApiError:
            taken = False
        stripped = value.strip(" \t")
        documented = bool(pattern.fullmatch(stripped)) and len(stripped) <= IDEMPOTENCY_KEY["schema"]["maxLength"]
        assert taken == documented, value
