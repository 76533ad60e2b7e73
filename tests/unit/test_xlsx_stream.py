"""The streaming .xlsx reader gives what python-calamine gives, row for row and type for type.

python-calamine stays the reference (and the reader of the other formats): every test here reads
the same file both ways and compares.
"""

from __future__ import annotations

import re
import zipfile
from datetime import date, datetime, time, timedelta
from pathlib import Path
from time import monotonic
from typing import Any

import openpyxl
import pytest
from python_calamine import CalamineWorkbook

from infra import xlsx_stream
from infra.xlsx import read_history
from infra.xlsx_stream import NotXlsx, first_sheet_rows
from ledger.history import UnreadableFile

REPO = Path(__file__).resolve().parents[2]


def _trimmed(row: list[Any]) -> list[Any]:
    """calamine pads every row to the sheet's width with "": the same row without the padding."""
    row = [None if value == "" else value for value in row]
    while row and row[-1] is None:
        row.pop()
    return row


def _calamine(path: Path) -> list[list[Any]]:
    rows = [_trimmed(r) for r in CalamineWorkbook.from_path(str(path)).get_sheet_by_index(0).iter_rows()]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def _streamed(path: Path) -> list[list[Any]]:
    rows = [_trimmed(r) for r in first_sheet_rows(str(path))]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def _typed(rows: list[list[Any]]) -> list[list[tuple[type, Any]]]:
    return [[(type(value), value) for value in row] for row in rows]


@pytest.mark.parametrize("name", ["customer_data.xlsx", "loan_data.xlsx"])
def test_the_reference_files_read_as_calamine_reads_them(name: str) -> None:
    path = REPO / "data" / name
    streamed = _streamed(path)
    assert len(streamed) == {"customer_data.xlsx": 301, "loan_data.xlsx": 783}[name]
    assert _typed(streamed) == _typed(_calamine(path))


def _mixed_workbook(path: Path) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Text", "Whole", "Fraction", "Day", "Moment", "Flag", "Empty"])
    sheet.append(["a & b <c>", 7, 0.1, date(2024, 2, 29), datetime(2024, 1, 2, 3, 4, 5), True, None])
    sheet.append(["Ünïcode ✓", -12, 1e-7, date(1900, 3, 1), datetime(2024, 1, 2), False, None])
    sheet.cell(row=3, column=9, value="after a gap")
    sheet.cell(row=6, column=3, value=123456789012)  # rows 4 and 5 left out of the file
    sheet.cell(row=7, column=1, value=time(12, 30))
    sheet.cell(row=7, column=2, value=timedelta(hours=30))
    # Serial numbers under a date or time format: a time of day below 1, the 1900 system's early
    # days (before its phantom 29 February), an elapsed-time format's duration.
    for column, (serial, shown) in enumerate(
        [(0.5, "yyyy-mm-dd"), (0, "hh:mm:ss"), (1.5, "hh:mm"), (59, "yyyy-mm-dd"), (61, "yyyy-mm-dd"), (2.25, "[h]:mm")],
        start=3,
    ):
        sheet.cell(row=7, column=column, value=serial).number_format = shown
    book.save(path)
    return path


def test_every_kind_of_cell_reads_as_calamine_reads_it(tmp_path: Path) -> None:
    path = _mixed_workbook(tmp_path / "mixed.xlsx")
    streamed = _streamed(path)
    assert streamed[1][:6] == ["a & b <c>", 7.0, 0.1, date(2024, 2, 29), datetime(2024, 1, 2, 3, 4, 5), True]
    assert streamed[3] == streamed[4] == []  # rows the file leaves out come out empty, in place
    assert streamed[6] == [
        time(12, 30),
        timedelta(days=1, hours=6),
        time(12),
        time(0),
        datetime(1900, 1, 1, 12),
        date(1900, 2, 28),
        date(1900, 3, 1),
        timedelta(days=2, hours=6),
    ]
    assert _typed(streamed) == _typed(_calamine(path))


