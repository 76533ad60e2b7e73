"""Per-customer answers each API process keeps between requests, until the projection says the
customer changed.

The projector's commit NOTIFYs which customers its page changed (`CHANGES_CHANNEL`), just
before the new position (`projections.projector`), and `api.readyourwrites.PositionWatcher`
calls `changed()` with them before it wakes anyone waiting for that position. So a kept answer
can be served without asking the database at all: a read that finds one costs no query, which
is most of what a read cost (the query's round trip and its result, in both processes).

- A notice that names no customers (a rebuild, a read model started again, a projector that
  does not describe its changes, or notices lost with a connection) drops everything.
- Date-dependent answers (current loans, EMIs due) are kept for the day they were computed for.
- An answer computed while a notice arrived for its customer is not kept: the database may have
  been read before the change. `since()` is taken before the read, `keep()` compares.
- When full, the customer (or view-loan answer) least recently kept or served makes room.
- `trusted` says whether the notices so far cover every change another process of this server
  has answered for (`PositionWatcher.current`); when they may not, nothing kept is served.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable
from datetime import date
from typing import Any, TypeVar

Value = TypeVar("Value")

DEFAULT_SIZE = 20_000
LOANS_PER_CUSTOMER = 2  # view-loan answers kept: up to this many times the customers kept
_RECENT_NOTICES = 1_024  # how far back keep() can tell whether a notice named its customer


class _Kept:
    __slots__ = ("dated", "day", "loans")

    def __init__(self) -> None:
        self.day: date | None = None
        self.dated: dict[Hashable, Any] = {}  # answers for `day`
        self.loans: dict[int, Any] = {}  # view-loan answers (not date-dependent), by loan ID


class KeptAnswers:
    def __init__(self, size: int = DEFAULT_SIZE, trusted: Callable[[], bool] = lambda: True) -> None:
        self.size = size
        self.loan_size = size * LOANS_PER_CUSTOMER
        self.trusted = trusted
        self._customers: dict[int, _Kept] = {}
        self._loans: dict[int, int] = {}  # loan ID -> its customer, for the view-loan answers kept
        self._notices = 0
        self._recent: deque[tuple[int, frozenset[int] | None]] = deque(maxlen=_RECENT_NOTICES)

    # What the projection says

    def changed(self, customer_ids: Collection[int] | None) -> None:
        """The read model changed for these customers (None: for anyone)."""
        self._notices += 1
        if customer_ids is None:
            self._customers.clear()
            self._loans.clear()
            self._recent.append((self._notices, None))
            return
        ids = frozenset(customer_ids)
        self._recent.append((self._notices, ids))
        for customer_id in ids:
            kept = self._customers.pop(customer_id, None)
            if kept is not None:
                self._forget_loans(kept)

    # Reading and keeping

    async def answer(self, customer_id: int, key: Hashable, today: date, read: Callable[[], Awaitable[Value]]) -> Value:
        """The answer kept for `key` and `today`, or `read()`'s (from the database), kept for next time."""
        value: Value | None = self.get(customer_id, key, today)
        if value is None:
            since = self.since()
            value = await read()
            self.keep(customer_id, key, value, since, today)
        return value

    def since(self) -> int:
        """A mark to pass to keep(): take it before reading the database."""
        return self._notices

    def get(self, customer_id: int, key: Hashable, today: date) -> Any:
        """The answer kept for `key` on `today`, or None."""
        kept = self._customers.get(customer_id)
        if kept is None or kept.day != today or not self.trusted():
            return None
        value = kept.dated.get(key)
        if value is not None:
            self._used(customer_id, kept)
        return value

    def keep(self, customer_id: int, key: Hashable, value: Any, since: int, today: date) -> bool:
        """Keep an answer for `today` read from the database after `since()` gave `since`, unless
        a notice for its customer has come since then (the read may predate that change)."""
        kept = self._entry(customer_id, since)
        if kept is None:
            return False
        if kept.day != today:
            kept.day, kept.dated = today, {}
        kept.dated[key] = value
        return True

    def loan(self, loan_id: int) -> Any:
        """The view-loan answer kept for this loan, or None."""
        customer_id = self._loans.get(loan_id)
        if customer_id is None or not self.trusted():
            return None
        kept = self._customers[customer_id]
        self._loans[loan_id] = self._loans.pop(loan_id)  # the most recently served now
        self._used(customer_id, kept)
        return kept.loans.get(loan_id)

    def keep_loan(self, customer_id: int, loan_id: int, value: Any, since: int) -> None:
        kept = self._entry(customer_id, since)
        if kept is None:
            return
        if loan_id not in self._loans and len(self._loans) >= self.loan_size:
            oldest = next(iter(self._loans))
            owner = self._customers.get(self._loans.pop(oldest))
            if owner is not None:
                owner.loans.pop(oldest, None)
        kept.loans[loan_id] = value
        self._loans.pop(loan_id, None)
        self._loans[loan_id] = customer_id

    def _entry(self, customer_id: int, since: int) -> _Kept | None:
        """The customer's entry to keep an answer in, made if need be; None when the answer read
        after `since` may predate a change (or nothing is kept)."""
        if self.size <= 0 or not self._unchanged_since(customer_id, since):
            return None
        kept = self._customers.get(customer_id)
        if kept is None:
            if len(self._customers) >= self.size:
                self._forget_loans(self._customers.pop(next(iter(self._customers))))  # the least recently used
            kept = self._customers[customer_id] = _Kept()
        else:
            self._used(customer_id, kept)
        return kept

    def _used(self, customer_id: int, kept: _Kept) -> None:
        """Move the customer to the end of the eviction order (dicts keep insertion order)."""
        del self._customers[customer_id]
        self._customers[customer_id] = kept

    def _unchanged_since(self, customer_id: int, since: int) -> bool:
        if since == self._notices:
            return True
        if not self._recent or self._recent[0][0] > since + 1:
            return False  # the notices since then are no longer all known
        for notice, ids in reversed(self._recent):
            if notice <= since:
                break
            if ids is None or customer_id in ids:
                return False
        return True

    def _forget_loans(self, kept: _Kept) -> None:
        for loan_id in kept.loans:
            self._loans.pop(loan_id, None)

    def __len__(self) -> int:
        return len(self._customers)
