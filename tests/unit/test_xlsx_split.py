"""A big loan sheet read in two processes gives exactly what one reader of the whole sheet gives:
the same records (field for field, decimals as written), the same issues with the same row
numbers, the same error for a damaged file, and no helper process left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import msgspec
import openpyxl
import pytest

from infra import xlsx, xlsx_split
from infra.xlsx import read_history
from infra.xlsx_split import HELPER_STARTS_AT, SheetHelper, worth_splitting
from infra.xlsx_stream import UncleanCut, find_cut, first_sheet_blocks, first_sheet_rows
from ledger.history import CUSTOMER_COLUMNS, LOAN_COLUMNS, UnreadableFile

ROWS = 6_000
SHEET = "xl/worksheets/sheet1.xml"


def _loan(n: int) -> list[Any]:
    start = date(2019 + n % 5, 1 + n % 12, 1 + n % 28)
    row: list[Any] = [n % 400 + 1, 5_000 + n % 5_800, 100_000 + n % 13 * 500, 12 + n % 4, 9 + n % 9 / 4, 8_000 + n % 11, n % 12]
    row += [start, date(start.year + 3, start.month, start.day)]
    if n % 700 == 350:  # now and then a row the checks refuse, each time for another reason
        row[(n // 700) % 9] = [-5, 0, -1, 0, 101, -3, 99, "soon", date(2000, 1, 1)][(n // 700) % 9]
    if n % 900 == 450:  # and a row of text cells the checks take one row at a time
        row[2], row[4] = "100000.00", "9.50"
    return row


def _files(tmp_path: Path, rows: int = ROWS, skip: range = range(0)) -> tuple[Path, Path]:
    customers = openpyxl.Workbook(write_only=True)
    sheet = customers.create_sheet()
    sheet.append(list(CUSTOMER_COLUMNS))
    for n in range(1, 401):
        sheet.append([n, f"First{n}", f"Last{n}", 30, 9_000_000_000 + n, 50_000, 1_800_000])
    customers.save(tmp_path / "customer_data.xlsx")
    loans = openpyxl.Workbook()
    sheet = loans.active
    assert sheet is not None
    sheet.append(list(LOAN_COLUMNS))
    for n in range(1, rows + 1):
        if n + 1 not in skip:  # rows left out of the file
            for column, value in enumerate(_loan(n), start=1):
                sheet.cell(row=n + 1, column=column, value=value)
    loans.save(tmp_path / "loan_data.xlsx")
    return tmp_path / "customer_data.xlsx", tmp_path / "loan_data.xlsx"


def _exactly(read: tuple[list[Any], list[Any], list[Any]]) -> bytes:
    """Everything read, decimals as their text: 1.0 and 1.00 would compare equal as Decimals."""
    customers, loans, issues = read
    return msgspec.json.encode([customers, loans, [issue.as_dict() for issue in issues]])


def _one_reader(customers: Path, loans: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as patch:
        patch.setattr(xlsx_split, "SPLIT_SIZE", 1 << 62)
        return _exactly(read_history(customers, loans))


def _rewritten(source: Path, target: Path, change: Any) -> Path:
    """`source` with its sheet's XML (bytes) passed through `change`."""
    with zipfile.ZipFile(source) as package, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in package.infolist():
            data = package.read(item.filename)
            out.writestr(item, change(data) if item.filename == SHEET else data)
    return target


class _Watched:
    """Records what the helpers did: their processes, their plans, whether their halves came back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.helpers: list[SheetHelper] = []
        self.plans: list[Any] = []
        self.halves: list[Any] = []
        monkeypatch.setattr(xlsx_split, "SPLIT_SIZE", 0)
        real_init, real_plan, real_rest = SheetHelper.__init__, SheetHelper.plan, SheetHelper.rest

        def init(helper: SheetHelper, *args: Any) -> None:
            real_init(helper, *args)
            self.helpers.append(helper)

        def plan(helper: SheetHelper) -> Any:
            self.plans.append(real_plan(helper))
            return self.plans[-1]

        def rest(helper: SheetHelper, *args: Any) -> Any:
            self.halves.append(real_rest(helper, *args))
            return self.halves[-1]

        monkeypatch.setattr(SheetHelper, "__init__", init)
        monkeypatch.setattr(SheetHelper, "plan", plan)
        monkeypatch.setattr(SheetHelper, "rest", rest)

    def all_gone(self) -> bool:
        return all(helper._process.returncode is not None for helper in self.helpers)


def _damaged(loans: Path, target: Path, row: int) -> Path:
    """`loans` with row `row`'s first cell pointing at a shared string the file does not have."""
    cell = f'<c r="A{row}" t="s"><v>99999</v></c>'.encode()
    return _rewritten(loans, target, lambda xml: re.sub(rf'<c r="A{row}"[^>]*>.*?</c>'.encode(), cell, xml))


