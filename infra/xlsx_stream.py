"""Streams the first sheet of an .xlsx workbook row by row, in constant memory.

python-calamine reads a whole sheet into memory before the first row comes out: about 620 MB at
its peak for a million-loan file (a sparse list of cells, then the dense grid, both at once). This reader decompresses the sheet's XML in
chunks and picks the cells out with regular expressions (the C engine does the scanning), so
only the rows being read are in memory. It yields what calamine yields, the same Python types
for the same cells: a number is a float, a date-formatted number a date (a datetime when it has
a time of day), a shared or inline string a str, a boolean a bool, an error its text ("#N/A").
One difference: a percentage-formatted number is a `ledger.history.Percent`, a float that
calamine cannot tell apart (it does not read formats), so that a rate reads as the sheet shows it.
"""

from __future__ import annotations

import posixpath
import re
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from html import unescape
from typing import IO, Any, NamedTuple
from xml.etree import ElementTree

from ledger.history import Percent

CHUNK = 1 << 20  # decompressed characters read at a time
LONGEST_ROW = 32 << 20  # characters: a sheet with a longer row is refused, not held whole
# Bytes the parts read whole may inflate to (the workbook, its relationships, the styles: a few KB
# in the files seen; the shared strings, streamed but kept, about 7 MB for 100,000 customers' names).
# A file of 1 MB whose styles inflated to 1 GB took 2 GB of the worker's memory (from a review).
LARGEST_PART = 16 << 20
LARGEST_SHARED_STRINGS = 256 << 20

_NS = r"(?:[\w.-]+:)?"  # SpreadsheetML written with a namespace prefix (<x:row>) reads the same
# The general patterns below never backtrack across an element's end: a row's (or a cell's)
# content is taken possessively up to the next row (cell) tag, so a crafted sheet full of unclosed
# rows or cells is read in linear time instead of scanning to the end again from each one.
_ROW = re.compile(rf"<{_NS}row\b([^<>]*?)(?:/>|>((?:[^<]++|<(?!/?{_NS}row\b))*+)</{_NS}row\s*+>)")
# XML lets an attribute's value be in single quotes, with spaces around its "=": rows and cells
# written so are read by `_parse`, whose patterns these are. The faster readers take `r="..."`
# only; they find fewer cells than the chunk's "<c " then, and send it on to `_parse`.
_ROW_NUMBER = re.compile(r"""\sr\s*+=\s*+(["'])(\d+)\1""")
# A cell: its reference when it comes first (as every writer seen puts it), its other attributes
# (few distinct strings in a sheet, so what they say is worked out once each), its content.
_CELL = re.compile(rf'<{_NS}c(?: r="([A-Z]+)\d+")?([^<>]*?)(?:/>|>((?:[^<]++|<(?!/?{_NS}c\b))*+)</{_NS}c\s*+>)')
_ATTRIBUTE = re.compile(r"""\s([rst])\s*+=\s*+(?:"([^"]*)"|'([^']*)')""")
# An element's characters: text (XML escapes its "<"), and CDATA sections, whose text is as written.
_CDATA = re.compile(r"<!\[CDATA\[((?:[^\]]++|\](?!\]>))*+)\]\]>")
_CHARACTERS = r"((?:[^<]++|<!\[CDATA\[(?:[^\]]++|\](?!\]>))*+\]\]>)*+)"
_VALUE = re.compile(rf"<{_NS}v\b[^<>]*+>{_CHARACTERS}</{_NS}v\s*+>")
_TEXT = re.compile(rf"<{_NS}t\b[^<>]*+>{_CHARACTERS}</{_NS}t\s*+>")
# A phonetic run (<rPh>, the reading of East Asian text) is a hint shown above the text, not part
# of it. Taken possessively up to its end or the next <rPh>, so unclosed ones are read in linear time.
_PHONETIC = re.compile(rf"<{_NS}rPh\b(?:[^<]++|<(?!/?{_NS}rPh\b))*+</{_NS}rPh\s*+>")
_ROW_END = re.compile(rf"</{_NS}row\s*+>")
_ROW_SELF_CLOSED = re.compile(rf"<{_NS}row\b[^<>]*/>")  # an empty row: Excel writes formatted ones so
_SHEET_DATA_END = re.compile(rf"</{_NS}sheetData\s*>|<{_NS}sheetData\s*/>")  # or a sheet with no rows at all
_SHEET_DATA_START = re.compile(rf"<{_NS}sheetData\b")

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
# Excel's "Strict Open XML Spreadsheet" names the same elements in other namespaces. The sheet's
# XML is read without regard to namespaces; the workbook, shared strings and styles by these.
_STRICT = "{http://purl.oclc.org/ooxml/spreadsheetml/main}"
_REL_IDS = (
    "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id",
    "{http://purl.oclc.org/ooxml/officeDocument/relationships}id",
)
_PKG_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}"
# Built-in number formats that show a date or time (ECMA-376 part 1, 18.8.30).
_DATE_FORMAT_IDS = {*range(14, 23), *range(27, 37), *range(45, 48), *range(50, 59)}
_ELAPSED_FORMAT_ID = 46  # [h]:mm:ss
_PERCENT_FORMAT_IDS = {9, 10}  # 0% and 0.00%
_DATE_CODE = re.compile(r"[dmyhs]", re.I)
_ELAPSED = re.compile(r"\[(?:h+|m+|s+)\]", re.I)  # [h]:mm shows a duration, as calamine reads it
_LITERAL_PART = re.compile(r'"[^"]*"|\[[^\]]*\]|\\.|_.|\*.')  # quoted text, [colours], escapes


