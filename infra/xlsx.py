"""Reads the lender's Excel files: .xlsx streamed by infra.xlsx_stream, other formats by python-calamine."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from python_calamine import CalamineWorkbook

from infra.xlsx_stream import Block, NotXlsx, Table, first_sheet_blocks, forget_cached_dates
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
    parse_customer_columns,
    parse_loan,
    parse_loan_columns,
)

Record = TypeVar("Record", CustomerRecord, LoanRecord)
Rows = Iterator[Block]


def _rows(path: Path) -> Rows:
    """The first sheet's rows from row 1, as Python values: streamed for .xlsx (with runs of
    rows as Tables, read a column at a time), read whole by calamine for the other formats it
    knows (.xls, .xlsb, .ods)."""
    if not path.is_file():
        raise UnreadableFile(f"{path.name}: no such file")
    try:
        return _converted(path, first_sheet_blocks(str(path)))
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


def _converted(path: Path, rows: Rows) -> Rows:
    """The rows, with a cell that cannot be converted reported as an unreadable file."""
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
    parse_columns: Callable[[list[int], dict[str, Sequence[object]]], list[Record] | None],
) -> tuple[list[Record], list[RowIssue]]:
    records: list[Record] = []
    issues: list[RowIssue] = []
    pick: Callable[[list[Any]], tuple[Any, ...]] | None = None
    positions: list[int] = []
    width = 0
    number = 0
    for block in _rows(path):
        if type(block) is Table:
            if pick is not None:
                blank = (None,) * len(block.numbers)
                named = {
                    c: block.columns[p] if p < len(block.columns) else blank for c, p in zip(columns, positions, strict=True)
                }
                parsed = parse_columns(block.numbers, named)
                if parsed is not None:
                    records.extend(parsed)
                    number = block.numbers[-1]
                    continue
            numbered: Iterable[tuple[int, list[Any]]] = block.rows()
        else:
            numbered = ((number + 1, cast(list[Any], block)),)
        for number, row in numbered:
            if _blank(row):
                continue
            if pick is None:  # the header: the first row that is not blank
                positions = list(check_header(path.name, list(row), columns).values())
                pick = operator.itemgetter(*positions)  # the columns' cells, in one C call a row
                width = max(positions) + 1
                continue
            if len(row) < width:
                row = row + [None] * (width - len(row))
            values = pick(row)
            if "" in values:  # calamine gives "" for an empty cell
                values = tuple(None if value == "" else value for value in values)
            parsed_row = parse(label, number, dict(zip(columns, values, strict=True)))
            if isinstance(parsed_row, RowIssue):
                issues.append(parsed_row)
            else:
                records.append(parsed_row)
    if pick is None:
        raise UnreadableFile(f"{path.name}: the first sheet is empty")
    return records, issues


def read_history(customers_path: Path, loans_path: Path) -> tuple[list[CustomerRecord], list[LoanRecord], list[RowIssue]]:
    """Both files, fully read and checked before anything is written; unreadable files raise."""
    try:
        customers, customer_issues = _read(
            customers_path, customers_path.name, CUSTOMER_COLUMNS, parse_customer, parse_customer_columns
        )
        loans, loan_issues = _read(loans_path, loans_path.name, LOAN_COLUMNS, parse_loan, parse_loan_columns)
    finally:
        forget_shared_values()
        forget_cached_dates()
    return customers, loans, customer_issues + loan_issues
