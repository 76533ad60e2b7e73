"""Reads a big sheet in two processes: this one reads the rows before the sheet's middle while a
helper process reads the rows after it.

Reading a million-loan file is Python on one core (the patterns, then the checks a column at a
time): about 22 s of a 100,000-customer import, with the machine's other core idle. The helper
is a fresh interpreter (`python -m infra.xlsx_split`), not a fork: the importing worker holds
threads and database connections, and a fresh interpreter's memory (about 25 MB) is its own.

The helper finds the header and the cut (`find_cut`: the first numbered row after the middle of
the sheet's XML), says where it is, reads the rows from the cut to the end and sends them back a
column at a time. The caller reads the rows before the cut; only it can tell whether they end
cleanly at the cut (`UncleanCut`), and when they do not it reads the sheet whole. When the helper
fails in any way (it dies, it finds the rows unreadable, it does not answer in time: see
HELPER_WAIT), the caller reads the rows after the cut itself, or the whole sheet when it has no
cut yet. So the records, issues and errors are exactly those of one reader of the whole sheet.

The helper writes frames, each an 8-byte length and then msgpack. On its stdout:
1. the plan: [the cut's offset, the cut's row, the header's column positions, the file's identity
   (device, inode, size, mtime) as the helper found it], or nil (no split);
2. when it has read its rows: {"records": how many it wrote, "issues": [[row, reason], ...]},
   or {"error": text} when it could not read them.
The records go to a temporary file the caller opened, 20,000 or so a frame (one msgpack a
field), so that the caller makes them only once the helper has gone: the memory of the two
processes never holds the second half twice.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date
from decimal import Decimal
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import msgspec

from infra.xlsx_stream import Cut, find_cut, sheet_size
from ledger.domain import RowIssue
from ledger.history import forget_shared_ids

log = logging.getLogger(__name__)

# Where the helper's half starts, as a fraction of the sheet's XML. The helper has more to do a
# row (it sends the records it read, about 4 µs a row, after starting up and going through the
# first part of the file); the caller has the customer file to read first and the helper's records
# to make after. Measured on a 100,000-customer import: both halves end together about here.
HELPER_STARTS_AT = 0.56
SPLIT_SIZE = 32 << 20  # bytes of sheet XML (about 90,000 loan rows) from which a helper reads half
# How long past its due the caller waits for a helper before it reads the helper's half itself: a
# helper that hangs must not hold the import. Its plan is due at once (finding the cut in a
# million-row sheet takes a few seconds); its records when the caller has read its own half, and
# it is given as long again as that took, plus this.
HELPER_WAIT = 60.0
_LENGTH = 8

Record = TypeVar("Record", bound=msgspec.Struct)


def worth_splitting(path: Path, split_size: int | None = None) -> bool:
    """Whether a helper would shorten the reading: an .xlsx sheet of `split_size` bytes of XML
    or more (None: SPLIT_SIZE) and a second core for it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2:
        return False
    try:
        return sheet_size(str(path)) >= (SPLIT_SIZE if split_size is None else split_size)
    except Exception:  # not an .xlsx package, or a damaged one: the reader says what is wrong
        return False