# A style index (a cell's s="…") -> how its number cells read: "date", "duration" (elapsed time,
# [h]:mm) or "percent" (8.50%: a ledger.history.Percent, which a rate reads as the percentage shown).
NumberStyles = dict[str, str]


class NotXlsx(Exception):
    """The file is not an .xlsx package (it may still be another format calamine reads)."""


class Table(NamedTuple):
    """Consecutive rows of a sheet read a column at a time: every row has the same cells, each
    with a value. `numbers` are the rows' numbers (increasing; rows the file leaves out between
    them are empty); `columns[i]` holds column i's values, row by row (all None for a column
    the rows leave out)."""

    numbers: list[int]
    columns: list[Sequence[Any]]

    def rows(self) -> Iterator[tuple[int, list[Any]]]:
        return zip(self.numbers, map(list, zip(*self.columns, strict=True)), strict=True)


Block = Table | list[Any]  # a Table, or one row (the row after the previous block's last)


def first_sheet_rows(path: str) -> Iterator[list[Any]]:
    """The first sheet's rows from row 1; a row missing from the file comes out as [].

    Raises NotXlsx at once when the file is not an .xlsx package; a package that turns out
    unreadable raises while it is read (zipfile's, ElementTree's or a conversion's error)."""
    return _flat(first_sheet_blocks(path))


class Cut(NamedTuple):
    """A place to split a sheet's XML for two readers: the byte offset where row `row` starts."""

    offset: int
    row: int


class UncleanCut(Exception):
    """The rows before a cut did not end there as one reader of the whole sheet would have read
    them (the cut fell outside a row boundary, or the rows go back past it), or the row at the cut
    is numbered otherwise than its attribute says: read the sheet whole."""


def first_sheet_blocks(path: str, *, start: Cut | None = None, stop: Cut | None = None) -> Iterator[Block]:
    """The first sheet's rows from row 1 as `first_sheet_rows` gives them, except that runs of
    rows read a column at a time come as one Table (rows left out before it come as []).

    With `start`, the rows from that cut on (the first one yielded is row `start.row`'s, or
    UncleanCut is raised); with `stop`, the rows before that cut, raising UncleanCut at the end
    when a reader of the whole sheet would not have reached the cut's row in the same state (see
    `find_cut`)."""
    return _sheet_blocks(_package(path), start, stop)


def _package(path: str) -> zipfile.ZipFile:
    try:
        package = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise NotXlsx(path) from None
    if "xl/workbook.xml" not in package.namelist():
        package.close()
        raise NotXlsx(path)
    return package


def sheet_size(path: str) -> int:
    """The length in bytes of the first sheet's XML (0 when there is no sheet)."""
    with _package(path) as package:
        sheet, _, _ = _first_sheet(package)
        return package.getinfo(sheet).file_size if sheet in package.namelist() else 0


_CUT_ROW = re.compile(rb'<row r="(\d+)"')
_SHEET_DATA_END_BYTES = re.compile(rb"</(?:[\w.-]+:)?sheetData\s*>")


