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
- `trusted` says whether the notices so far cover every change another process of this server
  has answered for (`PositionWatcher.current`); when they may not, nothing kept is served.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Hashable
from datetime import date
from typing import Any

DEFAULT_SIZE = 20_000
LOANS_PER_CUSTOMER = 2  # view-loan answers kept: up to this many times the customers kept
_RECENT_NOTICES = 1_024  # how far back keep() can tell whether a notice named its customer


class _Kept:
    __slots__ = ("dated", "day", "undated")

    def __init__(self) -> None:
        self.day: date | None = None
        self.dated: dict[Hashable, Any] = {}  # answers for `day`
        self.undated: dict[Hashable, Any] = {}


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

    def since(self) -> int:
        """A mark to pass to keep(): take it before reading the database."""
        return self._notices

    def get(self, customer_id: int, key: Hashable, today: date | None = None) -> Any:
        """The answer kept for `key` (for `today`, if it depends on the date), or None."""
        kept = self._customers.get(customer_id)
        if kept is None or not self.trusted():
            return None
        if today is None:
            return kept.undated.get(key)
        return kept.dated.get(key) if kept.day == today else None

    def keep(self, customer_id: int, key: Hashable, value: Any, since: int, today: date | None = None) -> bool:
        """Keep an answer read from the database after `since()` gave `since`, unless a notice
        for its customer has come since then (the read may predate that change)."""
        if self.size <= 0 or not self._unchanged_since(customer_id, since):
            return False
        kept = self._customers.get(customer_id)
        if kept is None:
            if len(self._customers) >= self.size:
                self._forget_loans(self._customers.pop(next(iter(self._customers))))  # the oldest
            kept = self._customers[customer_id] = _Kept()
        if today is None:
            kept.undated[key] = value
        else:
            if kept.day != today:
                kept.day, kept.dated = today, {}
            kept.dated[key] = value
        return True

    def loan(self, loan_id: int) -> Any:
        """The view-loan answer kept for this loan, or None."""
        customer_id = self._loans.get(loan_id)
        return None if customer_id is None else self.get(customer_id, ("loan", loan_id))

    def keep_loan(self, customer_id: int, loan_id: int, value: Any, since: int) -> None:
        if self.size <= 0 or not self._unchanged_since(customer_id, since):
            return
        if loan_id not in self._loans and len(self._loans) >= self.loan_size:
            oldest = next(iter(self._loans))
            owner = self._customers.get(self._loans.pop(oldest))
            if owner is not None:
                owner.undated.pop(("loan", oldest), None)
        if self.keep(customer_id, ("loan", loan_id), value, since):
            self._loans[loan_id] = customer_id

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
        for key in kept.undated:
            if isinstance(key, tuple) and key[0] == "loan":
                self._loans.pop(key[1], None)

    def __len__(self) -> int:
        return len(self._customers)
