"""Reads the lender's Excel files: .xlsx streamed by infra.xlsx_stream, other formats by python-calamine."""

from __future__ import annotations

import logging
import operator
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar, cast
from xml.parsers import expat

from python_calamine import CalamineWorkbook

from infra.xlsx_split import SheetHelper, worth_splitting
from infra.xlsx_stream import (
    Block,
    Cut,
    NotXlsx,
    Table,
    UncleanCut,
    first_sheet_blocks,
    first_sheet_rows,
    forget_cached_dates,
    sheet_rows,
    sheets,
)
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

log = logging.getLogger(__name__)

FLUSH_RECORDS = 20_000


def _rows(path: Path, start: Cut | None = None, stop: Cut | None = None) -> Rows:
    """The first sheet's rows from row 1, as Python values: streamed for .xlsx (with runs of
    rows as Tables, read a column at a time), read whole by calamine for the other formats it
    knows (.xls, .xlsb, .ods). `start` and `stop` read a part of an .xlsx sheet (see
    `first_sheet_blocks`). The path is a regular file (`read_history` checked it)."""
    try:
        return _converted(path, first_sheet_blocks(str(path), start=start, stop=stop))
    except NotXlsx:
        pass
    except Exception as error:
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None
    try:
        _within_calamine_reach(path)
        workbook = CalamineWorkbook.from_path(str(path))
        if not workbook.sheet_names:
            raise UnreadableFile(f"{path.name}: the workbook has no sheets")
        # Row by row: the cells become Python objects one row at a time, not all at once.
        return _converted(path, workbook.get_sheet_by_index(0).iter_rows())
    except UnreadableFile:
        raise
    except Exception as error:  # calamine raises its own error types for every malformed file
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None


# Cells python-calamine may build for an .ods file, which it reads whole, with rows and cells that
# the file says repeat N times written out N times, empty ones too where values lie beyond them: a
# file of 1 KB asked for 15 million cells and took 2 GB of the worker's memory, one of two values
# 60,000 rows and 1,000 columns apart 3.7 GB (from reviews).
# Three million cells are about 330,000 loans' rows; a bigger sheet is read as .xlsx, streamed.
LARGEST_ODS_CELLS = 3_000_000
LARGEST_XLSB = 256 << 20  # bytes an .xlsb's parts may inflate to (calamine reads them whole)
_ODS_TABLE = "urn:oasis:names:tc:opendocument:xmlns:table:1.0"
_ODS_OFFICE = "urn:oasis:names:tc:opendocument:xmlns:office:1.0"
_ODS_CELLS = (f"{_ODS_TABLE} table-cell", f"{_ODS_TABLE} covered-table-cell")


def _within_calamine_reach(path: Path) -> None:
    """Refuse an .ods file whose sheets span more than LARGEST_ODS_CELLS cells (`_SheetArea`); an .xlsb whose
    parts inflate past LARGEST_XLSB; a zip file that is neither (calamine only said "File not
    found '_rels/.rels'")."""
    try:
        package = zipfile.ZipFile(path)
    except zipfile.BadZipFile:  # not an .ods (an .xls): calamine says what it is
        return
    with package:
        names = package.namelist()
        if "xl/workbook.bin" in names:  # .xlsb: its parts inflate to what calamine holds
            inflated = sum(item.file_size for item in package.infolist())
            if inflated > LARGEST_XLSB:
                raise UnreadableFile(
                    f"{path.name}: its parts inflate to {inflated:,} bytes, more than the {LARGEST_XLSB:,} this"
                    " reader holds: save it as .xlsx, which is read as a stream"
                )
            return
        if "content.xml" not in names:
            if "_rels/.rels" not in names:  # with it, an OOXML package whose workbook calamine may find
                raise UnreadableFile(f"{path.name}: not an Excel workbook (a zip file with no workbook in it)")
            return
        _SheetArea(path.name).count(package)