class SheetHelper:
    """A helper process reading the rows after the middle of a sheet (see the module's text)."""

    def __init__(self, path: Path, kind: str) -> None:
        self._path = path
        self._identity = _identity(path)  # the file as it was when the helper started
        self._records = tempfile.TemporaryFile()  # noqa: SIM115 (closed by `close`): the records the helper read
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "infra.xlsx_split", kind, str(path), str(self._records.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(self._records.fileno(),),
            )
        except OSError:
            self._records.close()
            raise
        self._said = _Pipe(self._stdout)  # what it says on its stdout, waited for with a deadline

    def plan(self) -> tuple[Cut, list[int]] | None:
        """Where the helper cut the sheet and the header's column positions it found, or None
        when it did not cut, or did not say within HELPER_WAIT (the caller then reads the whole
        sheet)."""
        self._said.deadline = time.monotonic() + HELPER_WAIT
        try:
            plan = _frame(self._said)
        except OSError as error:  # TimeoutError among them
            said = f"within {HELPER_WAIT:.0f} s" if isinstance(error, TimeoutError) else f"({error})"
            log.warning("%s: the helper did not say where it cut %s: reading it whole", self._path.name, said)
            return None
        if not isinstance(plan, list) or len(plan) != 4 or plan[3] != self._identity:
            return None  # no cut, or the helper found another file at the path
        offset, row, positions, _ = plan
        return Cut(offset, row), positions

    def same_file(self) -> bool:
        """Whether the path still names the file it named when the helper started (both
        processes open it several times: a file replaced meanwhile could mix two files' rows)."""
        return _identity(self._path) == self._identity

    def rest(self, record_type: type[Record], label: str, took: float) -> tuple[list[Record], list[RowIssue]] | None:
        """The records and issues of the rows after the cut, or None when the helper failed or
        did not finish within `took` (the seconds the caller's own half took) and HELPER_WAIT more."""
        wait = took + HELPER_WAIT
        self._said.deadline = time.monotonic() + wait
        try:
            finished = _frame(self._said)
            if isinstance(finished, dict) and "issues" in finished:
                self._process.wait(HELPER_WAIT)  # gone before the records it read are made again here
        except subprocess.TimeoutExpired:
            finished = f"it did not exit within {HELPER_WAIT:.0f} s of its last word"
        except OSError as error:  # TimeoutError among them
            finished = f"no answer within {wait:.0f} s" if isinstance(error, TimeoutError) else str(error)
        if not isinstance(finished, dict) or "issues" not in finished:
            log.warning("the helper reading %s did not finish (%s): reading its half here", label, finished)
            return None
        self._records.seek(0)
        records: list[Record] = []
        known: list[dict[Any, Any]] = [{} for _ in _fields(record_type)]
        while (columns := _frame(self._records)) is not None:
            records.extend(_decoded(record_type, columns, known))
        if len(records) != finished["records"]:
            log.warning(
                "the helper reading %s sent %d of its %d records: reading its half here", label, len(records), finished["records"]
            )
            return None
        return records, [RowIssue(label, row, reason) for row, reason in finished["issues"]]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._stdout.close()
        self._records.close()

    @property
    def _stdout(self) -> IO[bytes]:
        assert self._process.stdout is not None
        return self._process.stdout