def find_cut(path: str, fraction: float = 0.5) -> Cut | None:
    """The first row at or after `fraction` of the first sheet's XML that carries its number
    (None when there is none before the sheet's data ends). Only the reader before the cut can
    tell whether the rows before it ended there cleanly (UncleanCut)."""
    with _package(path) as package:
        sheet, _, _ = _first_sheet(package)
        if sheet is None or sheet not in package.namelist():
            return None
        with package.open(sheet) as stream:
            position = int(package.getinfo(sheet).file_size * fraction)
            _skip(stream, position)
            tail = b""
            while block := stream.read(CHUNK):
                data = tail + block
                found, end = _CUT_ROW.search(data), _SHEET_DATA_END_BYTES.search(data)
                if found and (end is None or found.start() < end.start()):
                    return Cut(position - len(tail) + found.start(), int(found.group(1)))
                if end:
                    return None
                tail = data[-32:]  # a tag split across two reads is found whole in the next
                position += len(block)
    return None


def _flat(blocks: Iterator[Block]) -> Iterator[list[Any]]:
    """The blocks' rows one by one, with a Table's left-out rows as []."""
    expected = 1
    for block in blocks:
        if type(block) is Table:
            for number, cells in block.rows():
                if expected < number:  # most rows follow the one before: no generator for them
                    yield from _left_out(expected, number)
                yield cells
                expected = number + 1
        else:
            yield block  # type: ignore[misc]
            expected += 1


class Sheet(NamedTuple):
    name: str
    state: str  # "visible", "hidden" or "veryHidden", as the workbook says
    part: str | None  # its XML part in the package


def sheets(path: str) -> list[Sheet]:
    """The workbook's sheets in their order. Raises NotXlsx at once when the file is not an .xlsx package."""
    with _package(path) as package:
        return _sheets(package)[0]


def sheet_rows(path: str, index: int) -> Iterator[list[Any]]:
    """Sheet `index`'s rows from row 1, as `first_sheet_rows` gives the first sheet's."""
    return _flat(_sheet_blocks(_package(path), None, None, index))


def _sheet_blocks(package: zipfile.ZipFile, start: Cut | None, stop: Cut | None, index: int = 0) -> Iterator[Block]:
    with package:
        names = set(package.namelist())
        sheet, date1904, main = _nth_sheet(package, index)
        if sheet is None or sheet not in names:
            if stop is not None:
                raise UncleanCut("no sheet to cut")
            return
        strings = _shared_strings(package, names, main)
        styles = _number_styles(package, names, main)
        epoch = datetime(1904, 1, 1) if date1904 else datetime(1899, 12, 30)
        with package.open(sheet) as stream:
            first = start.offset if start else 0
            _skip(stream, first)
            chunks = _chunks(stream, None if stop is None else stop.offset - first)
            yield from _rows(chunks, strings, styles, epoch, start, stop)


def _first_sheet(package: zipfile.ZipFile) -> tuple[str | None, bool, str]:
    """The first sheet's part, whether dates count from 1904, and the SpreadsheetML namespace."""
    return _nth_sheet(package, 0)


def _nth_sheet(package: zipfile.ZipFile, index: int) -> tuple[str | None, bool, str]:
    found, date1904, main = _sheets(package)
    return (found[index].part if index < len(found) else None), date1904, main


def _sheets(package: zipfile.ZipFile) -> tuple[list[Sheet], bool, str]:
    """The sheets, whether dates count from 1904, and the SpreadsheetML namespace."""
    workbook = ElementTree.fromstring(_part(package, "xl/workbook.xml"))
    main = _STRICT if workbook.tag == f"{_STRICT}workbook" else _MAIN
    properties = workbook.find(f"{main}workbookPr")
    date1904 = properties is not None and properties.get("date1904") in ("1", "true")
    elements = workbook.findall(f"{main}sheets/{main}sheet")
    if not elements:
        return [], date1904, main
    rels = ElementTree.fromstring(_part(package, "xl/_rels/workbook.xml.rels"))
    targets = {rel.get("Id"): rel.get("Target", "") for rel in rels.iter(f"{_PKG_REL}Relationship")}
    found = []
    for element in elements:
        rel_id = next((element.get(name) for name in _REL_IDS if element.get(name) is not None), None)
        target = targets.get(rel_id)
        path = None
        if target is not None:
            path = target.lstrip("/") if target.startswith("/") else posixpath.normpath(posixpath.join("xl", target))
        found.append(Sheet(element.get("name", ""), element.get("state", "visible"), path))
    return found, date1904, main


def _part_size(package: zipfile.ZipFile, name: str, largest: int) -> None:
    """Refuse a part that would inflate past `largest` bytes. zipfile reads no more than the size
    the package declares for a part (and fails its checksum if there was more)."""
    size = package.getinfo(name).file_size
    if size > largest:
        raise ValueError(f"its {name} would inflate to {size:,} bytes, more than the {largest:,} allowed")


