"""Reading the lender's workbooks: rows are numbered as Excel numbers them, wherever the table starts."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import openpyxl
import pytest
from openpyxl.cell import WriteOnlyCell

from infra import xlsx, xlsx_stream
from infra.importer import files_digest, run_import
from infra.xlsx import read_history
from ledger.application import Ledger
from ledger.domain import RowIssue
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS, UnreadableFile, parse_loan, parse_loan_columns

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


def _generated(path: Path, columns: tuple[str, ...], rows: int, make: Callable[[int], list[object]]) -> Path:
    """A generator's kind of file (openpyxl write-only): a header, then rows of numbers and dates."""
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet()
    sheet.append(list(columns))
    for n in range(1, rows + 1):
        sheet.append(make(n))
    book.save(path)
    return path


def _loan(n: int) -> list[object]:
    start = date(2020, 1 + n % 12, 1 + n % 28)
    row: list[object] = [
        n % 300 + 1,
        1000 + n,
        100_000 + n,
        12 + n % 5,
        8 + n % 7 / 4,
        8_000 + n % 9,
        n % 12,
        start,
        date(start.year + 2, start.month, start.day),
    ]
    if n % 500 == 250:  # now and then a row the checks refuse, each time for another reason
        row[(n // 500) % 9] = [-5, 0, -1, 0, 101, -3, 99, "soon", date(2000, 1, 1)][(n // 500) % 9]
    return row


def _customer(n: int) -> list[object]:
    row: list[object] = [n, f"First{n % 13}", f"Last{n % 11}", 20 + n % 50, 9_000_000_000 + n, 40_000 + n, 1_400_000 + 100 * n]
    if n % 400 == 200:
        row[(n // 400) % 7] = [0, "", "x" * 101, -1, 12345, 0, -2][(n // 400) % 7]
    return row


def test_rows_checked_a_column_at_a_time_give_the_records_and_issues_of_the_row_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    customers = _generated(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, 2_000, _customer)
    loans = _generated(tmp_path / "l.xlsx", LOAN_COLUMNS, 5_000, _loan)
    monkeypatch.setattr(xlsx_stream, "CHUNK", 4096)  # many chunks, most of them rows of numbers only
    by_columns: list[int] = []

    def counted(real: Callable[..., list[Any] | None]) -> Callable[..., list[Any] | None]:
        def run(*args: Any) -> list[Any] | None:
            records = real(*args)
            by_columns.append(len(records or ()))
            return records

        return run

    monkeypatch.setattr(xlsx, "parse_loan_columns", counted(xlsx.parse_loan_columns))
    monkeypatch.setattr(xlsx, "parse_customer_columns", counted(xlsx.parse_customer_columns))
    fast = read_history(customers, loans)
    assert sum(by_columns) > 6_000 and 0 in by_columns  # most rows went a column at a time, some runs did not

    monkeypatch.setattr(xlsx, "parse_loan_columns", lambda *_: None)
    monkeypatch.setattr(xlsx, "parse_customer_columns", lambda *_: None)
    assert read_history(customers, loans) == fast  # the row checks alone: the same records, issues and rows
    read_customers, read_loans, issues = fast
    assert (len(read_customers), len(read_loans), len(issues)) == (2_000 - 5, 5_000 - 10, 15)
    assert [i.row for i in issues if i.file == "l.xlsx"] == [n + 1 for n in range(250, 5_001, 500)]


def test_rows_numbered_out_of_order_keep_unique_positions_in_every_reading_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _generated(tmp_path / "in_order.xlsx", LOAN_COLUMNS, 3_000, _loan)
    swapped = tmp_path / "swapped.xlsx"
    with zipfile.ZipFile(written) as source, zipfile.ZipFile(swapped, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.startswith("xl/worksheets/"):
                text = data.decode()
                for old, new in (("2", "#"), ("3", "2"), ("#", "3")):  # rows 2 and 3 trade numbers
                    text = re.sub(rf'(<row r="|<c r="[A-Z]+){old}"', rf'\g<1>{new}"', text)
                data = text.encode()
            target.writestr(item, data)
    monkeypatch.setattr(xlsx_stream, "CHUNK", 4096)  # the rows after the swap come in many chunks
    positions = [n for n, row in enumerate(xlsx_stream.first_sheet_rows(str(swapped)), start=1) if row and n > 1]
    loans, issues = xlsx._read(swapped, "l.xlsx", LOAN_COLUMNS, parse_loan, parse_loan_columns)
    numbers = sorted([loan.row for loan in loans] + [issue.row for issue in issues])
    assert numbers == positions and len(set(numbers)) == 3_000  # one number per row, as the rows come
    in_order, _ = xlsx._read(written, "l.xlsx", LOAN_COLUMNS, parse_loan, parse_loan_columns)
    assert {(ln.loan_id, ln.amount) for ln in loans} == {(ln.loan_id, ln.amount) for ln in in_order}


def test_an_import_defers_full_collections_and_gives_the_thresholds_back(tmp_path: Path) -> None:
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN])
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"})
    before = gc.get_threshold()
    during: list[tuple[int, ...]] = []
    job_id, _ = ledger.request_import(str(customers), str(loans))
    result = run_import(ledger, job_id, customers, loans, 10, settle=lambda: during.append(gc.get_threshold()))
    assert result["state"] == "completed" and result["loans_imported"] == 1
    assert during[0][:2] == before[:2] and during[0][2] > 1_000_000  # the young generations as before
    assert gc.get_threshold() == before
    job_id, _ = ledger.request_import(str(tmp_path / "missing.xlsx"), str(loans))
    assert run_import(ledger, job_id, tmp_path / "missing.xlsx", loans, 10)["state"] == "failed"
    assert gc.get_threshold() == before


def test_a_file_replaced_while_it_is_read_fails_the_import_and_nothing_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows read may be the old file's, the new one's or a mix: the job must not record them
    under a digest of either."""
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN])
    ledger = Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"})

    def read_then_replace(*args: Any, **kwargs: Any) -> Any:
        rows = read_history(*args, **kwargs)
        _write(loans, LOAN_COLUMNS, [[*LOAN[:2], 90000, *LOAN[3:]]])
        return rows

    monkeypatch.setattr("infra.importer.read_history", read_then_replace)
    job_id, _ = ledger.request_import(str(customers), str(loans))
    position = ledger.recorder.max_notification_id()
    result = run_import(ledger, job_id, customers, loans, 10)
    assert result == {"state": "failed", "error": "c.xlsx or l.xlsx changed while it was being read: import it again"}
    assert ledger.get_import_job(job_id).state == "failed"
    assert ledger.recorder.max_notification_id() == (position or 0) + 1  # the job's failure, nothing else


def test_cells_no_id_sequence_date_or_schedule_can_take_are_row_issues_and_the_good_rows_stay(tmp_path: Path) -> None:
    # Each of these once failed the whole job ("the import stopped: ValueError ...", a setval on
    # a numeric, a date serial beyond timedelta), or imported and broke the ledger after: an ID
    # of 2**63 - 1 left the ID sequences nothing to give (every register and create-loan a 500),
    # and a schedule past the year 9999 made the loan's endpoints 500.
    customers = _write(
        tmp_path / "c.xlsx",
        CUSTOMER_COLUMNS,
        [
            CUSTOMER,
            [2, "Max", "Id", 30, 9876543211, 50000, 1800000],
            ["9223372036854775807", "Top", "Id", 30, 9876543212, 50000, 1800000],
            [4, "Neg", "Phone", 30, -910000005, 50000, 1800000],
        ],
    )
    bad_loans = [
        ["²", *LOAN[1:]],  # "²".isdigit() is True; int("²") raises
        [1, 11, 100000, "--5", 12, 8885, 6, "2024-01-01", "2025-01-01"],
        [1, "99999999999999999999", *LOAN[2:]],  # beyond a bigint
        [1, 13, 100000, 100_000, 12, 8885, 6, "2024-01-01", "2025-01-01"],  # tenure over 600 months
        [1, 14, 100000, 12, 12, 8885, 6, "9999-06-01", "9999-12-01"],  # due dates past 9999-12-31
    ]
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN, *bad_loans, [1, 15, *LOAN[2:7], None, "2025-01-01"]])
    book = openpyxl.load_workbook(loans)
    sheet = book.active
    assert sheet is not None
    sheet.cell(row=8, column=8, value=1e9).number_format = "yyyy-mm-dd"  # no date can hold it
    book.save(loans)
    read_customers, read_loans, issues = read_history(customers, loans)
    assert [c.customer_id for c in read_customers] == [1, 2]
    assert [ln.loan_id for ln in read_loans] == [10]
    reasons = {(i.file, i.row): i.reason for i in issues}
    assert reasons == {
        ("c.xlsx", 4): "Customer ID must be 1 to 999,999,999,999,999, got 9223372036854775807",
        ("c.xlsx", 5): "Phone Number must have 10 to 15 digits, got -910000005",
        ("l.xlsx", 3): "Customer ID is not a whole number: '²'",
        ("l.xlsx", 4): "Tenure is not a whole number: '--5'",
        ("l.xlsx", 5): "Loan ID must be 1 to 999,999,999,999,999, got 99999999999999999999",
        ("l.xlsx", 6): "Tenure must be 1 to 600 months, got 100000",
        ("l.xlsx", 7): "Date of Approval 9999-06-01 plus 12 months is past 9999-12-31",
        ("l.xlsx", 8): "Date of Approval is not a date: 1000000000.0",
    }


def test_a_cell_naming_a_shared_string_the_workbook_lacks_says_so(tmp_path: Path) -> None:
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN])
    damaged = tmp_path / "damaged.xlsx"
    with zipfile.ZipFile(loans) as source, zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data.replace(b'<c r="A2" t="n"><v>1</v></c>', b'<c r="A2" t="s"><v>999</v></c>')
            target.writestr(item, data)
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    with pytest.raises(xlsx.UnreadableFile, match=r"damaged\.xlsx: .*a cell refers to shared string 999, but the workbook has 0"):
        read_history(customers, damaged)


def _rates_written(path: Path, formats: Callable[[int], str | None]) -> Path:
    """`_loan`'s rows with each Interest Rate written as `formats(n)` asks: "%" formats hold the
    rate / 100, as a lender typing 8.25% holds 0.0825; None the rate itself with no format."""
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet()
    sheet.append(list(LOAN_COLUMNS))
    for n in range(1, 3_001):
        row = _loan(n)
        shown = formats(n)
        if shown is not None:
            is_percent = shown.endswith("%")
            rate = WriteOnlyCell(sheet, value=cast(float, row[4]) / 100 if is_percent else row[4])
            rate.number_format = shown
            row[4] = rate
        sheet.append(row)
    book.save(path)
    return path


@pytest.mark.parametrize("split", [False, True])
def test_a_rate_formatted_as_a_percentage_reads_as_the_percentage_the_sheet_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    # A cell showing 8.25% holds 0.0825: read as its number, every loan's rate was a hundredth of
    # what the lender sees. A format that writes "%" as text ("0.00"%"") holds the rate itself.
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    plain = _rates_written(tmp_path / "plain.xlsx", lambda n: None)
    every = _rates_written(tmp_path / "every.xlsx", lambda n: "0.00%")  # one style: a column at a time
    mixed = _rates_written(tmp_path / "mixed.xlsx", lambda n: ["0.00%", "0%", '0.00"%"', "0.000%", None][n % 5])
    monkeypatch.setattr(xlsx_stream, "CHUNK", 4096)  # "every": runs of rows read a column at a time
    split_size = 1 if split else None  # the helper process reads the second half
    halves: list[Path] = []
    read_halves = xlsx._read_halves
    monkeypatch.setattr(xlsx, "_read_halves", lambda path, *rest: halves.append(path) or read_halves(path, *rest))
    _, expected, expected_issues = read_history(customers, plain, split_size=split_size)
    assert len(expected) == 3_000 - 6 and {loan.interest_rate for loan in expected} >= {Decimal("8.25"), Decimal("9.5")}
    for path in (every, mixed):
        _, loans, issues = read_history(customers, path, split_size=split_size)
        assert [(ln.row, ln.interest_rate) for ln in loans] == [(ln.row, ln.interest_rate) for ln in expected], path.name
        # the same rows refused for the same reasons (a rate of 101% shown as the percentage, 101)
        assert [(i.row, i.reason) for i in issues] == [(i.row, i.reason.replace("101.0", "101")) for i in expected_issues]
    assert len(halves) == (3 if split else 0)
    with zipfile.ZipFile(every) as package:  # the formats are Excel's own: built-in 0.00% and 0%
        assert 'numFmtId="10"' in package.read("xl/styles.xml").decode()


def test_a_percentage_cell_anywhere_but_a_rate_is_its_number() -> None:
    cells = dict(zip(LOAN_COLUMNS, LOAN, strict=True))
    as_percent = {**cells, "Loan Amount": xlsx_stream.Percent(100000.0), "Interest Rate": xlsx_stream.Percent(0.12)}
    loan = parse_loan("l.xlsx", 2, as_percent)
    assert not isinstance(loan, RowIssue)
    assert (loan.amount, loan.interest_rate) == (100000, 12)
    wrong = parse_loan("l.xlsx", 3, {**cells, "Interest Rate": xlsx_stream.Percent(0.081234567)})  # 8.1234567%
    assert isinstance(wrong, RowIssue) and "at most 6 decimals" in wrong.reason


# Sheets: the rows are read from the first, which must be visible, and no other may hold rows of the same kind.


def _book(path: Path, sheets: list[tuple[str, str, list[list[object]]]]) -> Path:
    """A workbook with these sheets in order: (title, state, rows)."""
    book = openpyxl.Workbook()
    assert book.active is not None
    book.remove(book.active)
    for title, state, rows in sheets:
        sheet = book.create_sheet(title)
        sheet.sheet_state = state  # type: ignore[assignment]
        for row in rows:
            sheet.append(row)
    book.active = next(i for i, (_, state, _) in enumerate(sheets) if state == "visible")
    book.save(path)
    return path


@pytest.mark.parametrize("state", ["hidden", "veryHidden"])
def test_a_hidden_first_sheet_refuses_the_file_rather_than_import_rows_the_lender_does_not_see(
    tmp_path: Path, state: str
) -> None:
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    old = [*LOAN[:2], 999_999, *LOAN[3:]]
    loans = _book(
        tmp_path / "l.xlsx", [("OldData", state, [list(LOAN_COLUMNS), old]), ("Loans", "visible", [list(LOAN_COLUMNS), LOAN])]
    )
    with pytest.raises(
        UnreadableFile, match=r"l.xlsx: its first sheet, 'OldData', is hidden, and the rows are read from the first sheet"
    ):
        read_history(customers, loans)


def test_rows_of_the_same_kind_on_another_sheet_refuse_the_file_rather_than_be_left_out(tmp_path: Path) -> None:
    customers = _write(tmp_path / "c.xlsx", CUSTOMER_COLUMNS, [CUSTOMER])
    later = [LOAN[0], 11, *LOAN[2:]]
    title = ["Loans approved in 2024"]  # a title above the header, as a lender's sheet may have
    loans = _book(
        tmp_path / "l.xlsx",
        [("2023", "visible", [list(LOAN_COLUMNS), LOAN]), ("2024", "visible", [title, [], list(LOAN_COLUMNS), later])],
    )
    with pytest.raises(
        UnreadableFile, match=r"l.xlsx: sheet '2024' also has this file's columns, and only the first sheet \('2023'\) is read"
    ):
        read_history(customers, loans)


def test_other_sheets_without_the_files_columns_are_left_alone(tmp_path: Path) -> None:
    customers = _book(
        tmp_path / "c.xlsx",
        [
            ("Customers", "visible", [list(CUSTOMER_COLUMNS), CUSTOMER]),
            ("Notes", "visible", [["exported from the core banking system"], ["Customer ID", "comment"]]),
            ("Empty", "hidden", []),
        ],
    )
    loans = _write(tmp_path / "l.xlsx", LOAN_COLUMNS, [LOAN])
    read_customers, read_loans, issues = read_history(customers, loans)
    assert ([c.customer_id for c in read_customers], [ln.loan_id for ln in read_loans], issues) == ([1], [10], [])


def test_a_file_name_that_became_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """A file swapped for a named pipe after its import was queued held the worker (and every
    import after it) until someone wrote to the pipe (from a review)."""
    pipe = tmp_path / "customer_data.xlsx"
    os.mkfifo(pipe)
    pool = ThreadPoolExecutor(1)
    try:
        digest = pool.submit(files_digest, pipe)
        assert digest.result(timeout=10) == ""
        read = pool.submit(read_history, pipe, pipe)
        with pytest.raises(UnreadableFile, match=r"customer_data\.xlsx: not a file \(a directory, a pipe or a device\)"):
            read.result(timeout=10)
    finally:
        with contextlib.suppress(OSError):  # a reader waiting on the pipe (the test failed): let it go
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pool.shutdown(cancel_futures=True)


def _ods(path: Path, rows: list[list[Any]], tail: str = "") -> Path:
    """A minimal OpenDocument spreadsheet: one sheet of `rows` (strings, numbers, dates), then `tail`'s XML."""

    def cell(value: Any) -> str:
        if isinstance(value, date):
            return f'<table:table-cell office:value-type="date" office:date-value="{value}"><text:p>{value}</text:p></table:table-cell>'
        if isinstance(value, str):
            return f'<table:table-cell office:value-type="string"><text:p>{value}</text:p></table:table-cell>'
        return f'<table:table-cell office:value-type="float" office:value="{value}"><text:p>{value}</text:p></table:table-cell>'

    body = "".join("<table:table-row>" + "".join(map(cell, row)) + "</table:table-row>" for row in rows)
    content = (
        '<?xml version="1.0" encoding="UTF-8"?><office:document-content'
        ' xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"'
        ' xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"'
        ' xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">'
        f'<office:body><office:spreadsheet><table:table table:name="Sheet1">{body}{tail}</table:table>'
        "</office:spreadsheet></office:body></office:document-content>"
    )
    with zipfile.ZipFile(path, "w") as package:
        package.writestr(zipfile.ZipInfo("mimetype"), "application/vnd.oasis.opendocument.spreadsheet")
        package.writestr(
            "META-INF/manifest.xml",
            '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest'
            ' xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
            '<manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>'
            '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/></manifest:manifest>',
        )
        package.writestr("content.xml", content, compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_an_ods_history_is_read_and_one_that_repeats_a_row_millions_of_times_is_refused(tmp_path: Path) -> None:
    """python-calamine reads an .ods whole, writing out each row the file says repeats: a file of
    1 KB asked for 15 million cells and 2 GB of the worker's memory (from a review)."""
    customers = _ods(tmp_path / "c.ods", [list(CUSTOMER_COLUMNS), [7, "Asha", "Iyer", 40, 9000000007, 50000, 1800000]])
    loans = _ods(tmp_path / "l.ods", [list(LOAN_COLUMNS), [7, 50, 10000, 12, 10, 880, 3, date(2025, 1, 5), date(2026, 1, 5)]])
    read_customers, read_loans, issues = read_history(customers, loans)
    assert issues == [] and [(c.customer_id, c.first_name) for c in read_customers] == [(7, "Asha")]
    assert [(ln.loan_id, ln.amount, ln.start_date) for ln in read_loans] == [(50, Decimal(10000), date(2025, 1, 5))]
    repeated = (
        '<table:table-row table:number-rows-repeated="150000">'
        '<table:table-cell table:number-columns-repeated="100" office:value-type="string"><text:p>x</text:p></table:table-cell>'
        "</table:table-row>"
    )
    bomb = _ods(tmp_path / "bomb.ods", [list(CUSTOMER_COLUMNS)], repeated)
    assert bomb.stat().st_size < 2000
    with pytest.raises(UnreadableFile, match=r"bomb\.ods: its sheets span more than 3,000,000 cells"):
        read_history(bomb, loans)
    # Two values 60,000 rows and 1,000 columns apart: calamine builds every empty cell between them.
    apart = (
        '<table:table-row table:number-rows-repeated="60000"><table:table-cell table:number-columns-repeated="1000"/>'
        '</table:table-row><table:table-row><table:table-cell table:number-columns-repeated="999"/>'
        '<table:table-cell office:value-type="string"><text:p>x</text:p></table:table-cell></table:table-row>'
    )
    far = _ods(tmp_path / "far.ods", [list(CUSTOMER_COLUMNS)], apart)
    with pytest.raises(UnreadableFile, match=r"far\.ods: its sheets span more than 3,000,000 cells"):
        read_history(far, loans)


def test_a_zip_that_holds_no_workbook_says_so(tmp_path: Path) -> None:
    """calamine's answer was "File not found '_rels/.rels'" (from a review)."""
    archive = tmp_path / "photos.xlsx"
    with zipfile.ZipFile(archive, "w") as package:
        package.writestr("holiday.txt", "not a workbook")
    with pytest.raises(UnreadableFile, match=r"^photos\.xlsx: not an Excel workbook \(a zip file with no workbook in it\)$"):
        read_history(archive, archive)


def test_an_xlsb_whose_parts_inflate_past_the_limit_is_refused_before_calamine_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xlsx, "LARGEST_XLSB", 100_000)
    binary = tmp_path / "big.xlsb"
    with zipfile.ZipFile(binary, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("xl/workbook.bin", b"\0" * 10)
        package.writestr("xl/worksheets/sheet1.bin", b"\0" * 200_000)
    assert binary.stat().st_size < 2_000
    with pytest.raises(UnreadableFile, match=r"big\.xlsb: its parts inflate to 200,010 bytes, more than the 100,000"):
        read_history(binary, binary)