class _Pipe:
    """A pipe read with a deadline: `read` raises TimeoutError once it has passed. A frame cut
    off by the deadline leaves the stream in its middle: the helper is then stopped, not read on."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream  # only ever read here, through its descriptor: nothing waits in its buffer
        self.deadline = 0.0  # time.monotonic() by which `read` must have its bytes: set before each wait

    def read(self, size: int) -> bytes:
        """`size` bytes, or fewer at the end of the stream."""
        chunks: list[bytes] = []
        descriptor = self.stream.fileno()  # raises once the stream is closed
        with selectors.DefaultSelector() as selector:
            selector.register(descriptor, selectors.EVENT_READ)
            while size > 0:
                left = self.deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError
                chunk = os.read(descriptor, min(size, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                size -= len(chunk)
        return b"".join(chunks)

    def seekable(self) -> bool:
        return False


def _identity(path: Path) -> list[int]:
    """Which file `path` names, and its size and time of last change."""
    try:
        found = path.stat()
    except OSError:
        return []
    return [found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns]


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _frame(stream: _Readable) -> Any:
    """The next frame, or None at the end of the stream (a frame cut short ends it too)."""
    length = stream.read(_LENGTH)
    if len(length) < _LENGTH:
        return None
    size = int.from_bytes(length, "big")
    data = stream.read(size)
    try:
        return msgspec.msgpack.decode(data) if len(data) == size else None
    except msgspec.DecodeError:
        return None


def _send(stream: IO[bytes], message: Any) -> None:
    data = msgspec.msgpack.encode(message)
    stream.write(len(data).to_bytes(_LENGTH, "big"))
    stream.write(data)
    stream.flush()


# Fields travel a column at a time, decimals and dates as their text (exactly what they were). A
# field the reader shares (`shared`: the values a file repeats, such as customer IDs, rates and
# dates) travels as its distinct values and an index a row: the helper's reader already made each
# repeated value once, so the helper converts each distinct object once, and the caller makes each
# distinct value once for the whole half, as one reader would have.

_TEXT: dict[object, Callable[[Any], Any]] = {Decimal: str, date: date.isoformat}
_FROM_TEXT: dict[object, Callable[[Any], Any]] = {Decimal: Decimal, date: date.fromisoformat}


@cache
def _fields(record_type: type[msgspec.Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(record_type)


def _encoded(records: Sequence[msgspec.Struct], record_type: type[msgspec.Struct], shared: frozenset[str]) -> list[bytes]:
    columns = []
    for field in _fields(record_type):
        column: list[Any] = list(map(attrgetter(field.name), records))
        text = _TEXT.get(field.type)
        if field.name in shared:
            ids = list(map(id, column))
            distinct = dict(zip(ids, column, strict=True))  # one object an id, in the order first seen
            values = list(distinct.values()) if text is None else list(map(text, distinct.values()))
            index = dict(zip(distinct, range(len(distinct)), strict=True))
            columns.append(msgspec.msgpack.encode((values, list(map(index.__getitem__, ids)))))
        else:
            columns.append(msgspec.msgpack.encode((column if text is None else list(map(text, column)), None)))
    return columns


def _decoded(record_type: type[Record], columns: list[bytes], known: list[dict[Any, Any]]) -> list[Record]:
    """The records of one frame. `known` holds each shared field's values made so far, so that a
    value repeated across the half is one object (a plain dict: `ledger.history`'s bounded cache
    costs about 1 µs a value here; the one-pass forms below, in C, about 0.4 s less a million-loan
    half than checking each distinct value in Python)."""
    made: list[list[Any]] = []
    for field, encoded, values in zip(_fields(record_type), columns, known, strict=True):
        sent, indexes = msgspec.msgpack.decode(encoded)
        convert = _FROM_TEXT.get(field.type)
        if indexes is None:
            made.append(sent if convert is None else list(map(convert, sent)))
            continue
        if convert is Decimal:  # keyed by their text: 1.0 and 1.00 are equal, and stay as written
            missing = [text for text in sent if text not in values]
            values.update(zip(missing, map(Decimal, missing), strict=True))
            sent = list(map(values.__getitem__, sent))
        else:  # IDs and dates: made (in C) and shared by value, which is exact for them
            if convert is not None:
                sent = list(map(convert, sent))
            sent = list(map(values.setdefault, sent, sent))
        made.append(list(map(sent.__getitem__, indexes)))
    return list(map(record_type, *made))


def main(argv: list[str]) -> int:
    """The helper: `python -m infra.xlsx_split loans PATH FD`, FD a file it writes the records to."""
    from infra import xlsx  # the reader, which starts this helper, imports this module

    kind, name, descriptor = argv
    path = Path(name)
    columns, parse, parse_columns, record_type, shared = xlsx.KINDS[kind]
    stdout = sys.stdout.buffer
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000_000)  # as the importer: no full walks of the rows held
    header_row, positions = 0, list[int]()
    identity = _identity(path)
    try:
        header_row, positions = xlsx.header_of(path, columns)
        cut = find_cut(str(path), HELPER_STARTS_AT)
    except Exception:  # the caller's own reading says what is wrong with the file
        cut = None
    if cut is None or cut.row <= header_row:
        _send(stdout, None)
        return 0
    _send(stdout, [cut.offset, cut.row, positions, identity])
    sent = 0

    def flush(records: list[Any]) -> None:
        nonlocal sent
        _send(records_file, _encoded(records, record_type, shared))
        sent += len(records)
        # The cache that shares repeated values (customer IDs above all) would grow to tens of MB
        # over a half; here it only has to share them among the records held until they are sent.
        forget_shared_ids()

    with open(int(descriptor), "wb") as records_file:
        try:
            records, issues, _ = xlsx._read_part(
                path,
                path.name,
                columns,
                parse,
                parse_columns,
                start=cut,
                positions=positions,
                flush=flush,
            )
            flush(records)
        except Exception as error:
            _send(stdout, {"error": f"{type(error).__name__}: {error}"})
            return 0
    _send(stdout, {"records": sent, "issues": [[issue.row, issue.reason] for issue in issues]})
    return 0


if __name__ == "__main__":
    from infra.logs import configure_logging

    configure_logging()  # what goes wrong here is logged as the worker logs: one JSON object a line
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:
        name = Path(sys.argv[2]).name if len(sys.argv) > 2 else "a sheet"
        logging.getLogger("infra.xlsx_split").exception("the helper process reading %s failed", name)
        sys.exit(1)
