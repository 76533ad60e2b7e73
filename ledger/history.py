"""The lender's history files, row by row: column names, and what a readable row is.

Reading the spreadsheet itself is the caller's business; here a row is a mapping from
column name to the cell's value (str, int, float, date, datetime or None). A run of rows can
also be checked a column at a time (`parse_loan_columns`), with the same outcome.
"""

from __future__ import annotations

import math
import operator
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from itertools import repeat
from typing import Any, cast

import msgspec

from ledger.calendar import add_months
from ledger.domain import RowIssue
from ledger.money import plain
from ledger.policy import LONGEST_TENURE, monthly_installment

CUSTOMER_COLUMNS = (
    "Customer ID",
    "First Name",
    "Last Name",
    "Age",
    "Phone Number",
    "Monthly Salary",
    "Approved Limit",
)
LOAN_COLUMNS = (
    "Customer ID",
    "Loan ID",
    "Loan Amount",
    "Tenure",
    "Interest Rate",
    "Monthly payment",
    "EMIs paid on Time",
    "Date of Approval",
    "End Date",
)


LARGEST = Decimal(10) ** 15
# IDs up to 15 digits: the ID sequences go on from the highest imported one (a bigint, whose
# last value 9,223,372,036,854,775,807 would leave none to give), and JSON clients that read
# numbers as doubles keep every one of them exact.
LARGEST_ID = 10**15 - 1
LAST_DATE = date(9999, 12, 31)
_SAFE_START = date(LAST_DATE.year - LONGEST_TENURE // 12 - 1, 1, 1)  # any tenure fits after it
PHONES = (10**9, 10**15 - 1)  # 10 to 15 digits: the import's bounds and the API's (api.schemas.Phone)
SMALLEST = Decimal("0.000001")
# What a name may not hold (the API's names too, api.schemas.Name), as a regex character range:
# C0, DEL and C1 controls; line and paragraph separators; bidirectional embeddings, overrides and
# isolates (which show a name, or the text after it, reordered).
NOT_IN_NAMES = r"\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069\ufdd0-\ufdef\ufffe\uffff"  # and noncharacters
# The noncharacters of the other planes (U+1FFFE, U+1FFFF, ... U+10FFFF), which the OpenAPI
# document's pattern (BMP escapes only) does not spell.
_PLANES_NONCHARACTERS = "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(1, 17))
CONTROL = re.compile(f"[{NOT_IN_NAMES}{_PLANES_NONCHARACTERS}]")
# Characters that show nothing although their category is a letter's or a symbol's: the Hangul
# fillers and the blank braille pattern; and format characters the pattern of the OpenAPI document
# names (zero-width spaces and joiners, the byte-order mark, a soft hyphen, the grapheme joiner,
# the Arabic letter mark).
INVISIBLE = r"\u00ad\u034f\u061c\u115f\u1160\u180e\u200b-\u200f\u2060-\u206f\u2800\u3164\ufeff\uffa0"
VISIBLE = re.compile(rf"[^\s{NOT_IN_NAMES}{INVISIBLE}]")  # a character that may show: `shows` looks closer
# What shows nothing on its own: format characters (variation selectors, tags, annotation
# anchors), non-spacing and enclosing marks (a combining accent with nothing to sit on),
# separators and controls. Everything else shows, unassigned code points included: Python 3.11
# knows Unicode 14, and a later version's ideographs or letters (CJK Extension H, Kawi) are names.
_HIDDEN = frozenset({"Cf", "Mn", "Me", "Zs", "Zl", "Zp", "Cc", "Cs"})


def shows(text: str) -> bool:
    """Whether `text` holds a character that shows on its own (a name must): a review registered
    names of a variation selector, a lone combining accent and a tag space."""
    first = VISIBLE.search(text)  # most names: their first letter
    if first is None:
        return False
    return unicodedata.category(first.group()) not in _HIDDEN or any(
        unicodedata.category(char) not in _HIDDEN for char in VISIBLE.findall(text, first.end())
    )


def name_has_no_hidden_parts(text: str) -> bool:
    """What a name's pattern cannot say: it shows (`shows`), and holds no noncharacter of another plane."""
    return shows(text) and not CONTROL.search(text)


class UnreadableFile(Exception):
    """The whole file cannot be imported; nothing is changed."""


# An import holds a million of these at once: msgspec structs are compact, and with gc=False the
# garbage collector does not walk them (it walked a million dataclasses ~30 times, a third of the read).
class CustomerRecord(msgspec.Struct, frozen=True, gc=False):
    row: int
    customer_id: int
    first_name: str
    last_name: str
    age: int
    phone_number: str
    monthly_income: Decimal
    approved_limit: Decimal


class LoanRecord(msgspec.Struct, frozen=True, gc=False):
    row: int
    customer_id: int
    loan_id: int
    amount: Decimal
    tenure: int
    interest_rate: Decimal
    monthly_payment: Decimal
    emis_paid_on_time: int
    start_date: date
    end_date: date


class _BadCell(ValueError):
    pass


Cell = object


class Percent(float):
    """A number cell whose format shows it as a percentage (8.50%, holding 0.085), as the .xlsx
    reader gives it. Only a rate reads it as the percentage shown; anywhere else it is its number."""

    __slots__ = ()


def check_header(file: str, header: list[Cell], expected: tuple[str, ...]) -> dict[str, int]:
    """Map each expected column to its position, or refuse the file naming what is missing.
    Names match whatever their case and spacing ("customer id", "Customer  ID ")."""
    names = [str(c).strip() if c is not None else "" for c in header]
    keys = [_column_key(name) for name in names]
    positions = {key: i for i, key in enumerate(keys) if key}
    missing = [col for col in expected if _column_key(col) not in positions]
    if missing:
        raise UnreadableFile(
            f"{file}: missing column(s) {', '.join(missing)}; found {', '.join(n for n in names if n) or 'none'}"
        )
    repeated = [col for col in expected if keys.count(_column_key(col)) > 1]
    if repeated:  # which of them holds the values? Not a guess to make for the lender.
        raise UnreadableFile(f"{file}: column(s) {', '.join(repeated)} appear more than once in the header")
    return {col: positions[_column_key(col)] for col in expected}


def _column_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _integer(value: Cell, column: str) -> int:
    if type(value) is float and value.is_integer():  # a number cell: the common case, first
        return int(value)
    if isinstance(value, bool):
        raise _BadCell(f"{column} is not a whole number: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):  # ASCII digits ("²".isdigit() too)
        return int(value.strip())
    raise _not_a("a whole number", value, column)


def _not_a(kind: str, value: Cell, column: str) -> _BadCell:
    if value is None:  # an empty cell, or a formula's whose result the file does not hold
        return _BadCell(f"{column} is empty (or a formula with no saved value: open and save the file in Excel)")
    return _BadCell(f"{column} is not {kind}: {value!r}")


_WHOLE = re.compile(r"-?[0-9]{1,30}")  # more digits than an ID may have, few enough for int()
_SPELLED_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # as JSON's, and "5." or ".5"


# A file repeats the same rates, dates and customer IDs on many rows: each distinct value is made
# once and shared (they are immutable), which keeps a million parsed loans hundreds of MB smaller.
# Large enough for every customer ID of a 100,000-customer file; `forget_shared_values` empties it.
@lru_cache(maxsize=1 << 18, typed=True)
def _shared(value: Any) -> Any:
    return value


def _decimal(value: Cell, column: str) -> Decimal:
    if type(value) is float:  # a number cell: the common case, first
        return _checked_decimal(value, column)
    if isinstance(value, bool) or value is None or not isinstance(value, (float, int, str)):
        raise _not_a("a number", value, column)
    return _checked_decimal(value, column)


@lru_cache(maxsize=65_536, typed=True)
def _checked_decimal(value: float | int | str, column: str) -> Decimal:
    if isinstance(value, str) and not _SPELLED_NUMBER.fullmatch(value.strip()):
        # Decimal also takes "5_0000", other scripts' digits (Arabic-Indic, fullwidth) and "Infinity":
        # no one reads those as numbers.
        raise _BadCell(f"{column} is not a number: {value!r}")
    try:
        # repr gives the shortest decimal that reads back as the same float: what the sheet shows.
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise _BadCell(f"{column} is not a number: {value!r}") from None
    if not number.is_finite():
        raise _BadCell(f"{column} is not a number: {value!r}")
    if isinstance(value, float) and number.copy_abs() < LARGEST and number != number.quantize(SMALLEST):
        # A formula's binary rounding (0.1 + 0.2 is 0.30000000000000004): the sheet shows, and a
        # user typing it keeps, 15 significant digits, so that is the value the lender sees. Only
        # digits past the 15th go; a number with more decimals than allowed in those is refused.
        shown = Decimal(f"{value:.15g}")
        if shown == shown.quantize(SMALLEST):
            return plain(shown, SMALLEST)
    # copy_abs, not abs: abs rounds to the context, and "1E+1000000" would raise Overflow
    if number.copy_abs() >= LARGEST or number != number.quantize(SMALLEST):
        raise _BadCell(f"{column} must be below {LARGEST:,} with at most 6 decimals, got {value!r}")
    if isinstance(value, str):  # a text cell's spelling ("1.0000000", "0E+9"): as numeric takes it
        return plain(number, SMALLEST)
    # A number cell's repr passing the checks has at most 6 decimals and no exponent: kept as it
    # is (plain's as_tuple cost 1.8 s of CPU on a million loans). And -0.0 is 0.0 (the cache, whose
    # keys compare equal, would give whichever came first).
    return number.copy_abs() if number.is_zero() else number


def _rate(value: Cell) -> Decimal:
    """The Interest Rate, an annual percentage: a cell formatted as one reads as what it shows."""
    if type(value) is Percent:
        return _checked_percent(value)
    return _decimal(value, "Interest Rate")


@lru_cache(maxsize=4096)
def _checked_percent(value: float) -> Decimal:
    """A percentage cell's value times 100, by moving its decimal point: 0.085 is 8.5, where
    0.085 * 100 is 8.500000000000002. Its 15 significant digits, as for a formula (above)."""
    if not math.isfinite(value):
        raise _BadCell(f"Interest Rate is not a number: {value!r}")
    return _checked_decimal(format(Decimal(f"{value:.15g}").scaleb(2), "f"), "Interest Rate")


def forget_shared_ids() -> None:
    """Empty the cache that shares repeated IDs and dates (the larger one), keeping the decimals'."""
    _shared.cache_clear()


def forget_shared_values() -> None:
    """Empty the caches that share repeated cell values, once a file is read (they held up to
    tens of MB that an import's writing phase can use)."""
    _shared.cache_clear()
    _checked_decimal.cache_clear()
    _checked_percent.cache_clear()


def _shown(number: float) -> str:
    """A number cell in a text column as the sheet shows it: 123, not "123.0"; every digit of a
    whole number a float holds exactly; 15 significant digits otherwise."""
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else f"{number:.15g}"


def _text(value: Cell, column: str) -> str:
    text = "" if value is None else (_shown(value) if type(value) is float else str(value)).strip()
    if not text:
        raise _BadCell(f"{column} is empty")
    if CONTROL.search(text):
        raise _BadCell(f"{column} contains control characters, line separators or bidirectional overrides")
    if not shows(text):
        raise _BadCell(f"{column} shows nothing (only spaces and invisible characters)")
    if len(text) > 100:
        raise _BadCell(f"{column} is longer than 100 characters")
    return text


def _date(value: Cell, column: str) -> date:
    if type(value) is date:  # a date cell: the common case, first
        return _shared(value)  # type: ignore[no-any-return]
    if isinstance(value, datetime):
        return _shared(value.date())  # type: ignore[no-any-return]
    if isinstance(value, date):
        return _shared(value)  # type: ignore[no-any-return]
    if isinstance(value, str):
        text = value.strip()
        try:  # an ISO date, or an ISO date and time (a time of day is dropped, as a datetime cell's is)
            if len(text) == 10:
                return _shared(date.fromisoformat(text))  # type: ignore[no-any-return]
            if text[10:11] in ("T", " ") and text[4:5] == "-":  # not any separator, nor a week date
                return _shared(datetime.fromisoformat(text).date())  # type: ignore[no-any-return]
        except ValueError:
            pass
    raise _not_a("a date", value, column)


def _at_least(number: int | Decimal, low: int, column: str) -> None:
    if number < low:
        raise _BadCell(f"{column} must be at least {low}, got {number}")


def _id(value: Cell, column: str) -> int:
    number = _integer(value, column)
    if not 1 <= number <= LARGEST_ID:
        raise _BadCell(f"{column} must be 1 to {LARGEST_ID:,}, got {number}")
    return number


def _last_installment(start: date, tenure: int) -> None:
    """The schedule's last due date must be a date: start + tenure months within the year 9999."""
    try:
        add_months(start, tenure)  # as the schedule finds its due dates
    except ValueError:  # the year 10000 or later
        raise _BadCell(f"Date of Approval {start} plus {tenure} months is past {LAST_DATE}") from None


def parse_customer(file: str, row: int, cells: Mapping[str, Cell]) -> CustomerRecord | RowIssue:
    customer_id: int | None = None
    try:
        customer_id = _id(cells["Customer ID"], "Customer ID")
        age = _integer(cells["Age"], "Age")
        _at_least(age, 0, "Age")
        phone_cell = cells["Phone Number"]
        if isinstance(phone_cell, str) and phone_cell.strip().startswith("0"):  # refused, as the API does: int() drops it
            raise _BadCell(f"Phone Number must not start with 0 (10 to 15 digits), got {phone_cell.strip()!r}")
        phone = str(_integer(phone_cell, "Phone Number"))
        if not PHONES[0] <= int(phone) <= PHONES[1]:
            raise _BadCell(f"Phone Number must have 10 to 15 digits, got {phone}")
        income = _decimal(cells["Monthly Salary"], "Monthly Salary")
        if income <= 0:
            raise _BadCell(f"Monthly Salary must be above 0, got {income}")
        limit = _decimal(cells["Approved Limit"], "Approved Limit")
        _at_least(limit, 0, "Approved Limit")
        return CustomerRecord(
            row=row,
            customer_id=customer_id,
            first_name=_text(cells["First Name"], "First Name"),
            last_name=_text(cells["Last Name"], "Last Name"),
            age=age,
            phone_number=phone,
            monthly_income=income,
            approved_limit=limit,
        )
    except _BadCell as bad:
        return RowIssue(file, row, str(bad), customer_id)


FITS = Decimal("0.01")  # a payment within 1% of an EMI fits it


def _not_a_fraction(amount: Decimal, rate: Decimal, tenure: int, payment: Decimal) -> None:
    """A rate under 1 whose row's Monthly payment fits the EMI at 100 times it, and not at the
    rate itself, is a percentage exported as a fraction (0.0925 for 9.25%) that lost its percent
    format: refused, not guessed, since read as given it would be a rate 100 times too small."""
    percent = rate.scaleb(2).normalize()
    if _fits(payment, monthly_installment(amount, percent, tenure)) and not _fits(
        payment, monthly_installment(amount, rate, tenure)
    ):
        raise _BadCell(
            f"Interest Rate {rate} looks like a fraction: the Monthly payment {payment} fits {percent:f}% and not {rate}%;"
            f" write {percent:f}, or format the cell as a percentage"
        )


def _fits(payment: Decimal, emi: Decimal) -> bool:
    return abs(payment - emi) <= emi * FITS


def parse_loan(file: str, row: int, cells: Mapping[str, Cell]) -> LoanRecord | RowIssue:
    try:
        customer_id = _shared(_id(cells["Customer ID"], "Customer ID"))
        loan_id = _id(cells["Loan ID"], "Loan ID")
        amount = _decimal(cells["Loan Amount"], "Loan Amount")
        if amount <= 0:
            raise _BadCell(f"Loan Amount must be above 0, got {amount}")
        tenure = _integer(cells["Tenure"], "Tenure")
        if not 1 <= tenure <= LONGEST_TENURE:
            raise _BadCell(f"Tenure must be 1 to {LONGEST_TENURE} months, got {tenure}")
        rate = _rate(cells["Interest Rate"])
        if not 0 <= rate <= 100:
            raise _BadCell(f"Interest Rate must be between 0 and 100, got {rate}")
        payment = _decimal(cells["Monthly payment"], "Monthly payment")
        _at_least(payment, 0, "Monthly payment")
        if 0 < rate < 1:
            _not_a_fraction(amount, rate, tenure, payment)
        paid = _integer(cells["EMIs paid on Time"], "EMIs paid on Time")
        _at_least(paid, 0, "EMIs paid on Time")
        if paid > tenure:
            raise _BadCell(f"EMIs paid on Time ({paid}) is more than the Tenure ({tenure})")
        start = _date(cells["Date of Approval"], "Date of Approval")
        end = _date(cells["End Date"], "End Date")
        if end < start:
            raise _BadCell(f"End Date {end} is before Date of Approval {start}")
        _last_installment(start, tenure)
        return LoanRecord(
            row=row,
            customer_id=customer_id,
            loan_id=loan_id,
            amount=amount,
            tenure=tenure,
            interest_rate=rate,
            monthly_payment=payment,
            emis_paid_on_time=paid,
            start_date=start,
            end_date=end,
        )
    except _BadCell as bad:
        return RowIssue(file, row, str(bad))


# The same checks a column at a time, for runs of rows whose cells all have the common types
# (`map` runs each check's loop in C: about a quarter of the row-by-row cost for a million loans).
# They give exactly what the row-by-row parsers give for such rows, or None when any cell is of
# another type or breaks a rule: the caller then parses those rows one by one, which says which
# row is wrong and why.

Column = Sequence[Cell]


def _whole_numbers(column: Column) -> list[int] | None:
    if set(map(type, column)) != {float}:
        return None
    floats = cast(Sequence[float], column)
    return list(map(int, floats)) if all(map(float.is_integer, floats)) else None


def _numbers(column: Column, name: str) -> list[Decimal] | None:
    if set(map(type, column)) != {float}:
        return None
    return list(map(_checked_decimal, column, repeat(name)))


def _rates(column: Column) -> list[Decimal] | None:
    if set(map(type, column)) == {Percent}:
        return list(map(_checked_percent, cast(Sequence[float], column)))
    return _numbers(column, "Interest Rate")


def _dates(column: Column) -> list[date] | None:
    return list(map(_shared, column)) if set(map(type, column)) == {date} else None


def parse_customer_columns(numbers: list[int], columns: Mapping[str, Column]) -> list[CustomerRecord] | None:
    """`parse_customer` for a run of rows, or None (see above)."""
    try:
        ids = _whole_numbers(columns["Customer ID"])
        ages = _whole_numbers(columns["Age"])
        phones = _whole_numbers(columns["Phone Number"])
        incomes = _numbers(columns["Monthly Salary"], "Monthly Salary")
        limits = _numbers(columns["Approved Limit"], "Approved Limit")
        if ids is None or ages is None or phones is None or incomes is None or limits is None:
            return None
        if min(ids) < 1 or max(ids) > LARGEST_ID or min(ages) < 0 or min(incomes) <= 0 or min(limits) < 0:
            return None
        if min(phones) < PHONES[0] or max(phones) > PHONES[1]:
            return None
        phone_texts = list(map(str, phones))
        first_names = list(map(_text, columns["First Name"], repeat("First Name")))
        last_names = list(map(_text, columns["Last Name"], repeat("Last Name")))
    except _BadCell:
        return None
    return list(map(CustomerRecord, numbers, ids, first_names, last_names, ages, phone_texts, incomes, limits))


def parse_loan_columns(numbers: list[int], columns: Mapping[str, Column]) -> list[LoanRecord] | None:
    """`parse_loan` for a run of rows, or None (see above)."""
    try:
        customer_ids = _whole_numbers(columns["Customer ID"])
        loan_ids = _whole_numbers(columns["Loan ID"])
        tenures = _whole_numbers(columns["Tenure"])
        paid = _whole_numbers(columns["EMIs paid on Time"])
        amounts = _numbers(columns["Loan Amount"], "Loan Amount")
        rates = _rates(columns["Interest Rate"])
        payments = _numbers(columns["Monthly payment"], "Monthly payment")
        starts = _dates(columns["Date of Approval"])
        ends = _dates(columns["End Date"])
    except _BadCell:
        return None
    if (
        customer_ids is None
        or loan_ids is None
        or tenures is None
        or paid is None
        or amounts is None
        or rates is None
        or payments is None
        or starts is None
        or ends is None
    ):
        return None
    if min(customer_ids) < 1 or min(loan_ids) < 1 or max(customer_ids) > LARGEST_ID or max(loan_ids) > LARGEST_ID:
        return None
    if min(tenures) < 1 or max(tenures) > LONGEST_TENURE or min(paid) < 0 or max(starts) > _SAFE_START:
        return None  # (a start after _SAFE_START may still be fine: the row check says)
    lowest_rate = min(rates)
    if min(amounts) <= 0 or lowest_rate < 0 or max(rates) > 100 or min(payments) < 0:
        return None
    if lowest_rate < 1 and any(0 < rate < 1 for rate in rates):  # perhaps fractions: the row check says
        return None
    if any(map(operator.gt, paid, tenures)) or any(map(operator.lt, ends, starts)):
        return None
    customer_ids = list(map(_shared, customer_ids))
    return list(map(LoanRecord, numbers, customer_ids, loan_ids, amounts, tenures, rates, payments, paid, starts, ends))