def _both_errors(customers: Path, loans: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, _Watched]:
    """The error one reader raises for the files, the error with the helper, and what the helper did."""
    with monkeypatch.context() as patch, pytest.raises(UnreadableFile) as one:
        patch.setattr(xlsx_split, "SPLIT_SIZE", 1 << 62)
        read_history(customers, loans)
    watched = _Watched(monkeypatch)
    with pytest.raises(UnreadableFile) as two:
        read_history(customers, loans)
    return str(one.value), str(two.value), watched


def test_a_sheet_read_in_two_processes_gives_what_one_reader_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path)
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)
    split = read_history(customers, loans)
    assert _exactly(split) == expected
    assert len(watched.helpers) == 1 and watched.all_gone()
    (cut, positions), half = watched.plans[0], watched.halves[0]
    assert 0.4 * ROWS < cut.row < 0.75 * ROWS and positions == list(range(9))
    records, issues = half  # the helper's half came back and was used, not read again here
    assert records[0].row == cut.row and records[-1].row == ROWS + 1
    issue_rows = [issue.row for issue in split[2]]
    assert len(issues) >= 3 and min(issue_rows) < cut.row < max(issue_rows)  # issues on both sides of the cut


def test_rows_left_out_right_before_the_cut_keep_their_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, loans = _files(tmp_path)
    cut = find_cut(str(loans), HELPER_STARTS_AT)
    for _ in range(5):  # leaving rows out moves the cut: leave out the 30 rows before it until they stay there
        assert cut is not None
        left_out = range(cut.row - 30, cut.row)
        customers, loans = _files(tmp_path, skip=left_out)
        cut = find_cut(str(loans), HELPER_STARTS_AT)
        if cut is not None and cut.row - 1 in left_out:
            break
    assert cut is not None and cut.row - 1 in left_out
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)
    assert _exactly(read_history(customers, loans)) == expected
    assert watched.halves[0] is not None and watched.halves[0][0][0].row == cut.row


def test_rows_whose_number_and_cells_disagree_are_read_by_one_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path)
    # A writer's off-by-one: every row says it is the row after the one its cells are in.
    shifted = _rewritten(
        loans, tmp_path / "shifted.xlsx", lambda xml: re.sub(rb'<row r="(\d+)"', lambda m: b'<row r="%d"' % (int(m[1]) + 1), xml)
    )
    expected = _one_reader(customers, shifted, monkeypatch)
    watched = _Watched(monkeypatch)
    assert _exactly(read_history(customers, shifted)) == expected
    assert watched.plans[0] is not None and watched.halves in ([], [None]) and watched.all_gone()


def test_an_undecodable_byte_after_the_cut_gives_the_error_one_reader_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    customers, loans = _files(tmp_path)
    row = int(ROWS * 0.9)
    broken = _rewritten(
        loans, tmp_path / "broken.xlsx", lambda xml: re.sub(rf'(<c r="A{row}"[^>]*><v>)'.encode(), lambda m: m[1] + b"\xff", xml)
    )
    one, two, watched = _both_errors(customers, broken, monkeypatch)
    assert two == one and "can't decode byte 0xff in position" in one
    assert watched.halves == [None] and watched.all_gone()


def test_a_file_replaced_while_it_is_read_is_read_again_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    customers, loans = _files(tmp_path)
    watched = _Watched(monkeypatch)
    real_rest = SheetHelper.rest  # the watcher's
    other = _rewritten(loans, tmp_path / "other.xlsx", lambda xml: xml.replace(b'<row r="2"', b'<row r="2" ht="20"', 1))

    def replaced_meanwhile(helper: SheetHelper, *args: Any) -> Any:
        half = real_rest(helper, *args)
        os.replace(other, loans)  # another file now has the name (and another size)
        return half

    monkeypatch.setattr(SheetHelper, "rest", replaced_meanwhile)
    read = read_history(customers, loans)
    assert watched.halves[0] is not None and "loan_data.xlsx changed while it was read: reading it whole" in caplog.text
    assert _exactly(read) == _one_reader(customers, loans, monkeypatch)  # the file as it is now, read whole
    assert watched.all_gone()