def _part(package: zipfile.ZipFile, name: str) -> bytes:
    """A part read whole, once its size is checked."""
    _part_size(package, name, LARGEST_PART)
    return package.read(name)


def _shared_strings(package: zipfile.ZipFile, names: set[str], main: str) -> list[str]:
    if "xl/sharedStrings.xml" not in names:
        return []
    strings = []
    _part_size(package, "xl/sharedStrings.xml", LARGEST_SHARED_STRINGS)
    with package.open("xl/sharedStrings.xml") as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag == f"{main}si":
                # Rich text has several runs; phonetic hints (rPh) are not part of the text.
                text = "".join(t.text or "" for t in element.iter(f"{main}t") if t not in _phonetic(element, main))
                strings.append(_unescape_excel(text) if "_x" in text else text)
                element.clear()
    return strings


_EXCEL_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")


def _unescape_excel(text: str) -> str:
    """Excel writes a character XML cannot hold (a carriage return, a control) as `_xHHHH_`, and a
    literal `_x` that would read as one as `_x005F_x`: decoded as Excel and calamine decode them."""
    return _EXCEL_ESCAPE.sub(_excel_character, text)


def _excel_character(escape: re.Match[str]) -> str:
    code = int(escape.group(1), 16)
    return escape.group(0) if 0xD800 <= code <= 0xDFFF else chr(code)  # half a surrogate pair is no character


def _phonetic(si: ElementTree.Element, main: str) -> set[ElementTree.Element]:
    return {t for rph in si.iter(f"{main}rPh") for t in rph.iter(f"{main}t")}


def _number_styles(package: zipfile.ZipFile, names: set[str], main: str) -> NumberStyles:
    """The cell style indexes whose number format shows a date or a time, a duration, or a percentage."""
    if "xl/styles.xml" not in names:
        return {}
    styles = ElementTree.fromstring(_part(package, "xl/styles.xml"))
    custom = {int(fmt.get("numFmtId", "-1")): fmt.get("formatCode", "") for fmt in styles.iter(f"{main}numFmt")}
    xfs = styles.find(f"{main}cellXfs")
    if xfs is None:
        return {}
    styled: NumberStyles = {}
    for index, xf in enumerate(xfs.findall(f"{main}xf")):
        fmt = int(xf.get("numFmtId", "0"))
        if fmt in custom:
            code = _LITERAL_PART.sub("", custom[fmt])
            if _DATE_CODE.search(code):
                styled[str(index)] = "duration" if _ELAPSED.search(custom[fmt]) else "date"
            elif "%" in code.split(";", 1)[0]:  # as positive numbers show: `0.00;-0.00%` scales only negatives
                styled[str(index)] = "percent"
        elif fmt in _DATE_FORMAT_IDS:
            styled[str(index)] = "duration" if fmt == _ELAPSED_FORMAT_ID else "date"
        elif fmt in _PERCENT_FORMAT_IDS:
            styled[str(index)] = "percent"
    return styled


def _styled(number: float, epoch: datetime, how: str) -> date | datetime | time | timedelta | float:
    """A number cell of a style in NumberStyles, as `how` says to read it."""
    if how == "percent":
        return Percent(number)
    return _serial_date(number, epoch, how == "duration")


def _skip(stream: IO[bytes], length: int) -> None:
    """Reads past `length` bytes, a chunk at a time: ZipExtFile.seek reads 16 MB at a time, and
    the memory it leaves to the process (about 25 MB) would stay for the whole reading."""
    while length > 0 and (block := stream.read(min(CHUNK, length))):
        length -= len(block)


def _chunks(stream: IO[bytes], length: int | None = None) -> Iterator[str]:
    """The stream's text, `length` bytes of it when given (which must end between characters)."""
    pending = b""
    while block := stream.read(CHUNK if length is None else min(CHUNK, length)):
        if length is not None:
            length -= len(block)
        block = pending + block
        try:
            text = block.decode("utf-8")
            pending = b""
        except UnicodeDecodeError as error:  # a character split across two reads
            if error.start < len(block) - 3:
                raise
            text, pending = block[: error.start].decode("utf-8"), block[error.start :]
        yield text
    if pending:
        yield pending.decode("utf-8")


