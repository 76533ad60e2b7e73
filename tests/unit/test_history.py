"""Reading rows of the lender's files: what is a readable row, and what each refusal says."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest

from ledger.domain import RowIssue
from ledger.history import CUSTOMER_COLUMNS, UnreadableFile, check_header, parse_customer, parse_loan

CUSTOMER = dict(zip(CUSTOMER_COLUMNS, [1.0, "Aaron", "Garcia", 63.0, 9629317944.0, 50000.0, 4500000.0], strict=True))
LOAN = {
    "Customer ID": 14.0,
    "Loan ID": 5930.0,
    "Loan Amount": 900000.0,
    "Tenure": 129.0,
    "Interest Rate": 8.2,
    "Monthly payment": 15344.0,
    "EMIs paid on Time": 114.0,
    "Date of Approval": date(2017, 3, 9),
    "End Date": datetime(2027, 12, 9, 0, 0),
}


def test_a_reference_customer_row_reads_exactly() -> None:
    record = parse_customer("c.xlsx", 2, CUSTOMER)
    assert not isinstance(record, RowIssue)
    assert (record.customer_id, record.phone_number, record.monthly_income, record.approved_limit) == (
        1,
        "9629317944",
        Decimal(50000),
        Decimal(4500000),
    )


def test_a_reference_loan_row_reads_exactly() -> None:
    record = parse_loan("l.xlsx", 2, LOAN)
    assert not isinstance(record, RowIssue)
    assert record.interest_rate == Decimal("8.2")  # not 8.199999999999999289...
    assert record.end_date == date(2027, 12, 9)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("Customer ID", "abc", "Customer ID is not a whole number"),
        ("Customer ID", 1.5, "Customer ID is not a whole number"),
        ("First Name", None, "First Name is empty"),
        ("Phone Number", 12345.0, "Phone Number must have 10 to 15 digits"),
        ("Monthly Salary", -1.0, "Monthly Salary must be above 0"),
        ("Approved Limit", "n/a", "Approved Limit is not a number"),
    ],
)
def test_bad_customer_cells_are_named(column: str, value: object, reason: str) -> None:
    issue = parse_customer("c.xlsx", 7, CUSTOMER | {column: value})
    assert isinstance(issue, RowIssue)
    assert (issue.file, issue.row) == ("c.xlsx", 7)
    assert issue.reason.startswith(reason)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Loan Amount": 0.0}, "Loan Amount must be above 0"),
        ({"Tenure": 0.0}, "Tenure must be at least 1"),
        ({"Interest Rate": 101.0}, "Interest Rate must be between 0 and 100"),
        ({"EMIs paid on Time": 130.0}, "EMIs paid on Time (130) is more than the Tenure (129)"),
        ({"End Date": date(2017, 3, 8)}, "End Date 2017-03-08 is before Date of Approval 2017-03-09"),
        ({"Date of Approval": "yesterday"}, "Date of Approval is not a date"),
        ({"Monthly payment": float("nan")}, "Monthly payment is not a number"),
    ],
)
def test_bad_loan_cells_are_named(change: dict[str, object], reason: str) -> None:
    issue = parse_loan("l.xlsx", 9, LOAN | change)
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith(reason)


def test_a_header_without_the_expected_columns_refuses_the_file() -> None:
    with pytest.raises(UnreadableFile, match="missing column\\(s\\) Age, Approved Limit"):
        check_header("c.xlsx", ["Customer ID", "First Name", "Last Name", "Phone Number", "Monthly Salary"], CUSTOMER_COLUMNS)
    assert check_header("c.xlsx", [" Customer ID ", *CUSTOMER_COLUMNS[1:]], CUSTOMER_COLUMNS)["Customer ID"] == 0


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("Monthly Salary", "1E-99999999", "Monthly Salary must be below"),
        ("Approved Limit", 1e300, "Approved Limit must be below"),
        ("Last Name", "Nul\x00Byte", "Last Name contains control characters"),
    ],
)
def test_values_the_ledger_could_not_store_are_refused(column: str, value: object, reason: str) -> None:
    issue = parse_customer("c.xlsx", 5, CUSTOMER | {column: value})
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith(reason)
