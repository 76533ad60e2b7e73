"""Reading rows of the lender's files: what is a readable row, and what each refusal says."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest

from ledger.domain import RowIssue
from ledger.history import (
    CUSTOMER_COLUMNS,
    LOAN_COLUMNS,
    UnreadableFile,
    check_header,
    forget_shared_values,
    parse_customer,
    parse_customer_columns,
    parse_loan,
    parse_loan_columns,
)

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
        ("Last Name", "Garcia\u202e", "Last Name contains control characters"),
        ("Phone Number", 12345.0, "Phone Number must have 10 to 15 digits"),
        ("Phone Number", "09876543210", "Phone Number must not start with 0 (10 to 15 digits), got '09876543210'"),
        ("Phone Number", " 0987654321", "Phone Number must not start with 0"),
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
        ({"Tenure": 0.0}, "Tenure must be 1 to 600 months"),
        ({"Interest Rate": 101.0}, "Interest Rate must be between 0 and 100"),
        ({"EMIs paid on Time": 130.0}, "EMIs paid on Time (130) is more than the Tenure (129)"),
        ({"End Date": date(2017, 3, 8)}, "End Date 2017-03-08 is before Date of Approval 2017-03-09"),
        ({"Date of Approval": "yesterday"}, "Date of Approval is not a date"),
        ({"Date of Approval": "2017-03-09junk"}, "Date of Approval is not a date: '2017-03-09junk'"),
        ({"End Date": "2030-01-01 25:00"}, "End Date is not a date"),
        ({"Date of Approval": "2017-03-09j1234"}, "Date of Approval is not a date"),
        ({"Monthly payment": float("nan")}, "Monthly payment is not a number"),
    ],
)
def test_bad_loan_cells_are_named(change: dict[str, object], reason: str) -> None:
    issue = parse_loan("l.xlsx", 9, LOAN | change)
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith(reason)


@pytest.mark.parametrize("text", ["2017-03-09", " 2017-03-09 ", "2017-03-09 00:00:00", "2017-03-09T10:30:00"])
def test_a_date_written_as_iso_text_reads_as_that_day(text: str) -> None:
    loan = parse_loan("l.xlsx", 9, LOAN | {"Date of Approval": text})
    assert not isinstance(loan, RowIssue) and loan.start_date == date(2017, 3, 9)


def test_a_header_without_the_expected_columns_refuses_the_file() -> None:
    with pytest.raises(UnreadableFile, match="missing column\\(s\\) Age, Approved Limit"):
        check_header("c.xlsx", ["Customer ID", "First Name", "Last Name", "Phone Number", "Monthly Salary"], CUSTOMER_COLUMNS)
    assert check_header("c.xlsx", [" Customer ID ", *CUSTOMER_COLUMNS[1:]], CUSTOMER_COLUMNS)["Customer ID"] == 0
    # however the header spells their case and spaces
    header = ["customer id", "FIRST NAME", "Last  Name", *CUSTOMER_COLUMNS[3:]]
    assert check_header("c.xlsx", header, CUSTOMER_COLUMNS) == {column: n for n, column in enumerate(CUSTOMER_COLUMNS)}


def test_a_header_that_names_a_column_twice_refuses_the_file() -> None:
    # Which of the two holds the values? The last one used to win, silently.
    with pytest.raises(UnreadableFile, match="column\\(s\\) Loan Amount appear more than once in the header"):
        check_header("l.xlsx", [*LOAN_COLUMNS, "Notes", " loan amount"], LOAN_COLUMNS)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("Monthly Salary", "1E-99999999", "Monthly Salary must be below"),
        ("Approved Limit", 1e300, "Approved Limit must be below"),
        ("Last Name", "Nul\x00Byte", "Last Name contains control characters"),
        ("First Name", "C1\x85Control", "First Name contains control characters"),
    ],
)
def test_values_the_ledger_could_not_store_are_refused(column: str, value: object, reason: str) -> None:
    issue = parse_customer("c.xlsx", 5, CUSTOMER | {column: value})
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith(reason)


# A run of rows checked a column at a time gives what the row-by-row checks give, or nothing.


def _run(rows: list[dict[str, object]], columns: tuple[str, ...]) -> dict[str, list[object]]:
    return {column: [row[column] for row in rows] for column in columns}


LOAN_DAY = LOAN | {"End Date": date(2027, 12, 9)}  # a date cell, as the column path takes it
LOANS = [
    LOAN_DAY,
    LOAN_DAY | {"Loan ID": 5931.0, "Interest Rate": 12.5, "EMIs paid on Time": 129.0, "Monthly payment": 0.0},
    LOAN_DAY | {"Customer ID": 15.0, "Tenure": 1.0, "EMIs paid on Time": 0.0, "End Date": date(2017, 3, 9)},
]
CUSTOMERS = [CUSTOMER, CUSTOMER | {"Customer ID": 2.0, "First Name": " Ana ", "Age": 0.0, "Approved Limit": 0.0}]


def test_a_run_of_good_rows_reads_the_same_a_column_at_a_time() -> None:
    loans = parse_loan_columns([2, 3, 5], _run(LOANS, LOAN_COLUMNS))
    assert loans == [parse_loan("l.xlsx", row, cells) for row, cells in zip([2, 3, 5], LOANS, strict=True)]
    assert loans is not None and [loan.row for loan in loans] == [2, 3, 5]
    customers = parse_customer_columns([8, 9], _run(CUSTOMERS, CUSTOMER_COLUMNS))
    assert customers == [parse_customer("c.xlsx", row, cells) for row, cells in zip([8, 9], CUSTOMERS, strict=True)]
    assert customers is not None and customers[1].first_name == "Ana"


@pytest.mark.parametrize(
    "change",
    [
        {"Loan Amount": 0.0},
        {"Tenure": 0.0},
        {"Interest Rate": 101.0},
        {"Interest Rate": -0.5},
        {"EMIs paid on Time": 130.0},
        {"End Date": date(2017, 3, 8)},
        {"Date of Approval": "yesterday"},
        {"End Date": datetime(2027, 12, 9, 0, 0)},  # readable, but not by the column path
        {"Monthly payment": float("nan")},
        {"Monthly payment": -1.0},
        {"Loan Amount": 1e15},
        {"Interest Rate": 8.0000001},
        {"Customer ID": 0.0},
        {"Loan ID": 1.5},
        {"Tenure": True},
        {"Loan ID": 7},
        {"Customer ID": None},
    ],
)
def test_a_run_with_any_cell_the_column_checks_do_not_take_is_left_to_the_row_checks(change: dict[str, object]) -> None:
    rows = [LOANS[0], LOAN_DAY | change, LOANS[1]]
    assert parse_loan_columns([2, 3, 4], _run(rows, LOAN_COLUMNS)) is None


@pytest.mark.parametrize(
    "change",
    [
        {"Customer ID": 0.0},
        {"Customer ID": "1"},
        {"First Name": ""},
        {"Last Name": None},
        {"Last Name": "a\tb"},
        {"First Name": "x" * 101},
        {"Age": -1.0},
        {"Age": 30.5},
        {"Phone Number": 12345.0},
        {"Phone Number": 1e16},
        {"Monthly Salary": 0.0},
        {"Approved Limit": -1.0},
        {"Approved Limit": "n/a"},
    ],
)
def test_a_customer_run_with_any_bad_cell_is_left_to_the_row_checks(change: dict[str, object]) -> None:
    rows = [CUSTOMERS[0], CUSTOMER | change]
    assert parse_customer_columns([2, 3], _run(rows, CUSTOMER_COLUMNS)) is None


def test_a_text_number_with_more_zeros_than_six_decimals_reads_as_the_same_plain_number() -> None:
    # As given, 16,400 zeros went into the event, and PostgreSQL's numeric (16,383 decimals at
    # most) refused it: the read model would have stopped at that customer.
    record = parse_customer("c.xlsx", 2, CUSTOMER | {"Monthly Salary": "12500." + "0" * 16_400})
    assert not isinstance(record, RowIssue)
    assert (record.monthly_income, record.monthly_income.as_tuple().exponent) == (Decimal(12500), -6)
    loan = parse_loan("l.xlsx", 2, LOAN | {"Interest Rate": "0e-9999999999", "Monthly payment": "-0E+1073741823"})
    assert not isinstance(loan, RowIssue)
    assert (str(loan.interest_rate), str(loan.monthly_payment)) == ("0.000000", "0")  # 0E+1073741823 overflows numeric


@pytest.mark.parametrize(
    "text",
    [
        "5_0000",
        "\u0665\u0660\u0660\u0660\u0660",
        "\uff15\uff10\uff10\uff10\uff10",
        "50 000",
        "Infinity",
        "1,00,000",
        "\u20b950000",
        "0x10",
        ".",
    ],
)
def test_a_text_cell_is_a_number_only_as_json_spells_one(text: str) -> None:
    """Decimal takes underscores and every script's digits: "5_0000" and 50000 in Arabic-Indic
    digits were imported as a salary of 50,000 (from a review)."""
    issue = parse_customer("c.xlsx", 4, CUSTOMER | {"Monthly Salary": text})
    assert isinstance(issue, RowIssue) and issue.reason == f"Monthly Salary is not a number: {text!r}"


@pytest.mark.parametrize(("text", "number"), [(" 50000 ", "50000"), ("+5e4", "5E+4"), ("50000.", "50000"), (".5", "0.5")])
def test_a_text_cell_spelling_a_number_as_json_does_reads_as_it(text: str, number: str) -> None:
    record = parse_customer("c.xlsx", 4, CUSTOMER | {"Monthly Salary": text})
    assert not isinstance(record, RowIssue) and record.monthly_income == Decimal(number)


@pytest.mark.parametrize("name", ["\u200b", " \u200b\ufeff ", "\u00ad", "\u2060", "\ufe0f", "\u0301", "\U000e0020", "\u061c"])
def test_a_name_that_shows_nothing_is_refused_as_the_api_refuses_it(name: str) -> None:
    """A name of a zero-width space alone was imported (from a review); the API refuses it."""
    issue = parse_customer("c.xlsx", 4, CUSTOMER | {"First Name": name})
    assert isinstance(issue, RowIssue) and issue.reason == "First Name shows nothing (only spaces and invisible characters)"


@pytest.mark.parametrize(
    ("cell", "name"),
    [(123.0, "123"), (12.5, "12.5"), (7, "7"), ("\u200bAsha", "\u200bAsha"), (1234567890123456.0, "1234567890123456")],
)
def test_a_name_in_a_number_cell_reads_as_the_sheet_shows_it(cell: object, name: str) -> None:
    record = parse_customer("c.xlsx", 4, CUSTOMER | {"Last Name": cell})
    assert not isinstance(record, RowIssue) and record.last_name == name


def test_a_text_number_too_large_for_the_decimal_context_is_a_row_issue_not_a_crash() -> None:
    issue = parse_customer("c.xlsx", 4, CUSTOMER | {"Monthly Salary": "1E+1000000"})  # abs() raised decimal.Overflow
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith("Monthly Salary must be below")


def test_a_negative_zero_reads_as_zero_whichever_comes_first() -> None:
    for first, second in ((-0.0, 0.0), (0.0, -0.0)):
        forget_shared_values()  # the shared values start empty, as at the start of a file
        payments = [parse_loan("l.xlsx", 2 + n, LOAN | {"Monthly payment": value}) for n, value in enumerate((first, second))]
        assert [str(p.monthly_payment) for p in payments if not isinstance(p, RowIssue)] == ["0.0", "0.0"]


def test_a_formulas_binary_rounding_reads_as_the_number_the_sheet_shows() -> None:
    """Excel shows (and keeps, when typed) 15 significant digits; a formula's result can carry
    binary noise past them, which used to refuse the row for having more than 6 decimals."""
    loan = parse_loan("l.xlsx", 2, LOAN | {"Interest Rate": 0.1 + 0.2, "Monthly payment": 8791.59 * 1.1})
    assert not isinstance(loan, RowIssue), loan
    assert (str(loan.interest_rate), str(loan.monthly_payment)) == ("0.3", "9670.749")
    assert (repr(0.1 + 0.2), repr(8791.59 * 1.1)) == ("0.30000000000000004", "9670.749000000002")  # the noise
    # More decimals than allowed within the 15 digits shown are refused as before.
    issue = parse_loan("l.xlsx", 3, LOAN | {"Interest Rate": 1 / 3})
    assert isinstance(issue, RowIssue)
    assert issue.reason == "Interest Rate must be below 1,000,000,000,000,000 with at most 6 decimals, got 0.3333333333333333"


def test_a_phone_number_written_as_text_reads_as_its_digits() -> None:
    record = parse_customer("c.xlsx", 2, CUSTOMER | {"Phone Number": " 9876543210 "})
    assert not isinstance(record, RowIssue)
    assert record.phone_number == "9876543210"


@pytest.mark.parametrize("column", ["Loan Amount", "Tenure", "Date of Approval", "Interest Rate"])
def test_an_empty_cell_says_it_is_empty_and_names_the_formula_case(column: str) -> None:
    # A formula whose workbook holds no saved value (written by a library, never opened in Excel) reads as empty.
    issue = parse_loan("l.xlsx", 3, LOAN | {column: None})
    assert isinstance(issue, RowIssue)
    assert issue.reason == f"{column} is empty (or a formula with no saved value: open and save the file in Excel)"


def test_a_rate_written_as_a_fraction_that_lost_its_percent_format_is_refused_not_read_100_times_too_small() -> None:
    # 100,000 over 12 months: the EMI is 8756.75 at 9.25% and 8337.51 at 0.0925%.
    row = LOAN | {
        "Loan Amount": 100_000.0,
        "Tenure": 12.0,
        "EMIs paid on Time": 3.0,
        "Interest Rate": 0.0925,
        "Monthly payment": 8760.0,
    }
    issue = parse_loan("l.xlsx", 4, row)
    assert isinstance(issue, RowIssue)
    assert issue.reason == (
        "Interest Rate 0.0925 looks like a fraction: the Monthly payment 8760.0 fits 9.25% and not 0.0925%;"
        " write 9.25, or format the cell as a percentage"
    )
    assert parse_loan_columns([4], {name: [value] for name, value in row.items()}) is None  # the row check decides
    # A rate under 1% that its payment fits is a rate under 1%.
    for rate, payment in ((0.0925, 8337.51), (0.5, 8356.0)):
        record = parse_loan("l.xlsx", 4, row | {"Interest Rate": rate, "Monthly payment": payment})
        assert not isinstance(record, RowIssue) and record.interest_rate == Decimal(str(rate))