def _rows(
    chunks: Iterator[str],
    strings: list[str],
    styles: NumberStyles,
    epoch: datetime,
    start: Cut | None = None,  # the chunks start at this cut: the first row read must be its row
    stop: Cut | None = None,  # the chunks end at this cut (see `first_sheet_blocks`)
) -> Iterator[Block]:
    expected = 1 if start is None else start.row  # the next row number: rows left out come out empty
    cut_row = None if start is None else start.row  # checked against the first row read, then None
    buffer = ""
    in_order = True  # every row so far came after the one before it
    done = False
    for chunk in _then_none(chunks):
        if chunk is None:
            end, done = len(buffer), True
            if stop is not None and (buffer.strip() or not in_order or expected > stop.row):
                raise UncleanCut(f"the rows before row {stop.row} do not end at its start")
            read_rows = expected != (1 if start is None else start.row)
            if stop is None and not _SHEET_DATA_END.search(buffer) and (read_rows or _SHEET_DATA_START.search(buffer)):
                # The sheet's XML stops before `</sheetData>`: a file cut short. Its rows so far
                # would be imported as if they were all; the file is refused instead.
                raise ValueError("the sheet's XML ends before its rows do (the file is cut short)")
        else:
            buffer += chunk
            end = _last_row_end(buffer)
            if end == 0:
                if len(buffer) > LONGEST_ROW:
                    raise ValueError(f"a row longer than {LONGEST_ROW:,} characters, or rows that never end")
                continue
        text = buffer[:end]
        plain = _plain(text)
        table = _parse_table(text, strings, styles, epoch) if plain else None
        # A Table's rows carry the file's numbers; the rows before it must have too (none went
        # back or repeated a number), so that a row's number is its position either way.
        if table is not None and in_order and table.numbers[0] >= expected:
            if cut_row is not None:
                _check_cut(cut_row, table.numbers[0])
                cut_row = None
            yield from _left_out(expected, table.numbers[0])
            yield table
            expected = table.numbers[-1] + 1
        else:
            parsed: Iterable[tuple[int, list[Any]]] | None = _parse_plain(text, strings, styles, epoch) if plain else None
            if parsed is None:
                parsed = _parse(text, expected - 1, strings, styles, epoch)
            for number, cells in parsed:
                if cut_row is not None:
                    _check_cut(cut_row, number)
                    cut_row = None
                in_order = in_order and number >= expected
                if expected < number:  # most rows follow the one before: no generator for them
                    yield from _left_out(expected, number)
                yield cells
                expected = number + 1
        buffer = buffer[end:]
        if done:
            return
        if _SHEET_DATA_END.search(buffer):
            if stop is not None:
                raise UncleanCut(f"the sheet's rows end before row {stop.row}")
            return


def _check_cut(cut_row: int, number: int) -> None:
    """The cut's row number comes from its `r` attribute; the readers number rows by their cells'
    references where they can. A file where the two disagree is read whole."""
    if number != cut_row:
        raise UncleanCut(f"the row at the cut says it is row {cut_row}, its cells say row {number}")


def _left_out(expected: int, number: int) -> Iterator[list[Any]]:
    """An empty row for each row the file leaves out between `expected` and row `number`."""
    return ([] for _ in range(number - expected))


def _then_none(chunks: Iterator[str]) -> Iterator[str | None]:
    yield from chunks
    yield None


def _last_row_end(buffer: str) -> int:
    """Where the last closed row in the buffer ends (0: none closed yet): a `</row>`, or an empty
    row closed in its own tag after it (a sheet's tail of a million formatted, empty rows has
    nothing else: held until it passed LONGEST_ROW, it made the file unreadable)."""
    ends = list(_ROW_END.finditer(buffer, max(0, buffer.rfind("row>") - 40)))
    if not ends:  # no row closed yet, or the last closed `</row >`: look through the whole buffer
        ends = list(_ROW_END.finditer(buffer))
    end = ends[-1].end() if ends else 0
    empty_rows = deque(_ROW_SELF_CLOSED.finditer(buffer, end), maxlen=1)  # the last one, kept in C
    return empty_rows[0].end() if empty_rows else end


# The cells most writers write (Excel, openpyxl, xlsxwriter): reference first, then the style and
# type, and a value or an inline string that is plain text. A chunk made only of these is read
# with one pattern; any other chunk goes through `_parse`, which reads every form.
_PLAIN_CELL = re.compile(
    r'<c r="([A-Z]+)(\d+)"(?: s="(\d+)")?(?: t="(\w+)")?(?:/>|>(?:<v>([^<]*)</v>|<is><t>([^<]*)</t></is>)?</c>)'
)


# A table's rows, as generators write them: every row of the chunk has the same cells, each with a
# value. Such a chunk is read a column at a time (`map` and `zip` run the loops in C); the cell by
# cell readers below take any other chunk.
_VALUE_CELL = re.compile(r'<c r="([A-Z]++)(\d++)"([^<>]*+)>(?:<v>([^<]*+)</v>|<is><t>([^<]*+)</t></is>)</c>')