def _table(path: Path, rows: int, *, write_only: bool, gap_row: int | None = None) -> Path:
    """A generator's kind of file: a header, then rows of numbers and dates in every column."""
    book = openpyxl.Workbook(write_only=write_only)
    sheet = book.create_sheet() if write_only else book.active
    assert sheet is not None
    sheet.append(["ID", "Amount", "Rate", "Start", "Name"])
    for n in range(1, rows + 1):
        name = f"n{n % 7}"
        row: list[Any] = [n, n * 1000, n % 17 + 0.25, date(2020, 1, 1 + n % 28), name]
        if n == gap_row:
            row[2] = None  # one row with a cell missing: its chunk is read cell by cell
        sheet.append(row)
    book.save(path)
    return path


@pytest.mark.parametrize("write_only", [True, False])
@pytest.mark.parametrize("gap_row", [None, 700])
def test_a_table_read_a_column_at_a_time_matches_calamine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_only: bool, gap_row: int | None
) -> None:
    path = _table(tmp_path / "table.xlsx", 2_000, write_only=write_only, gap_row=gap_row)
    monkeypatch.setattr(xlsx_stream, "CHUNK", 4096)  # many chunks: most of them rows only
    tables = []
    alike = []
    real, real_alike = xlsx_stream._parse_table, xlsx_stream._parse_alike

    def counted(*args: Any) -> Any:
        result = real(*args)
        tables.append(result is not None)
        return result

    def counted_alike(*args: Any) -> Any:
        result = real_alike(*args)
        alike.append(result is not None)
        return result

    monkeypatch.setattr(xlsx_stream, "_parse_table", counted)
    monkeypatch.setattr(xlsx_stream, "_parse_alike", counted_alike)
    streamed = _streamed(path)
    assert len(streamed) == 2_001
    assert _typed(streamed) == _typed(_calamine(path))
    assert sum(tables) > len(tables) // 2  # the fast path read most chunks...
    assert not all(tables)  # ...and handed the header's chunk (and the gap's) to the cell reader
    assert sum(alike) > len(alike) // 2  # most of them with the one-pattern-a-row reader


def test_rows_alike_are_read_with_one_pattern_and_a_row_that_differs_sends_the_chunk_on() -> None:
    row = (
        '<row r="{n}" spans="1:4"><c r="A{n}"><v>{n}</v></c><c r="B{n}" t="s"><v>0</v></c>'
        '<c r="D{n}" t="inlineStr"><is><t>x&amp;{n}</t></is></c></row>'
    )
    text = "".join(row.format(n=n) for n in range(2, 6))
    args = (["shared"], {}, datetime(1899, 12, 30))
    table = xlsx_stream._parse_alike(text, *args)
    assert table is not None and table == xlsx_stream._parse_cells(text, *args)
    assert table.numbers == [2, 3, 4, 5]
    assert [list(column) for column in table.columns] == [
        [2.0, 3.0, 4.0, 5.0],
        ["shared"] * 4,
        [None] * 4,  # the column the rows leave out
        ["x&2", "x&3", "x&4", "x&5"],
    ]
    for differs in (
        text.replace('<c r="A4">', '<c r="A9">'),  # a cell outside its row
        text.replace('<c r="A4">', '<c r="A4" s="3">'),  # another style
        text.replace('<c r="B4" t="s"><v>0</v></c>', ""),  # a cell fewer
        text.replace('<row r="4" spans="1:4">', '<row r="4"/><row r="4" spans="1:4">'),  # an empty row
    ):
        assert xlsx_stream._parse_alike(differs, *args) is None