def test_the_parts_before_and_after_a_cut_are_the_whole_sheet(tmp_path: Path) -> None:
    _, loans = _files(tmp_path, rows=2_000)
    cut = find_cut(str(loans))
    assert cut is not None
    with zipfile.ZipFile(loans) as package:
        assert package.read(SHEET)[cut.offset :].startswith(f'<row r="{cut.row}"'.encode())

    def numbered(blocks: Any, first: int) -> list[tuple[int, list[Any]]]:
        rows, number = [], first - 1
        for block in blocks:
            for number, cells in block.rows() if hasattr(block, "rows") else [(number + 1, block)]:  # noqa: B020
                rows.append((number, cells))
        return [(n, cells) for n, cells in rows if cells]

    before = numbered(first_sheet_blocks(str(loans), stop=cut), 1)
    after = numbered(first_sheet_blocks(str(loans), start=cut), cut.row)
    whole = [(n, cells) for n, cells in enumerate(first_sheet_rows(str(loans)), start=1) if cells]
    assert before + after == whole
    assert before[-1][0] == cut.row - 1 and after[0][0] == cut.row


def test_rows_that_go_back_across_the_cut_are_read_by_one_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path)
    cut = find_cut(str(loans), HELPER_STARTS_AT)
    assert cut is not None
    before, later = cut.row - 1, cut.row + 3  # the row before the cut trades numbers with a later one

    def swap(xml: bytes) -> bytes:
        text = xml.decode()
        for old, new in ((before, "#"), (later, before), ("#", later)):
            text = re.sub(rf'(<row r="|<c r="[A-Z]+){old}"', rf'\g<1>{new}"', text)
        return text.encode()

    swapped = _rewritten(loans, tmp_path / "swapped.xlsx", swap)
    with pytest.raises(UncleanCut):
        list(first_sheet_blocks(str(swapped), stop=find_cut(str(swapped), HELPER_STARTS_AT)))
    expected = _one_reader(customers, swapped, monkeypatch)
    watched = _Watched(monkeypatch)
    assert _exactly(read_history(customers, swapped)) == expected
    assert watched.plans[0] is not None and watched.halves == []  # cut, then read whole
    assert watched.all_gone()


def test_a_helper_that_dies_leaves_its_half_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path)
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)
    real_plan = SheetHelper.plan  # the watcher's

    def killed_once_it_cut(helper: SheetHelper) -> Any:
        plan = real_plan(helper)
        helper._process.kill()  # killed before it has read its rows (thousands of them: tens of ms)
        return plan

    monkeypatch.setattr(SheetHelper, "plan", killed_once_it_cut)
    assert _exactly(read_history(customers, loans)) == expected
    assert watched.plans[0] is not None and watched.halves == [None] and watched.all_gone()


def test_records_lost_on_the_way_leave_the_half_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path)
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)
    real_frame = xlsx_split._frame

    def last_frame_lost(stream: Any) -> Any:
        frame = real_frame(stream)
        if stream.seekable() and stream.read(1) == b"":  # the records file's last frame
            return None
        if stream.seekable():
            stream.seek(-1, 1)
        return frame

    monkeypatch.setattr(xlsx_split, "_frame", last_frame_lost)
    assert _exactly(read_history(customers, loans)) == expected
    assert watched.halves == [None]


@pytest.mark.parametrize("where", [0.25, 0.9])
def test_a_damaged_sheet_gives_the_error_one_reader_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: float) -> None:
    customers, loans = _files(tmp_path)
    one, two, watched = _both_errors(customers, _damaged(loans, tmp_path / "damaged.xlsx", int(ROWS * where)), monkeypatch)
    assert two == one and "not a readable Excel workbook" in one
    assert len(watched.helpers) == 1 and watched.all_gone()
    if where > HELPER_STARTS_AT:
        assert watched.halves == [None]  # the helper said it could not read its half; the caller found why