# The first row's cells, to build a pattern for a whole row of the same form (see _parse_alike).
ALIKE_CELLS = 64  # rows wider than this go to the split reader (see _parse_alike)
_ROW_START = re.compile(r'<row r="\d++"[^<>]*+>')
_FORM_CELL = re.compile(r'<c r="([A-Z]++)\d++"([^<>]*+)>(<v>|<is><t>)[^<]*+(?:</v>|</t></is>)</c>')
_VALUE_FORMS = {"<v>": "<v>([^<]*+)</v>", "<is><t>": "<is><t>([^<]*+)</t></is>"}


def _parse_table(text: str, strings: list[str], styles: NumberStyles, epoch: datetime) -> Table | None:
    return _parse_alike(text, strings, styles, epoch) or _parse_cells(text, strings, styles, epoch)


def _parse_alike(text: str, strings: list[str], styles: NumberStyles, epoch: datetime) -> Table | None:
    """Rows that repeat the first row's cells exactly (letters, style, type, form), each cell
    in its row (a back reference to the row's number): one match a row, a group a value. About
    twice as fast as splitting at every cell, which takes any other chunk."""
    first = _ROW_START.search(text)
    end = text.find("</row>", first.end()) if first else -1
    if first is None or end < 0:
        return None
    cells = _FORM_CELL.findall(text, first.end(), end)
    if not cells or len(cells) > ALIKE_CELLS or len(cells) != text.count("<c ", first.end(), end):
        return None  # a pattern costs about 90 µs a cell to build, and Python's `re` keeps 512
    pattern = "".join(
        f'<c r="{letters}\\1"{re.escape(attributes)}>{_VALUE_FORMS[form]}</c>' for letters, attributes, form in cells
    )
    rows = re.findall(f'<row r="(\\d++)"[^<>]*+>{pattern}</row>', text)
    count = len(rows)
    if count != text.count("<row ") or count * len(cells) != text.count("<c "):
        return None  # some row has other cells: every row must be one match
    columns = list(zip(*rows, strict=True))
    blank = (None,) * count
    return _table(
        columns[0],
        [_column_index(letters) for letters, _, _ in cells],
        [
            ([attributes], values, blank) if form == "<v>" else ([attributes], blank, values)
            for (_, attributes, form), values in zip(cells, columns[1:], strict=True)
        ],
        strings,
        styles,
        epoch,
    )


def _parse_cells(text: str, strings: list[str], styles: NumberStyles, epoch: datetime) -> Table | None:
    parts = _VALUE_CELL.split(text)  # one flat list: what comes before a cell, then its 5 groups
    cells = len(parts) // 6
    if not cells or cells != text.count("<c "):
        return None  # some cell has another form (no value, rich text, a formula)
    letters, numbers, attributes, values, texts = parts[1::6], parts[2::6], parts[3::6], parts[4::6], parts[5::6]
    del parts
    width = numbers.count(numbers[0])  # the first row's cells (a row number appears in one row only)
    count = cells // width
    if count * width != cells or letters != letters[:width] * count:
        return None
    firsts = numbers[::width]
    if any(numbers[k::width] != firsts for k in range(1, width)):
        return None
    places = [_column_index(column) for column in letters[:width]]
    by_column = [(attributes[k::width], values[k::width], texts[k::width]) for k in range(width)]
    return _table(firsts, places, by_column, strings, styles, epoch)


def _table(
    numbers: Sequence[str],
    places: list[int],
    by_column: Sequence[tuple[Sequence[str], Sequence[Any], Sequence[Any]]],
    strings: list[str],
    styles: NumberStyles,
    epoch: datetime,
) -> Table | None:
    """The rows as a Table: each column's cell attributes, <v> texts and inline texts converted
    by `_column` and put at its place; None when a column does not convert, the columns are out
    of order or the rows' numbers do not increase."""
    if places != sorted(set(places)):
        return None
    table: list[Any] = [(None,) * len(numbers)] * (places[-1] + 1)  # columns the rows leave out read as empty
    try:
        for place, (attributes, values, texts) in zip(places, by_column, strict=True):
            column = _column(attributes, values, texts, strings, styles, epoch)
            if column is None:
                return None
            table[place] = column
    except (ValueError, IndexError, TypeError):
        return None  # let the cell by cell reader say what is wrong
    row_numbers = list(map(int, numbers))
    if row_numbers != sorted(set(row_numbers)):
        return None
    return Table(row_numbers, table)