class _SheetArea:
    """The cells calamine builds for an .ods file's sheets: for each sheet, the rectangle from its
    first cell with a value to its last (empty cells inside it are built too), counting the rows
    and cells the file says repeat. Counted from content.xml as a stream (expat: no tree)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = 0  # the sheets before this one
        self.row = self.column = 0  # where the next row, and the next cell of this row, start
        self.repeats = 1  # how many times this row repeats
        self.bounds: list[int] | None = None  # this sheet's first row, last row, first column, last column
        self.row_columns: tuple[int, int] | None = None  # this row's first and last column with a value

    def count(self, package: zipfile.ZipFile) -> None:
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        with package.open("content.xml") as stream:
            parser.ParseFile(stream)

    def start(self, name: str, attributes: dict[str, str]) -> None:
        if name == f"{_ODS_TABLE} table":
            self.row, self.bounds = 0, None
        elif name == f"{_ODS_TABLE} table-row":
            self.repeats = int(attributes.get(f"{_ODS_TABLE} number-rows-repeated", "1"))
            self.column, self.row_columns = 0, None
        elif name in _ODS_CELLS:
            span = int(attributes.get(f"{_ODS_TABLE} number-columns-repeated", "1"))
            if f"{_ODS_OFFICE} value-type" in attributes:
                first = self.column if self.row_columns is None else self.row_columns[0]
                self.row_columns = (first, self.column + span - 1)
            self.column += span

    def end(self, name: str) -> None:
        if name == f"{_ODS_TABLE} table-row":
            if self.row_columns is not None:
                first_column, last_column = self.row_columns
                last_row = self.row + self.repeats - 1
                if self.bounds is None:
                    self.bounds = [self.row, last_row, first_column, last_column]
                else:
                    self.bounds[1] = last_row
                    self.bounds[2] = min(self.bounds[2], first_column)
                    self.bounds[3] = max(self.bounds[3], last_column)
            self.row += self.repeats
            if self.done + self.area() > LARGEST_ODS_CELLS:
                raise UnreadableFile(
                    f"{self.name}: its sheets span more than {LARGEST_ODS_CELLS:,} cells, counting the rows and"
                    " cells it says repeat, more than this reader holds: save it as .xlsx, which is read as a stream"
                )
        elif name == f"{_ODS_TABLE} table":
            self.done += self.area()

    def area(self) -> int:
        if self.bounds is None:
            return 0
        first_row, last_row, first_column, last_column = self.bounds
        return (last_row - first_row + 1) * (last_column - first_column + 1)


def _a_file(path: Path) -> None:
    """Refuse a name that is not a regular file before anything opens it: opening a named pipe
    waits for a writer (a file swapped for one after its import was queued held the worker)."""
    if not path.is_file():
        what = "not a file (a directory, a pipe or a device)" if path.exists() else "no such file"
        raise UnreadableFile(f"{path.name}: {what}")


def _converted(path: Path, rows: Rows) -> Rows:
    """The rows, with a cell that cannot be converted reported as an unreadable file."""
    try:
        yield from rows
    except UncleanCut:
        raise
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
    records, issues, _ = _read_part(path, label, columns, parse, parse_columns)
    return records, issues


def _read_part(
    path: Path,
    label: str,
    columns: tuple[str, ...],
    parse: Callable[[str, int, dict[str, object]], Record | RowIssue],
    parse_columns: Callable[[list[int], dict[str, Sequence[object]]], list[Record] | None],
    *,
    start: Cut | None = None,
    positions: list[int] | None = None,
    stop: Cut | None = None,
    flush: Callable[[list[Record]], object] | None = None,
) -> tuple[list[Record], list[RowIssue], list[int]]:
    """The sheet's records and issues, and where its header put the columns. A part of the
    sheet: from the cut `start` (given the header's `positions`) or up to the cut `stop`.
    `flush` takes the records every FLUSH_RECORDS or so, instead of returning them."""
    records: list[Record] = []
    issues: list[RowIssue] = []
    pick: Callable[[list[Any]], tuple[Any, ...]] | None = None
    width = 0
    number = 0
    if positions is not None:
        pick = operator.itemgetter(*positions)
        width = max(positions) + 1
    else:
        positions = []
    if start is not None:
        number = start.row - 1
    for block in _rows(path, start, stop):
        if flush is not None and len(records) >= FLUSH_RECORDS:
            flush(records)
            records = []
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
    return records, issues, positions


HEADER_SEARCH_ROWS = 50  # rows of another sheet looked through for a header like the file's


def check_sheets(path: Path, columns: tuple[str, ...]) -> None:
    """The rows are read from the first sheet (.xlsx): refuse a workbook whose first sheet is hidden,
    or whose other sheets hold rows of the same kind (a header with every one of `columns`), rather
    than import rows the lender does not see, or leave rows out without a word. Other sheets
    (notes, a summary) are left alone. Nothing to say about a file that is missing or is not an
    .xlsx package: the reader says that."""
    if not path.is_file():
        return
    try:
        found = sheets(str(path))
    except NotXlsx:
        return
    except Exception as error:
        raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None
    if found and found[0].state != "visible":
        raise UnreadableFile(
            f"{path.name}: its first sheet, {found[0].name!r}, is hidden, and the rows are read from the first"
            " sheet: move the sheet that holds them first, or delete the hidden one"
        )
    for index, sheet in enumerate(found[1:], start=1):
        try:
            rows = [row for row in islice(sheet_rows(str(path), index), HEADER_SEARCH_ROWS) if not _blank(row)]
        except Exception as error:
            raise UnreadableFile(f"{path.name}: not a readable Excel workbook ({error})") from None
        if any(_has_columns(path.name, row, columns) for row in rows):  # a title row or two may come first
            raise UnreadableFile(
                f"{path.name}: sheet {sheet.name!r} also has this file's columns, and only the first sheet"
                f" ({found[0].name!r}) is read: put every row in the first sheet, or delete the other"
            )


def _has_columns(name: str, row: list[Any], columns: tuple[str, ...]) -> bool:
    try:
        check_header(name, list(row), columns)
    except UnreadableFile:
        return False
    return True


def header_of(path: Path, columns: tuple[str, ...]) -> tuple[int, list[int]]:
    """The header's row number (the first row that is not blank) and its columns' positions."""
    for number, row in enumerate(first_sheet_rows(str(path)), start=1):
        if not _blank(row):
            return number, list(check_header(path.name, list(row), columns).values())
    raise UnreadableFile(f"{path.name}: the first sheet is empty")


# What the helper reads, by the name it is given: the columns, the parsers, the record and the
# fields whose repeated values the parsers share (one object a distinct value).
KINDS: dict[str, tuple[tuple[str, ...], Callable[..., Any], Callable[..., Any], type[Any], frozenset[str]]] = {
    "loans": (
        LOAN_COLUMNS,
        parse_loan,
        parse_loan_columns,
        LoanRecord,
        frozenset({"customer_id", "amount", "interest_rate", "monthly_payment", "start_date", "end_date"}),
    ),
}


def _read_halves(path: Path, kind: str, helper: SheetHelper) -> tuple[list[Any], list[RowIssue]]:
    """The sheet read in two halves, the second by `helper` (see infra.xlsx_split); read whole
    by this process wherever the halves would not add up to exactly what one reader gives."""
    columns, parse, parse_columns, record_type, _ = KINDS[kind]

    def whole() -> tuple[list[Any], list[RowIssue]]:
        helper.close()
        return _read(path, path.name, columns, parse, parse_columns)

    plan = helper.plan()
    if plan is None:
        return whole()
    cut, positions = plan
    log.info("%s: a helper process reads the rows from row %d on", path.name, cut.row)
    try:
        started = time.monotonic()
        records, issues, header = _read_part(path, path.name, columns, parse, parse_columns, stop=cut)
        rest = helper.rest(record_type, path.name, time.monotonic() - started) if header == positions else None
        if not helper.same_file():
            log.warning("%s changed while it was read: reading it whole", path.name)
            return whole()
        if rest is None:
            helper.close()
            rest = _read_part(path, path.name, columns, parse, parse_columns, start=cut, positions=header)[:2]
    except UncleanCut as unclean:
        log.info("%s: %s; reading it whole", path.name, unclean)
        return whole()
    except UnreadableFile:  # said as one reader says it (a decoding error counts from where a read starts)
        return whole()
    records.extend(rest[0])
    issues.extend(rest[1])
    return records, issues


def _helper(loans_path: Path, split_size: int | None) -> SheetHelper | None:
    if not worth_splitting(loans_path, split_size):
        return None
    try:
        return SheetHelper(loans_path, "loans")
    except OSError as error:  # no process to be had: one reader does it all, as on one core
        log.warning("%s: no helper process to read half of it (%s); reading it whole", loans_path.name, error)
        return None


def read_history(
    customers_path: Path, loans_path: Path, *, split_size: int | None = None
) -> tuple[list[CustomerRecord], list[LoanRecord], list[RowIssue]]:
    """Both files, fully read and checked before anything is written; unreadable files raise.
    A loan sheet of `split_size` bytes of XML or more (None: infra.xlsx_split's SPLIT_SIZE) is
    read in two processes; the helper starts first, so that it reaches the sheet's middle while
    this process reads the customers."""
    _a_file(customers_path)
    _a_file(loans_path)
    check_sheets(customers_path, CUSTOMER_COLUMNS)
    check_sheets(loans_path, LOAN_COLUMNS)
    helper = _helper(loans_path, split_size)
    try:
        customers, customer_issues = _read(
            customers_path, customers_path.name, CUSTOMER_COLUMNS, parse_customer, parse_customer_columns
        )
        if helper is None:
            loans, loan_issues = _read(loans_path, loans_path.name, LOAN_COLUMNS, parse_loan, parse_loan_columns)
        else:
            loans, loan_issues = _read_halves(loans_path, "loans", helper)
    finally:
        if helper is not None:
            helper.close()
        forget_shared_values()
        forget_cached_dates()
    return customers, loans, customer_issues + loan_issues
