"""Reads the lender's Excel files: .xlsx streamed by infra.xlsx_stream, other formats by python-calamine."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from python_calamine import CalamineWorkbook

from infra.xlsx_stream import NotXlsx, first_sheet_rows, forget_cached_dates
from ledger.domain import RowIssue
from ledger.history import (
    CUSTOMER_COLUMNS,
    LOAN_COLUMNS,
    CustomerRecord,
    LoanRecord,
    UnreadableFile,
    check_header,
    forget_shared_values,
    parse_customer,
    parse_loan,
)

Record = TypeVar("Record", CustomerRecord, LoanRecord)


def _rows(path: Path) -> Iterator[list[Any]]:
    """The first sheet's rows from row 1, as Python values: streamed for .xlsx, read whole by
    calamine for the other formats it knows (.xls, .xlsb, .ods)."""
    if not path.is_file():
        raise UnreadableFile(f"{path.name}: no such file")
    try:
        return _converted(path, first_sheet_rows(str(path)))
    except NotXlsx:
        pass
    except Exception as error:
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None
    try:
        workbook = CalamineWorkbook.from_path(str(path))
        if not workbook.sheet_names:
            raise UnreadableFile(f"{path.name}: the workbook has no sheets")
        # Row by row: the cells become Python objects one row at a time, not all at once.
        return _converted(path, workbook.get_sheet_by_index(0).iter_rows())
    except UnreadableFile:
        raise
    except Exception as error:  # calamine raises its own error types for every malformed file
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None


def _converted(path: Path, rows: Iterator[list[Any]]) -> Iterator[list[Any]]:
    """The rows, with a cell calamine cannot convert reported as an unreadable file."""
    try:
        yield from rows
    except Exception as error:
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None


def _blank(row: list[Any]) -> bool:
    return row.count("") + row.count(None) == len(row)  # list.count compares in C: a million rows add up


def _read(
    path: Path,
    label: str,
    columns: tuple[str, ...],
    parse: Callable[[str, int, dict[str, object]], Record | RowIssue],
) -> tuple[list[Record], list[RowIssue]]:
    rows = _rows(path)
    header_row, header = next(((number, row) for number, row in enumerate(rows, start=1) if not _blank(row)), (0, None))
    if header is None:
        raise UnreadableFile(f"{path.name}: the first sheet is empty")
    positions = check_header(path.name, list(header), columns)
    pick = operator.itemgetter(*positions.values())  # the columns' cells, in one C call a row
    width = max(positions.values()) + 1
    records: list[Record] = []
    issues: list[RowIssue] = []
    for number, row in enumerate(rows, start=header_row + 1):
        if _blank(row):
            continue
        if len(row) < width:
            row = row + [None] * (width - len(row))
        values = pick(row)
        if "" in values:  # calamine gives "" for an empty cell
            values = tuple(None if value == "" else value for value in values)
        parsed = parse(label, number, dict(zip(columns, values, strict=True)))
        if isinstance(parsed, RowIssue):
            issues.append(parsed)
        else:
            records.append(parsed)
    return records, issues


def read_history(customers_path: Path, loans_path: Path) -> tuple[list[CustomerRecord], list[LoanRecord], list[RowIssue]]:
    """Both files, fully read and checked before anything is written; unreadable files raise."""
    try:
        customers, customer_issues = _read(customers_path, customers_path.name, CUSTOMER_COLUMNS, parse_customer)
        loans, loan_issues = _read(loans_path, loans_path.name, LOAN_COLUMNS, parse_loan)
    finally:
        forget_shared_values()
        forget_cached_dates()
    return customers, loans, customer_issues + loan_issues
