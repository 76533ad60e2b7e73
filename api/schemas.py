"""Request and response bodies as msgspec structs: they validate, encode and document the API."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ledger.history import INVISIBLE, NOT_IN_NAMES, PHONES, name_has_no_hidden_parts
from ledger.policy import LONGEST_TENURE

BIGINT = 2**63 - 1

# Patterns end in `$(?!\n)`: msgspec matches with Python's `re.search`, whose `$` also matches
# before a string's last newline ("9876543210\n" would pass as a phone number). In the JSON
# schema (ECMA regex) `$` is the end already and the lookahead changes nothing.
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=100,
        # None of the characters the import refuses in names either (ledger.history.NOT_IN_NAMES:
        # controls, line separators, bidirectional overrides), and at least one that shows: not a
        # space, or an invisible format character (zero-width spaces and joiners, the byte-order
        # mark, a soft hyphen). What a pattern cannot say (a character that shows by its Unicode
        # category; noncharacters past the BMP) the decoder checks after it (`extra["check"]`).
        pattern=(rf"^[^{NOT_IN_NAMES}]*[^\s{NOT_IN_NAMES}{INVISIBLE}][^{NOT_IN_NAMES}]*$(?!\n)"),
        description="Non-blank, at most 100 characters, no control characters, line separators or bidirectional overrides",
        extra={"check": name_has_no_hidden_parts},
    ),
]
# JSON Schema counts 12.0 as an integer; the API takes a whole number only as one is written (12).
WHOLE = "a whole number written as one (12, not 12.0 or 1.2e1)"
Id = Annotated[int, Meta(ge=1, le=BIGINT, description=f"An ID: {WHOLE}")]
Money = Annotated[Decimal, Meta(description="Amount in rupees, at most 2 decimals")]
Number = Decimal  # documented and encoded as a JSON number (see api.openapi)
PositiveAmount = Annotated[
    Decimal,
    Meta(
        description="A number above 0, in rupees and paise (at most 2 decimals)",
        extra_json_schema={"exclusiveMinimum": 0, "maximum": 1_000_000_000_000, "multipleOf": 0.01},
    ),
]
Rate = Annotated[
    Decimal,
    Meta(
        description="Annual interest rate, percent (at most 6 decimals)",
        extra_json_schema={"minimum": 0, "maximum": 100, "multipleOf": 0.000001},
    ),
]
Tenure = Annotated[int, Meta(ge=1, le=LONGEST_TENURE, description=f"Months: {WHOLE}")]
Phone = (
    Annotated[int, Meta(ge=PHONES[0], le=PHONES[1], description="10 to 15 digits")]
    | Annotated[str, Meta(pattern=r"^[1-9][0-9]{9,14}$(?!\n)", description="10 to 15 digits, no leading zero")]
)


class RegisterRequest(Struct, forbid_unknown_fields=True):
    first_name: Name
    last_name: Name
    age: Annotated[int, Meta(ge=18, le=100, description=f"Years: {WHOLE}")]
    monthly_income: Annotated[
        Decimal,
        Meta(
            description="Monthly income (at most 2 decimals); `monthly_salary` is accepted as an alias (both: only with one value)",
            extra_json_schema={"exclusiveMinimum": 0, "maximum": 1_000_000_000_000, "multipleOf": 0.01},
        ),
    ]
    phone_number: Phone


# Other names a request's field is accepted under (both: only with one value), by request.
ALIASES: dict[type[Struct], dict[str, str]] = {RegisterRequest: {"monthly_salary": "monthly_income"}}


class RegisterResponse(Struct):
    customer_id: int
    name: str
    age: int
    monthly_income: Money
    approved_limit: Money
    phone_number: int


class LoanRequestBody(Struct, forbid_unknown_fields=True):
    customer_id: Id
    loan_amount: PositiveAmount
    interest_rate: Rate
    tenure: Tenure


class CreditInputs(Struct):
    loans_taken: int
    completed_loans: int
    loans_this_year: int
    emis_due: int
    emis_paid_on_time: int
    current_loans: int
    current_debt: Money
    current_emis: Money
    approved_limit: Money


class CreditScoreBreakdown(Struct):
    """Each term's points, to the cent; the score rounds their exact sum half up (72.50 shown, 72.4957... exact: 72)."""

    base: Number
    payment_history: Number
    completed_loans: Number
    current_year_activity: Number
    credit_utilisation: Number
    over_limit: bool
    inputs: CreditInputs


class EligibilityResponse(Struct, omit_defaults=True):
    customer_id: int
    approval: bool
    interest_rate: Number
    corrected_interest_rate: Number
    tenure: int
    monthly_installment: Money
    credit_score: int
    credit_score_breakdown: CreditScoreBreakdown
    message: str | None = None


class CreateLoanResponse(Struct):
    loan_id: int | None
    customer_id: int
    loan_approved: bool
    message: str
    monthly_installment: Money


class LoanCustomer(Struct):
    id: int
    first_name: str
    last_name: str
    phone_number: int
    age: int


class LoanView(Struct):
    loan_id: int
    customer: LoanCustomer
    loan_amount: Money
    interest_rate: Number
    monthly_installment: Money
    tenure: int


class CustomerLoan(Struct):
    loan_id: int
    loan_amount: Money
    interest_rate: Number
    monthly_installment: Money
    repayments_left: int


FileName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=255,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$(?!\n)",
        description="A file name in the import directory",
    ),
]


class ImportRequest(Struct, forbid_unknown_fields=True):
    customers_file: FileName = "customer_data.xlsx"
    loans_file: FileName = "loan_data.xlsx"


class RowIssueView(Struct):
    file: str
    row: int
    reason: str


class ImportJobView(Struct):
    job_id: str
    state: str
    customers_file: str
    loans_file: str
    total_rows: int
    rows_done: int
    rows_rejected: int
    issues: list[RowIssueView]
    summary: dict[str, Any]
    requested_at: str
    updated_at: str


class Health(Struct):
    status: str


class Check(Struct, omit_defaults=True):
    ok: bool
    detail: str | None = None


class Readiness(Struct):
    status: str
    checks: dict[str, Check]


class RepaymentRequest(Struct, forbid_unknown_fields=True):
    paid_on: Annotated[date, Meta(description="The day the installment was paid (default: today)")] | None = None


class RepaymentResponse(Struct):
    loan_id: int
    installment: int
    paid_on: date
    due_date: date
    on_time: bool
    amount: Money
    repayments_left: int
    loan_closed: bool


class ScheduleRow(Struct):
    number: int
    due_date: date
    payment: Money
    interest: Money
    principal: Money
    balance: Money
    paid: bool
    on_time: bool | None
    paid_on: date | None


class Schedule(Struct):
    loan_id: int
    loan_amount: Money
    interest_rate: Number
    tenure: int
    monthly_installment: Money
    start_date: date
    installments: list[ScheduleRow]


class CustomerProfile(Struct):
    customer_id: int
    first_name: str
    last_name: str
    age: int
    phone_number: int
    monthly_income: Money
    approved_limit: Money
    current_debt: Money
    current_emis: Money
    current_loans: int
    past_loans: int
    credit_score: int
    credit_score_breakdown: CreditScoreBreakdown


class HistoryEvent(Struct):
    type: str
    recorded_at: datetime
    version: int
    data: dict[str, Any]


class ErrorBody(Struct):
    code: str
    message: str
    details: Any = None


class ErrorResponse(Struct):
    error: ErrorBody


encoder = msgspec.json.Encoder(decimal_format="number")