def _column(
    attributes: Sequence[str],
    values: Sequence[Any],  # a <v>'s text, None where the cell is an inline string
    texts: Sequence[Any],  # an inline string's text, None where the cell has a <v>
    strings: list[str],
    styles: NumberStyles,
    epoch: datetime,
) -> list[Any] | None:
    """A column's values when its cells are all numbers, all dates or all strings of one kind."""
    kinds = {kind + _style_kind(style, styles) for _, style, kind in map(_attributes, set(attributes))}
    if kinds == {"n"}:
        return list(map(float, values))
    if kinds == {"n/date"} or kinds == {"n/duration"}:
        return list(map(_date_reader(epoch, kinds == {"n/duration"}), values))
    if kinds == {"n/percent"}:
        return list(map(Percent, map(float, values)))
    if kinds == {"s"}:
        if "" in values:  # string cells with no value are empty
            return [strings[int(v)] if v else None for v in values]
        return list(map(strings.__getitem__, map(int, values)))
    if kinds == {"inlineStr"}:
        return list(map(unescape, texts))
    return None


def forget_cached_dates() -> None:
    """Empty the caches of converted dates once a file is read."""
    _date_reader.cache_clear()
    _serial_date.cache_clear()


def _style_kind(style: str, styles: NumberStyles) -> str:
    how = styles.get(style)
    return "" if how is None else "/" + how


@lru_cache(maxsize=4)
def _date_reader(epoch: datetime, duration: bool) -> Callable[[str], date | datetime | time | timedelta | float]:
    @lru_cache(maxsize=65_536)  # a sheet repeats its dates: most cells are a cache hit, in C
    def read(value: str) -> date | datetime | time | timedelta | float:
        return _serial_date(float(value), epoch, duration)

    return read


def _plain(text: str) -> bool:
    """Whether the chunk may go to the faster readers, which count a chunk's cells by "<c " and send
    it on to `_parse` when they find fewer: every cell must be written `<c ...` for that count."""
    return ":c" not in text and _NOT_PLAIN_CELL.search(text) is None  # ":c": a prefixed cell, however written


# <c>, <c/>, or other whitespace than a space after a cell's name (one pattern: faster than three `in`)
_NOT_PLAIN_CELL = re.compile(r"<c[>/\t\n\r]")


def _parse_plain(text: str, strings: list[str], styles: NumberStyles, epoch: datetime) -> list[tuple[int, list[Any]]] | None:
    found = _PLAIN_CELL.findall(text)
    if len(found) != text.count("<c "):
        return None  # some cell has another form
    rows: list[tuple[int, list[Any]]] = []
    current = ""
    cells: list[Any] = []
    for column, number, style, kind, value, inline in found:
        if number != current:
            cells = []
            rows.append((int(number), cells))
            current = number
        index = _COLUMNS.get(column)
        if index is None:
            index = _column_index(column)
        if index != len(cells):
            if index < len(cells):
                return None  # cells out of order: let the careful reader place them
            cells.extend([None] * (index - len(cells)))
        if kind == "" or kind == "n":
            if not value:
                cells.append(None)
            elif style and style in styles:
                how = styles[style]  # `_styled`, inline: most dates of a sheet not read as a table come here
                cells.append(Percent(value) if how == "percent" else _serial_date(float(value), epoch, how == "duration"))
            else:
                cells.append(float(value))
        elif kind == "s":
            if not value:  # a string cell with no value: empty, as calamine reads it
                cells.append(None)
                continue
            try:
                cells.append(strings[int(value)])
            except IndexError:
                _shared_string(strings, value)  # says which
        elif kind == "inlineStr":
            cells.append(unescape(inline) if "&" in inline else inline)
        else:
            return None
    return rows


def _parse(text: str, last: int, strings: list[str], styles: NumberStyles, epoch: datetime) -> Iterator[tuple[int, list[Any]]]:
    """The rows in `text`, numbered; a row without its number follows the one before (`last`)."""
    if "<![CDATA[" in text:
        _check_cdata(text)
    for attributes, content in _ROW.findall(text):
        numbered = _ROW_NUMBER.search(attributes)
        number = int(numbered.group(2)) if numbered else last + 1
        last = number
        cells: list[Any] = []
        for column, attributes, inner in _CELL.findall(content):
            reference, style, kind = _attributes(attributes)
            index = _column_index(column or reference) if (column or reference) else len(cells)
            if (
                kind == "n"
                and style not in styles
                and inner.startswith("<v>")
                and inner.endswith("</v>")
                and "<" not in inner[3:-4]
            ):
                value = float(inner[3:-4])  # most cells: a plain number
            else:
                value = _value(kind, style, inner, strings, styles, epoch)
            if index >= len(cells):
                cells.extend([None] * (index - len(cells)))
                cells.append(value)
            elif value is not None:  # written after a cell to its right: in its own column, as calamine places it
                cells[index] = value
        yield number, cells


