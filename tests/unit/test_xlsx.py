"""Reading the lender's workbooks: rows are numbered as Excel numbers them, wherever the table starts."""

from __future__ import annotations

from pathlib import Path

import openpyxl

from infra.xlsx import read_history
from ledger.domain import RowIssue
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS

CUSTOMER = [1, "Asha", "Iyer", 30, 9876543210, 50000, 1800000]
LOAN = [1, 10, 100000, 12, 12, 8885, 6, "2024-01-01", "2025-01-01"]


def _write(path: Path, columns: tuple[str, ...], rows: list[list[object]], top_left: tuple[int, int] = (1, 1)) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    first_row, first_col = top_left
    for r, values in enumerate([list(columns), *rows]):
        for c, value in enumerate(values):
            sheet.cell(row=first_row + r, column=first_col + c, value=value)
    book.save(path)
    return path


def test_a_table_that_starts_lower_and_further_right_is_read_with_excel_row_numbers(tmp_path: Path) -> None:
    assert CUSTOMER_COLUMNS[0] == "Customer ID" and LOAN_COLUMNS[0] == "Customer ID"
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER, [2, "Ravi", "Rao", -4, 9876543211, 1, 1]], (3, 2))
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN, [], ["x", *LOAN[1:]]])
    read_customers, read_loans, issues = read_history(customers, loans)
    assert [(c.row, c.customer_id) for c in read_customers] == [(4, 1)]
    assert [(ln.row, ln.loan_id) for ln in read_loans] == [(2, 10)]
    assert [(i.file, i.row) for i in issues] == [("c.xlsx", 5), ("l.xlsx", 4)]  # the blank row 3 is skipped, not reported
    assert all(isinstance(i, RowIssue) for i in issues)