def test_the_1904_date_system_is_honoured(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    book.epoch = openpyxl.utils.datetime.CALENDAR_MAC_1904
    sheet = book.active
    assert sheet is not None
    sheet.append(["Day"])
    sheet.append([date(2024, 5, 17)])
    path = tmp_path / "mac.xlsx"
    book.save(path)
    assert _streamed(path) == [["Day"], [date(2024, 5, 17)]] == _calamine(path)


def test_a_file_that_is_not_an_xlsx_package_is_left_to_calamine(tmp_path: Path) -> None:
    text = tmp_path / "notes.xlsx"
    text.write_text("Customer ID,Loan ID\n1,2\n")
    other_zip = tmp_path / "other.xlsx"
    with zipfile.ZipFile(other_zip, "w") as package:
        package.writestr("content.xml", "<office:document/>")
    for path in (text, other_zip):
        with pytest.raises(NotXlsx):
            first_sheet_rows(str(path))
        with pytest.raises(UnreadableFile, match="not a readable Excel workbook"):
            read_history(path, path)


def test_a_damaged_sheet_is_an_unreadable_file_not_a_crash(tmp_path: Path) -> None:
    good = _table(tmp_path / "good.xlsx", 50, write_only=True)
    damaged = tmp_path / "damaged.xlsx"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "xl/workbook.xml":
                data = data[: len(data) // 2]  # cut off mid-element
            target.writestr(item, data)
    with pytest.raises(UnreadableFile, match=r"damaged\.xlsx: not a readable Excel workbook"):
        read_history(damaged, damaged)


def test_history_files_read_through_the_stream_give_the_same_records_as_through_calamine(monkeypatch: pytest.MonkeyPatch) -> None:
    customers = REPO / "data" / "customer_data.xlsx"
    loans = REPO / "data" / "loan_data.xlsx"
    streamed = read_history(customers, loans)

    def not_xlsx(path: str, **part: object) -> None:
        raise NotXlsx(path)

    monkeypatch.setattr("infra.xlsx.first_sheet_blocks", not_xlsx)
    assert streamed == read_history(customers, loans)
    assert (len(streamed[0]), len(streamed[1]), streamed[2]) == (300, 782, [])


def _with_sheet_xml(source: Path, target: Path, sheet_data: str) -> Path:
    """`source` with its first sheet's <sheetData> replaced by `sheet_data`."""
    with zipfile.ZipFile(source) as package, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in package.infolist():
            data = package.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                text = data.decode()
                start, end = text.index("<sheetData"), text.index("</sheetData>") + len("</sheetData>")
                data = (text[:start] + f"<sheetData>{sheet_data}</sheetData>" + text[end:]).encode()
            out.writestr(item, data)
    return target


def test_a_sheet_of_unclosed_rows_and_cells_is_read_in_one_pass_not_rescanned_from_each(tmp_path: Path) -> None:
    # 40,000 cells that never close, then 40,000 rows that never close: a pattern that searched for
    # each one's end would rescan the rest of the text from every one of them (billions of steps).
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    crafted = '<row r="1"><c r="A1" t="inlineStr"><is><t>Customer ID</t></is></c></row>'
    crafted += '<row r="2">' + '<c r="A2"><v>1</v>' * 40_000 + "</row>" + '<row r="3">' * 40_000
    path = _with_sheet_xml(source, tmp_path / "crafted.xlsx", crafted)
    began = monotonic()
    rows = _streamed(path)
    assert monotonic() - began < 30  # linear: well under a second; quadratic: hours
    assert rows[0] == ["Customer ID"]


def test_start_tags_that_never_close_are_read_in_one_pass_by_every_reader() -> None:
    # 40,000 row or cell start tags without their '>': a pattern whose attributes ran to the next
    # '>' anywhere rescanned the rest of the chunk from each one (minutes; now milliseconds).
    one_row = '<row r="1"><c r="A1"><v>1</v></c></row>'
    epoch = datetime(1899, 12, 30)
    for text in (one_row + '<row r="2"' * 40_000 + "</row>", '<row r="1">' + '<c r="A1"' * 40_000 + "</row>"):
        began = monotonic()
        xlsx_stream._parse_alike(text, [], {}, epoch)
        xlsx_stream._parse_cells(text, [], {}, epoch)
        list(xlsx_stream._parse(text, 0, [], {}, epoch))
        assert monotonic() - began < 10  # linear: well under a second; quadratic: minutes


def test_a_row_wider_than_the_pattern_reader_takes_goes_to_the_split_reader() -> None:
    width = xlsx_stream.ALIKE_CELLS + 1
    letters = [chr(65 + i // 26) + chr(65 + i % 26) for i in range(width)]  # AA, AB, ...
    text = "".join(f'<row r="{n}">' + "".join(f'<c r="{c}{n}"><v>{n}</v></c>' for c in letters) + "</row>" for n in (2, 3))
    args = ([], {}, datetime(1899, 12, 30))
    assert xlsx_stream._parse_alike(text, *args) is None
    table = xlsx_stream._parse_table(text, *args)
    assert table is not None and table.numbers == [2, 3] and list(table.columns[-1]) == [2.0, 3.0]


def test_a_row_that_never_ends_is_refused_once_it_outgrows_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xlsx_stream, "LONGEST_ROW", 100_000)
    monkeypatch.setattr(xlsx_stream, "CHUNK", 10_000)
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    path = _with_sheet_xml(source, tmp_path / "endless.xlsx", '<row r="1">' + '<c r="A1"><v>1</v></c>' * 20_000)
    with pytest.raises(UnreadableFile, match=r"endless\.xlsx: not a readable Excel workbook \(a row longer than 100,000"):
        read_history(path, path)


def test_a_long_tail_of_empty_formatted_rows_is_read_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Excel writes a formatted, empty row as one self-closed tag: a million of them after the
    data (from a review) never met a `</row>`, and the file was refused as a row too long."""
    monkeypatch.setattr(xlsx_stream, "LONGEST_ROW", 100_000)
    monkeypatch.setattr(xlsx_stream, "CHUNK", 10_000)
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    data = '<row r="1"><c r="A1" t="inlineStr"><is><t>ID</t></is></c></row><row r="2"><c r="A2"><v>7</v></c></row>'
    tail = "".join(f'<row r="{n}" spans="1:7" s="1" customFormat="1" ht="15.75" customHeight="1"/>' for n in range(3, 5003))
    assert len(tail) > 3 * xlsx_stream.LONGEST_ROW
    path = _with_sheet_xml(source, tmp_path / "tail.xlsx", data + tail + '<row r="5003"><c r="A5003"><v>8</v></c></row>')
    rows = list(xlsx_stream.first_sheet_rows(str(path)))
    assert rows[0] == ["ID"] and rows[1] == [7] and rows[-1] == [8] and len(rows) == 5003
    assert all(row == [] for row in rows[2:-1])


@pytest.mark.parametrize("part", ["xl/styles.xml", "xl/workbook.xml", "xl/sharedStrings.xml"])
def test_a_part_read_whole_that_would_inflate_past_its_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """A file of 1 MB whose styles inflated to 1 GB took 2 GB of the worker's memory (from a review)."""
    monkeypatch.setattr(xlsx_stream, "LARGEST_PART", 100_000)
    monkeypatch.setattr(xlsx_stream, "LARGEST_SHARED_STRINGS", 100_000)
    source = _table(tmp_path / "source.xlsx", 3, write_only=False)
    with zipfile.ZipFile(source) as package:
        xml = package.read(part).decode() if part in package.namelist() else '<sst xmlns="x"></sst>'
    padded = xml.replace("?>", "?>" + " " * 200_000, 1) if xml.startswith("<?xml") else xml + " " * 200_000
    bomb = _replaced(source, tmp_path / "bomb.xlsx", {part: padded})
    assert bomb.stat().st_size < 20_000
    with pytest.raises(
        UnreadableFile, match=rf"bomb\.xlsx: not a readable Excel workbook \(its {part} would inflate to 2\d\d,\d\d\d bytes"
    ):
        read_history(bomb, bomb)


def _replaced(source: Path, target: Path, parts: dict[str, str]) -> Path:
    """`source` with the named parts' XML replaced."""
    with zipfile.ZipFile(source) as package, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in package.infolist():
            data = parts[item.filename].encode() if item.filename in parts else package.read(item.filename)
            out.writestr(item, data)
        for name in parts.keys() - set(package.namelist()):
            out.writestr(name, parts[name])
    return target


@pytest.mark.parametrize("inside_a_row", [False, True])
def test_a_sheet_cut_short_is_unreadable_not_read_in_part(tmp_path: Path, inside_a_row: bool) -> None:
    good = _table(tmp_path / "good.xlsx", 200, write_only=True)
    with zipfile.ZipFile(good) as package:
        sheet = package.read("xl/worksheets/sheet1.xml").decode()
    at = sheet.index('<row r="101"') + (30 if inside_a_row else 0)
    cut = _replaced(good, tmp_path / "cut.xlsx", {"xl/worksheets/sheet1.xml": sheet[:at]})
    with pytest.raises(ValueError, match="cut short"):
        _streamed(cut)
    empty = _replaced(
        good,
        tmp_path / "empty.xlsx",
        {"xl/worksheets/sheet1.xml": sheet[: sheet.index("<sheetData")] + "<sheetData/></worksheet>"},
    )
    assert _streamed(empty) == []  # a sheet with no rows is not a sheet cut short


def test_a_string_cell_with_no_value_is_empty_as_calamine_reads_it(tmp_path: Path) -> None:
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    header = '<row r="1"><c r="A1" t="inlineStr"><is><t>ID</t></is></c><c r="B1" t="inlineStr"><is><t>Notes</t></is></c></row>'
    alike = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c><c r="B{n}" t="s"/></row>' for n in range(2, 60))
    for name, rows in (("alike.xlsx", alike), ("one.xlsx", '<row r="2"><c r="A2"><v>2</v></c><c r="B2" t="s"/></row>')):
        path = _with_sheet_xml(source, tmp_path / name, header + rows)
        streamed = _streamed(path)
        assert streamed[1] == [2.0] and _typed(streamed) == _typed(_calamine(path))


def test_excel_escapes_in_shared_strings_are_decoded_as_calamine_decodes_them(tmp_path: Path) -> None:
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    strings = (
        '<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="3" uniqueCount="3">'
        "<si><t>Garcia_x000D_</t></si><si><t>A_x005F_x0041_B</t></si><si><t>plain_x_</t></si></sst>"
    )
    rows = '<row r="1">' + "".join(f'<c r="{c}1" t="s"><v>{i}</v></c>' for i, c in enumerate("ABC")) + "</row>"
    path = _with_sheet_xml(source, tmp_path / "escaped.xlsx", rows)
    path = _replaced(path, tmp_path / "escaped2.xlsx", {"xl/sharedStrings.xml": strings})
    assert _streamed(path) == [["Garcia\r", "A_x0041_B", "plain_x_"]] == _calamine(path)


def _strict(source: Path, target: Path) -> Path:
    """`source` saved as Excel's "Strict Open XML Spreadsheet" names its parts' elements."""
    with zipfile.ZipFile(source) as package, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in package.infolist():
            text = package.read(item.filename).decode()
            text = text.replace(
                "http://schemas.openxmlformats.org/spreadsheetml/2006/main", "http://purl.oclc.org/ooxml/spreadsheetml/main"
            )
            text = text.replace(
                "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
                "http://purl.oclc.org/ooxml/officeDocument/relationships",
            )
            out.writestr(item, text)
    return target


def test_a_strict_open_xml_workbook_is_streamed_with_its_strings_dates_and_percentages(tmp_path: Path) -> None:
    """Its workbook, shared strings and styles name their elements in Strict's namespace: read by
    those names, its sheet reads as the same workbook saved the usual way, a rate shown as a
    percentage included (calamine, which reads no formats, would give its fraction)."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Name", "Start", "Rate"])
    for n in range(1, 4):
        sheet.append([f"name {n}", date(2020, 1, n), n / 100])
        sheet.cell(row=n + 1, column=3).number_format = "0.00%"
    book.save(tmp_path / "usual.xlsx")
    strict = _strict(tmp_path / "usual.xlsx", tmp_path / "strict.xlsx")
    with zipfile.ZipFile(strict) as package:
        assert "purl.oclc.org/ooxml/spreadsheetml/main" in package.read("xl/styles.xml").decode()
        sheet_xml = package.read("xl/worksheets/sheet1.xml").decode()
    # Excel's Strict files write a date as ISO text in a `t="d"` cell, not as a serial number
    sheet_xml, dated = re.subn(
        r'<c r="B4"( s="\d+")?(?: t="n")?><v>[^<]*</v></c>', r'<c r="B4"\1 t="d"><v>2020-01-03T00:00:00</v></c>', sheet_xml
    )
    assert dated == 1
    strict = _replaced(strict, tmp_path / "strict_d.xlsx", {"xl/worksheets/sheet1.xml": sheet_xml})
    streamed = _streamed(strict)
    assert _typed(streamed) == _typed(_streamed(tmp_path / "usual.xlsx"))
    assert streamed[1] == ["name 1", date(2020, 1, 1), xlsx_stream.Percent(0.01)]
    assert type(streamed[1][2]) is xlsx_stream.Percent
    assert streamed[1:3] == _calamine(strict)[1:3]  # the same values as calamine reads, the percentage marked
    # (calamine gives the `t="d"` cell's midnight as a datetime, this reader as a date, as it gives a serial date)


def test_a_strict_open_xml_history_imports_as_the_same_files_saved_the_usual_way(tmp_path: Path) -> None:
    """The reference files (their names in shared strings) saved as Strict Open XML."""
    customers, loans = REPO / "data" / "customer_data.xlsx", REPO / "data" / "loan_data.xlsx"
    with zipfile.ZipFile(_strict(customers, tmp_path / "c.xlsx")) as package:
        assert "purl.oclc.org/ooxml/spreadsheetml/main" in package.read("xl/sharedStrings.xml").decode()
    strict = read_history(_strict(customers, tmp_path / "c.xlsx"), _strict(loans, tmp_path / "l.xlsx"))
    assert strict == read_history(customers, loans)
    assert (len(strict[0]), len(strict[1]), strict[2]) == (300, 782, [])


def test_a_cell_written_after_one_to_its_right_is_read_in_its_own_column(tmp_path: Path) -> None:
    """Excel writes a row's cells left to right; other writers need not. Each cell goes in the
    column its reference names, as calamine places it, not after the cells read before it."""
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    rows = (
        '<row r="1"><c r="A1"><v>1</v></c><c r="B1"><v>2</v></c><c r="C1"><v>3</v></c><c r="D1"><v>4</v></c></row>'
        '<row r="2"><c r="C2"><v>30</v></c><c r="A2"><v>10</v></c><c r="D2"><v>40</v></c><c r="B2"><v>20</v></c></row>'
        '<row r="3"><c r="D3"><v>400</v></c><c r="B3" t="inlineStr"><is><t>b</t></is></c></row>'
        '<row r="4"><c r="A4"><v>7</v></c><c r="B4"><v>8</v></c><c r="A4"/></row>'  # an empty cell again: it holds 7
    )
    path = _with_sheet_xml(source, tmp_path / "unordered.xlsx", rows)
    assert _streamed(path) == [[1, 2, 3, 4], [10, 20, 30, 40], [None, "b", None, 400], [7, 8]] == _calamine(path)


def test_odd_but_readable_sheets_are_read_as_calamine_reads_them(tmp_path: Path) -> None:
    source = _table(tmp_path / "source.xlsx", 3, write_only=True)
    with zipfile.ZipFile(source) as package:
        sheet = package.read("xl/worksheets/sheet1.xml").decode()
    spaced = _replaced(
        source, tmp_path / "spaced.xlsx", {"xl/worksheets/sheet1.xml": sheet.replace("</sheetData>", "</sheetData >")}
    )
    assert _streamed(spaced) == _streamed(source) != []
    bare = sheet[: sheet.index("<sheetData")] + "</worksheet>"  # a worksheet with no sheetData at all: empty
    assert _streamed(_replaced(source, tmp_path / "bare.xlsx", {"xl/worksheets/sheet1.xml": bare})) == []
    epoch = datetime(1899, 12, 30)
    assert xlsx_stream._value("s", "", "<v></v>", ["a"], {}, epoch) is None  # an empty string cell, read cell by cell
    assert xlsx_stream._unescape_excel("Ab_xD800_c_x0041_") == "Ab_xD800_cA"  # half a surrogate pair stays as written


def _odd_forms(sheet: str) -> dict[str, str]:
    """The sheet's rows written in other forms XML allows, each the same cells to a reader."""
    start, end = sheet.index("<sheetData>"), sheet.index("</sheetData>")
    rows = sheet[start:end]
    middle = rows.index('<row r="50"')
    row_end = rows.index("</row>", middle)
    return {
        "single quotes": rows.replace('"', "'"),
        "spaces around =": re.sub(r'(\w)="', r'\1 = "', rows),
        "a newline or a tab after the name": rows.replace("<c ", "<c\n").replace(' t="', '\tt="').replace("<row ", "<row\r\n"),
        "spaces before an end tag's '>'": rows.replace("</c>", "</c >").replace("</row>", "</row\n>").replace("</t>", "</t >"),
        "a value's tag with a space": rows.replace("<v>", "<v >").replace("</v>", "</v >"),
        "text in CDATA sections": re.sub(r"<t>([^<]*)</", r"<t><![CDATA[\1]]></", rows),
        # calamine reads a value in a CDATA section as empty: compared with the plain sheet only
        "values in CDATA sections": re.sub(r"<v>([^<]*)</", r"<v><![CDATA[\1]]></", rows),
        # one cell of one row among plain rows: the faster readers must not read the chunk without it
        "one cell with a newline after its name": rows[:middle] + rows[middle:row_end].replace("<c ", "<c\n", 1) + rows[row_end:],
    }


def test_rows_and_cells_in_every_form_xml_allows_read_as_calamine_reads_them(tmp_path: Path) -> None:
    # Attributes in single quotes or with spaces around "=", other whitespace after a tag's name,
    # spaces before an end tag's ">", and CDATA sections are XML as valid as Excel's own. They used to read as
    # nothing (the whole sheet, or a cell), or a row's strings as empty and its number as the row
    # after the one before.
    source = _table(tmp_path / "source.xlsx", 99, write_only=True)
    with zipfile.ZipFile(source) as package:
        sheet = package.read("xl/worksheets/sheet1.xml").decode()
    expected = _streamed(source)
    assert len(expected) == 100 and expected[49][3] == date(2020, 1, 1 + 49 % 28)
    for form, rows in _odd_forms(sheet).items():
        odd = sheet[: sheet.index("<sheetData>")] + rows + sheet[sheet.index("</sheetData>") :]
        path = _replaced(source, tmp_path / "odd.xlsx", {"xl/worksheets/sheet1.xml": odd})
        streamed = _streamed(path)
        assert _typed(streamed) == _typed(expected), form
        if form != "values in CDATA sections":
            assert _typed(streamed) == _typed(_calamine(path)), form


def test_a_phonetic_run_in_an_inline_string_is_not_part_of_the_text(tmp_path: Path) -> None:
    # A Japanese name's reading (<rPh>) is shown above it in Excel; it is not in the cell's text,
    # as it is not in a shared string's (see _shared_strings).
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    rows = (
        '<row r="1"><c r="A1" t="inlineStr"><is><r><t>山田</t></r><rPh sb="0" eb="2"><t>ヤマダ</t></rPh>'
        '<phoneticPr fontId="1"/></is></c><c r="B1" t="inlineStr"><is><t>太郎</t><rPh sb="0" eb="2"><t>タロウ</t></rPh></is></c>'
        "</row>"
    )
    path = _with_sheet_xml(source, tmp_path / "phonetic.xlsx", rows)
    assert _streamed(path) == [["山田", "太郎"]] == _calamine(path)
    # 40,000 phonetic runs that never close: each is looked at up to the next, not to the cell's end
    unclosed = "<is><t>Ann</t>" + "<rPh><t>A</t>" * 40_000 + "</is>"
    began = monotonic()
    text = xlsx_stream._value("inlineStr", "", unclosed, [], {}, datetime(1899, 12, 30))
    assert monotonic() - began < 10  # linear: milliseconds; quadratic: minutes
    assert text.startswith("AnnA")  # an unclosed run is not a run: its text stays, as the cell holds it


@pytest.mark.parametrize("form", ["as written", "single quotes", "read a column at a time"])
def test_a_number_shown_as_a_percentage_is_a_percent_of_the_number_calamine_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # calamine does not read formats: the value is the same float, marked as shown as a percentage
    # "%" in quotes or escaped is text; a code shows its first section for positive numbers
    formats = ["0%", "0.00%", "0.000%", "[Red]0.00%;-0.00%", '0.00"%"', "0.00\\%", "General", "0.00;-0.00%", '0.00"%";0.00%']
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Rate"] * len(formats))
    for n in range(1, 301):
        for column, shown in enumerate(formats, start=1):
            sheet.cell(row=n + 1, column=column, value=n / 1000).number_format = shown
    path = tmp_path / "rates.xlsx"
    book.save(path)
    if form == "single quotes":
        with zipfile.ZipFile(path) as package:
            xml = package.read("xl/worksheets/sheet1.xml").decode()
        start, end = xml.index("<sheetData>"), xml.index("</sheetData>")
        xml = xml[:start] + xml[start:end].replace('"', "'") + xml[end:]
        path = _replaced(path, tmp_path / "quoted.xlsx", {"xl/worksheets/sheet1.xml": xml})
    if form == "read a column at a time":
        monkeypatch.setattr(xlsx_stream, "CHUNK", 4096)
        assert any(type(block) is xlsx_stream.Table for block in xlsx_stream.first_sheet_blocks(str(path)))
    streamed = _streamed(path)
    assert streamed[1:] == _calamine(path)[1:]  # the same numbers
    percent = [True, True, True, True, False, False, False, False, False]
    for row in streamed[1:]:
        assert [type(value) is xlsx_stream.Percent for value in row] == percent
        assert all(type(value) in (float, xlsx_stream.Percent) for value in row)


def test_cells_with_a_namespace_prefix_and_a_newline_after_it_read_as_calamine_reads_them(tmp_path: Path) -> None:
    source = _table(tmp_path / "source.xlsx", 3, write_only=True)
    with zipfile.ZipFile(source) as package:
        sheet = package.read("xl/worksheets/sheet1.xml").decode()
    start, end = sheet.index("<sheetData>"), sheet.index("</sheetData>")
    rows = sheet[start:end].replace("<c ", "<x:c\n").replace("</c>", "</x:c>")
    head = sheet[:start].replace(
        "<worksheet ", '<worksheet xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main" ', 1
    )
    path = _replaced(source, tmp_path / "prefixed.xlsx", {"xl/worksheets/sheet1.xml": head + rows + sheet[end:]})
    assert _typed(_streamed(path)) == _typed(_streamed(source)) == _typed(_calamine(path))


@pytest.mark.parametrize("section", ["<![CDATA[a</row>b]]>", "<![CDATA[never closed"])
def test_a_cdata_section_holding_markup_or_never_closed_is_refused_not_misread(tmp_path: Path, section: str) -> None:
    # "</row>" in a CDATA section is text, which the patterns would take for the row's end (a
    # row read as empty); an unclosed one would be looked for from every start again.
    source = _table(tmp_path / "source.xlsx", 1, write_only=True)
    cells = f'<row r="1"><c r="A1" t="inlineStr"><is><t>{section}</t></is></c></row><row r="2"><c r="A2"><v>2</v></c></row>'
    path = _with_sheet_xml(source, tmp_path / "cdata.xlsx", cells)
    with pytest.raises(ValueError, match="CDATA"):
        _streamed(path)
    crafted = '<row r="1"><c r="A1" t="inlineStr"><is>' + "<t><![CDATA[x" * 40_000 + "</is></c></row>"
    began = monotonic()
    with pytest.raises(ValueError, match="CDATA"):
        list(xlsx_stream._parse(crafted, 0, [], {}, datetime(1899, 12, 30)))
    assert monotonic() - began < 10  # linear: milliseconds; quadratic: minutes
