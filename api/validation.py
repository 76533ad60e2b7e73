"""Decode a JSON body into a struct, reporting every bad field, not just the first.

Numbers are read as Decimal straight from the JSON text, never through a float.
Decimal bounds live in each field's JSON-schema metadata, so the documentation and
the check cannot drift apart.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar

import msgspec

from api.errors import ApiError
from ledger.money import plain

S = TypeVar("S", bound=msgspec.Struct)

_json = msgspec.json.Decoder(float_hook=Decimal)


def _decimal_bounds(annotation: Any) -> dict[str, Any]:
    for meta in typing.get_args(annotation)[1:]:
        if isinstance(meta, msgspec.Meta) and meta.extra_json_schema:
            return dict(meta.extra_json_schema)
    return {}


def _check_decimal(value: Decimal, bounds: dict[str, Any]) -> tuple[str | None, Decimal]:
    """What is wrong with `value` (None: nothing), and the value as it goes on (`plain`: as
    PostgreSQL's numeric takes it, with no more decimals than `multipleOf` allows)."""
    if not value.is_finite():
        return "Expected a finite number", value
    if "exclusiveMinimum" in bounds and not value > bounds["exclusiveMinimum"]:
        return f"Expected a number > {bounds['exclusiveMinimum']}", value
    if "minimum" in bounds and not value >= bounds["minimum"]:
        return f"Expected a number >= {bounds['minimum']}", value
    if "maximum" in bounds and not value <= bounds["maximum"]:
        return f"Expected a number <= {bounds['maximum']}", value
    if "multipleOf" in bounds:
        step = Decimal(str(bounds["multipleOf"]))
        if value != value.quantize(step):
            places = -step.as_tuple().exponent  # type: ignore[operator]
            return f"Expected a multiple of {step} (at most {places} decimals)", value
        value = plain(value, step)
    return None, value


def _description(annotation: Any, of_pattern: bool = False) -> str | None:
    """The Meta description of a field, looking inside unions too (`of_pattern`: of the member
    with a pattern, the one a regex failure is about)."""
    for arg in (annotation, *typing.get_args(annotation)):
        for meta in typing.get_args(arg)[1:] if typing.get_origin(arg) is typing.Annotated else ():
            if isinstance(meta, msgspec.Meta) and meta.description and (meta.pattern or not of_pattern):
                return meta.description
    return None


def _message(error: msgspec.ValidationError, annotation: Any) -> str:
    # JSON numbers with a fraction or an exponent are decoded as Decimal: msgspec names that type.
    message = str(error).split(" - at ")[0].replace("got `decimal`", "got a number with a fraction or an exponent")
    description = _description(annotation, of_pattern=True)
    if "regex" in message and description:
        return _expected(description)
    return message


def _expected(description: str) -> str:
    return f"Expected {description[0].lower()}{description[1:]}"


def _base_type(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise ApiError(400, "malformed_json", "The request body must be a JSON object")
    try:
        return _json.decode(body)
    except msgspec.ValidationError:  # an integer longer than the decoder reads
        raise _too_long(body) from None
    except msgspec.DecodeError as error:
        raise ApiError(400, "malformed_json", f"The request body is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:  # bytes that are not UTF-8 inside a string
        raise ApiError(400, "malformed_json", f"The request body is not valid UTF-8: {error.reason}") from None
    except RecursionError:  # arrays or objects nested deeper than the decoder goes
        raise ApiError(400, "malformed_json", "The request body is nested too deeply") from None
    except ArithmeticError:  # Decimal refuses an exponent past its limits (1e999999999999999999)
        raise ApiError(400, "malformed_json", "The request body holds a number whose exponent is out of range") from None


MAX_INTEGER_DIGITS = 4300  # Python's limit on converting digits to an int, which the decoder keeps


class _LongInteger(str):
    """The digits of an integer longer than the decoder reads, as the json module met them."""


def _integer(digits: str) -> int | str:
    return _LongInteger(digits) if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS else int(digits)


def _holds_long_integer(value: Any) -> bool:
    found, stack = False, [value]  # not recursive: a value can be nested as deep as the json module reads
    while stack and not found:
        item = stack.pop()
        found = isinstance(item, _LongInteger)
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def _too_long(body: bytes) -> ApiError:
    """An integer of more digits than the decoder reads (it stops there, and said "not valid JSON"
    naming no field): the body read again by the json module, whose hook keeps such digits as text,
    to name the top-level field whose value holds one. A search of the body for the digits' key
    took quadratic time on crafted text after them, and named keys the decoder never read."""
    try:
        pairs = json.loads(body, parse_int=_integer, object_pairs_hook=list)
    except RecursionError:
        return ApiError(400, "malformed_json", "The request body is nested too deeply")
    except ValueError as error:  # not JSON after all, past the digits where the decoder stopped
        return ApiError(400, "malformed_json", f"The request body is not valid JSON: {error}")
    message = f"Expected a number of at most {MAX_INTEGER_DIGITS:,} digits"
    for name, value in pairs if isinstance(pairs, list) and pairs and isinstance(pairs[0], tuple) else ():
        if _holds_long_integer(value) and name.isprintable():  # no lone surrogate (\udc00), which no answer can carry
            return ApiError(400, "validation_error", "The request has invalid fields", [{"field": name, "message": message}])
    return ApiError(400, "malformed_json", f"The request body holds a number of more than {MAX_INTEGER_DIGITS:,} digits")


@dataclass(frozen=True)
class _Field:
    name: str
    encode_name: str
    required: bool
    type: Any
    is_decimal: bool
    bounds: dict[str, Any]
    check: Callable[[Any], bool] | None  # a check past the type's constraints (Meta's extra["check"])


def _extra_check(annotation: Any) -> Callable[[Any], bool] | None:
    for meta in typing.get_args(annotation)[1:] if typing.get_origin(annotation) is typing.Annotated else ():
        if isinstance(meta, msgspec.Meta) and meta.extra and "check" in meta.extra:
            return meta.extra["check"]  # type: ignore[no-any-return]
    return None


@cache
def _fields(struct: type[msgspec.Struct]) -> tuple[_Field, ...]:
    """What decode needs to know of each field, worked out once per struct (it evaluates annotations)."""
    return tuple(
        _Field(
            f.name,
            f.encode_name,
            f.required,
            f.type,
            _base_type(f.type) is Decimal,
            _decimal_bounds(f.type),
            _extra_check(f.type),
        )
        for f in msgspec.structs.fields(struct)
    )


@cache
def _names(struct: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in _fields(struct))


def _may_repeat(body: bytes, raw: dict[str, Any]) -> bool:
    """Whether the body's object (`raw`) may give a field more than once (`_repeated` says for
    sure): it has more colons than keys (each key has one; a colon in a string adds one more), or
    it holds an escape, the only way to spell a field's name otherwise (\\u0061...)."""
    return b"\\u" in body or body.count(b":") > len(raw)


def _repeated(body: bytes, names: frozenset[str] | set[str]) -> list[str]:
    """The fields the body's object gives more than once. A JSON decoder keeps the last value, so
    `{"loan_amount": 100000, "loan_amount": 9000000}` was decided on the second, whatever the
    client meant. A second parse, asked for only when the body may repeat one (`_may_repeat`)
    and every field is valid: so only of a body as small as a valid request is. `names`: the
    request's fields and their aliases."""
    try:
        pairs = json.loads(body, object_pairs_hook=list)  # the top level's pairs, in order
    except RecursionError:  # a few levels that msgspec took: it cannot be told which value is meant
        raise ApiError(400, "malformed_json", "The request body is nested too deeply") from None
    seen: set[str] = set()
    repeated: list[str] = []
    for key, _ in pairs:
        if key in names and key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    return repeated


def decode(body: bytes, struct: type[S], aliases: dict[str, str] | None = None, *, empty_ok: bool = False) -> S:
    raw = {} if empty_ok and not body else parse_json(body)  # no body at all; whitespace is not JSON
    if not isinstance(raw, dict):
        raise ApiError(400, "malformed_json", "The request body must be a JSON object")
    errors: list[dict[str, str]] = []
    names = _names(struct) | aliases.keys() if aliases else _names(struct)
    if not raw.keys() <= names:
        # A misspelt optional field was dropped without a word: {"paidOn": "2026-01-01"} recorded a
        # repayment paid today, for good (a review). A field this request does not have is refused.
        known = [*(f.encode_name for f in _fields(struct)), *(aliases or ())]
        errors += [
            {"field": key, "message": f"Unknown field; the fields are {', '.join(known)}"} for key in raw if key not in names
        ]
    may_repeat = not errors and _may_repeat(body, raw)
    sent_as: dict[str, str] = {}  # a field sent under its alias: errors name what was sent
    for alias, name in (aliases or {}).items():
        if alias in raw and name in raw:
            given = raw.pop(alias)
            if given != raw[name] or isinstance(given, bool):  # two values (true == 1 in Python): not ours to choose
                errors.append({"field": alias, "message": f"{alias} is an alias of {name}, which has another value"})
        elif alias in raw:
            raw[name] = raw.pop(alias)
            sent_as[name] = alias
    values: dict[str, Any] = {}
    for field in _fields(struct):
        if field.encode_name not in raw:
            if field.required:
                errors.append({"field": field.encode_name, "message": "This field is required"})
            continue
        value = raw[field.encode_name]
        if sent_as:
            field = replace(field, encode_name=sent_as.get(field.encode_name, field.encode_name))
        if field.is_decimal and (isinstance(value, (str, bool)) or value is None):
            errors.append(
                {
                    "field": field.encode_name,
                    "message": f"Expected a number, got {type(value).__name__ if value is not None else 'null'}",
                }
            )
            continue
        try:
            converted = msgspec.convert(value, field.type, strict=True)
        except msgspec.ValidationError as error:
            errors.append({"field": field.encode_name, "message": _message(error, field.type)})
            continue
        if field.check is not None and not field.check(converted):
            errors.append({"field": field.encode_name, "message": _expected(_description(field.type) or "a valid value")})
            continue
        if field.is_decimal:
            problem, converted = _check_decimal(converted, field.bounds)
            if problem:
                errors.append({"field": field.encode_name, "message": problem})
                continue
        values[field.name] = converted
    if not errors and may_repeat:
        errors = [{"field": name, "message": "This field is given more than once"} for name in _repeated(body, names)]
    if errors:
        raise ApiError(400, "validation_error", "The request has invalid fields", errors)
    return struct(**values)
