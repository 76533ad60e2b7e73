"""What the application needs from outside: a clock and a source of integer IDs."""

from __future__ import annotations

import threading
from collections.abc import Collection
from datetime import date
from typing import Protocol
from uuid import UUID


class Clock(Protocol):
    def today(self) -> date: ...


class SystemClock:
    def today(self) -> date:
        return date.today()


class FixedClock:
    """A clock stopped on one date: tests, demos and reproducible runs."""

    def __init__(self, today: date) -> None:
        self._today = today

    def today(self) -> date:
        return self._today


class IdAllocator(Protocol):
    """New integer IDs, always above every ID already handed out or imported."""

    def next_customer_id(self) -> int: ...

    def next_loan_id(self) -> int: ...

    def next_loan_ids(self, count: int) -> list[int]:
        """`count` new loan IDs at once (an import re-keys thousands of rows)."""
        ...

    def reserve_customer_ids_through(self, highest: int) -> None: ...

    def reserve_loan_ids_through(self, highest: int) -> int:
        """Move past `highest`; answer the highest loan ID that could have been handed out before
        (no ID above it is held by anyone but the caller, even by a booking still in flight)."""
        ...


class InMemoryIds:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._customer = 0
        self._loan = 0

    def next_customer_id(self) -> int:
        with self._lock:
            self._customer += 1
            return self._customer

    def next_loan_id(self) -> int:
        return self.next_loan_ids(1)[0]

    def next_loan_ids(self, count: int) -> list[int]:
        with self._lock:
            first, self._loan = self._loan + 1, self._loan + count
            return list(range(first, self._loan + 1))

    def reserve_customer_ids_through(self, highest: int) -> None:
        with self._lock:
            self._customer = max(self._customer, highest)

    def reserve_loan_ids_through(self, highest: int) -> int:
        with self._lock:
            before, self._loan = self._loan, max(self._loan, highest)
            return before


class AggregateIndex(Protocol):
    """Which of many aggregates exist, in one question (the import asks for thousands at a time)."""

    def existing(self, ids: Collection[UUID]) -> set[UUID]: ...


class LoanDirectory(Protocol):
    """Imported loans without an aggregate of their own: they live in their customer's history."""

    def owner(self, loan_id: int) -> int | None:
        """The customer whose history holds this loan, if any."""
        ...

    def taken(self, loan_ids: Collection[int]) -> set[int]:
        """Which of these loan IDs some customer's history already holds."""
        ...