def test_without_a_helper_process_the_caller_reads_it_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers, loans = _files(tmp_path, rows=1_000)
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)

    def no_process(*args: Any, **kwargs: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(xlsx_split.subprocess, "Popen", no_process)
    assert _exactly(read_history(customers, loans)) == expected
    assert watched.helpers == []


def test_a_small_sheet_or_a_single_core_is_read_by_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, loans = _files(tmp_path, rows=500)
    monkeypatch.setattr(xlsx_split, "SPLIT_SIZE", 0)
    assert worth_splitting(loans)
    monkeypatch.setattr(xlsx_split.os, "sched_getaffinity", lambda _: {0})
    assert not worth_splitting(loans)
    monkeypatch.undo()
    assert not worth_splitting(loans)  # far below SPLIT_SIZE
    assert not worth_splitting(tmp_path / "missing.xlsx")


def test_the_helper_says_no_cut_when_no_row_carries_its_number(tmp_path: Path) -> None:
    _, loans = _files(tmp_path, rows=300)
    bare = _rewritten(loans, tmp_path / "bare.xlsx", lambda xml: re.sub(rb'<row r="\d+"', b"<row", xml))
    assert find_cut(str(bare)) is None
    helper = SheetHelper(bare, "loans")
    try:
        assert helper.plan() is None
    finally:
        helper.close()
    assert xlsx._read(bare, "l", LOAN_COLUMNS, xlsx.parse_loan, xlsx.parse_loan_columns)[0]  # still read, by one reader


# Helpers that hang: the helper's command, its code replaced (python -c CODE kind path descriptor).
_HANGS_AT_ONCE = "import time; time.sleep(3600)"
_HANGS_AFTER_ITS_PLAN = (
    "import sys, time; from infra import xlsx, xlsx_split;"
    " xlsx._read_part = lambda *args, **kwargs: time.sleep(3600);"
    " xlsx_split.main(sys.argv[1:])"
)
_HANGS_AFTER_ITS_LAST_WORD = "import sys, time; from infra import xlsx_split; xlsx_split.main(sys.argv[1:]); time.sleep(3600)"


def _hanging(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Helpers run `code`; the caller waits HELPER_WAIT = 1 s for what is due after the plan, and
    for the plan too when `code` never sends one (a real plan takes up to 2 s on a busy machine)."""
    real_popen, real_plan = xlsx_split.subprocess.Popen, SheetHelper.plan  # the watcher's plan

    def popen(command: list[str], **kwargs: Any) -> Any:
        assert command[1:3] == ["-m", "infra.xlsx_split"]
        return real_popen([command[0], "-c", code, *command[3:]], **kwargs)

    def plan_then_short_waits(helper: SheetHelper) -> Any:
        plan = real_plan(helper)
        monkeypatch.setattr(xlsx_split, "HELPER_WAIT", 1.0)
        return plan

    monkeypatch.setattr(xlsx_split.subprocess, "Popen", popen)
    if code == _HANGS_AT_ONCE:
        monkeypatch.setattr(xlsx_split, "HELPER_WAIT", 1.0)
    else:
        monkeypatch.setattr(SheetHelper, "plan", plan_then_short_waits)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (_HANGS_AT_ONCE, "the helper did not say where it cut within 1 s"),
        (_HANGS_AFTER_ITS_PLAN, "did not finish (no answer within"),
        (_HANGS_AFTER_ITS_LAST_WORD, "did not finish (it did not exit within 1 s of its last word)"),
    ],
    ids=["before-its-plan", "after-its-plan", "after-its-last-word"],
)
def test_a_helper_that_hangs_is_given_up_on_and_its_part_read_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str, said: str
) -> None:
    customers, loans = _files(tmp_path)
    expected = _one_reader(customers, loans, monkeypatch)
    watched = _Watched(monkeypatch)
    _hanging(monkeypatch, code)
    started = time.monotonic()
    assert _exactly(read_history(customers, loans)) == expected
    assert time.monotonic() - started < 30  # the helper sleeps for an hour
    assert len(watched.helpers) == 1 and watched.all_gone()  # stopped, not left sleeping
    assert said in caplog.text
    if code == _HANGS_AT_ONCE:
        assert watched.plans == [None]  # the sheet read whole
    else:
        assert watched.plans[0] is not None and watched.halves == [None]  # the helper's part read here


def test_a_helper_that_fails_logs_one_json_line(tmp_path: Path) -> None:
    _, loans = _files(tmp_path, rows=10)
    done = subprocess.run(
        [sys.executable, "-m", "infra.xlsx_split", "no-such-kind", str(loans), "1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "error" and entry["logger"] == "infra.xlsx_split"
    assert entry["message"] == "the helper process reading loan_data.xlsx failed"
    assert "KeyError: 'no-such-kind'" in entry["exception"]


@pytest.mark.parametrize("where", [0.25, 0.9])
def test_a_loan_sheet_cut_short_is_refused_whole_not_imported_in_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: float
) -> None:
    """A sheet whose XML stops part-way (a file cut short by a copy) would give its rows so far,
    as if they were all: one reader and two processes alike refuse it."""
    customers, loans = _files(tmp_path)
    cut = _rewritten(loans, tmp_path / "cut.xlsx", lambda xml: xml[: xml.index(f'<row r="{int(ROWS * where)}"'.encode()) + 40])
    one, two, watched = _both_errors(customers, cut, monkeypatch)
    assert two == one and "cut short" in one
    assert watched.all_gone()