@lru_cache(maxsize=4096)
def _attributes(attributes: str) -> tuple[str, str, str]:
    """A cell's column letters (when its reference did not come first), style and type."""
    found = {name: double or single for name, double, single in _ATTRIBUTE.findall(attributes)}
    return found.get("r", "").rstrip("0123456789"), found.get("s", ""), found.get("t", "n")


_COLUMNS = {chr(65 + i): i for i in range(26)}


@lru_cache(maxsize=1024)
def _column_index(letters: str) -> int:
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - 64
    return index - 1


def _value(kind: str, style: str, inner: str, strings: list[str], styles: NumberStyles, epoch: datetime) -> Any:
    if kind == "inlineStr":
        if inner.startswith("<is><t>") and inner.endswith("</t></is>") and "<" not in inner[7:-9]:
            text = inner[7:-9]
        else:
            return "".join(map(_characters, _TEXT.findall(_PHONETIC.sub("", inner) if "rPh" in inner else inner)))
        return unescape(text) if "&" in text else text
    raw = _characters(inner[3:-4]) if inner.startswith("<v>") and inner.endswith("</v>") else _first_value(inner)
    if raw is None:
        return None
    if kind == "n":
        number = float(raw)
        return _styled(number, epoch, styles[style]) if style in styles else number
    if kind == "s":
        return _shared_string(strings, raw) if raw else None  # <v></v>: empty, as calamine reads it
    if kind == "b":
        return raw.strip() == "1"
    if kind == "d":
        return _iso_date(raw)
    return raw  # "str" (a formula's text) and "e" (an error such as #N/A)


def _shared_string(strings: list[str], index: str) -> str:
    try:
        return strings[int(index)]
    except IndexError:
        raise ValueError(f"a cell refers to shared string {index}, but the workbook has {len(strings)}") from None


def _first_value(inner: str) -> str | None:
    found = _VALUE.search(inner)
    return _characters(found.group(1)) if found else None


def _check_cdata(text: str) -> None:
    """Refuse a CDATA section that is not closed, or whose text holds "<": the patterns here would
    take it for markup (a row's or a cell's end), or look for its end from every one again."""
    start = text.find("<![CDATA[")
    while start >= 0:
        end = text.find("]]>", start + 9)
        if end < 0 or text.find("<", start + 9, end) >= 0:
            raise ValueError("the sheet holds a CDATA section that is not closed or holds '<'; save the file again from Excel")
        start = text.find("<![CDATA[", end + 3)


def _characters(content: str) -> str:
    """An element's text as XML reads it: escapes replaced, CDATA sections' text as written."""
    if "<" not in content:
        return unescape(content) if "&" in content else content
    parts = _CDATA.split(content)  # text, a section's text, text, ...
    return "".join(part if i % 2 else unescape(part) for i, part in enumerate(parts))


@lru_cache(maxsize=65_536)
def _serial_date(serial: float, epoch: datetime, duration: bool = False) -> date | datetime | time | timedelta | float:
    """An Excel serial number as calamine reads it: a duration for an elapsed-time format, a time
    of day below 1, a date when it falls on midnight, otherwise a datetime (to the millisecond).
    A serial no date or duration can hold stays the number, as calamine leaves it: that cell's row
    is refused (not a date), not the whole file."""
    try:
        elapsed = timedelta(milliseconds=round(serial * 86_400_000))
        if duration:
            return elapsed
        if serial < 1:
            return (datetime.min + elapsed % timedelta(days=1)).time()
        if epoch.year == 1899 and serial < 60:
            elapsed += timedelta(days=1)  # 1900 system: Excel counts a 29 February 1900 as day 60
        moment = epoch + elapsed
    except (OverflowError, ValueError):  # beyond timedelta's 999,999,999 days or the year 9999
        return serial
    return moment.date() if moment.time() == time() else moment


def _iso_date(text: str) -> date | datetime | str:
    try:
        moment = datetime.fromisoformat(text.strip().rstrip("Z"))
    except ValueError:
        return text
    return moment.date() if moment.time() == datetime.min.time() else moment
