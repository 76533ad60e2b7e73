"""Per-customer answers kept between requests, valid for one customer version and one day.

A customer's read-model `version` moves whenever an event changes them or their loans; the
row's table OID changes when a rebuild (or a recreated event store) replaces the tables, which
replays the same versions; and the date-dependent figures (current loans, EMIs due) are keyed by
the day they were computed for. An entry is used only while all three match: a query reads the
version (one indexed row) and skips re-reading and re-scoring the loans when nothing changed. The
version is read before the loans, so an entry can only be newer than its version, never older.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from datetime import date
from typing import Generic, TypeVar

Value = TypeVar("Value")

DEFAULT_SIZE = 20_000


class VersionedCache(Generic[Value]):
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._entries: dict[int, tuple[Hashable, Value]] = {}

    def get(self, customer_id: int, stamp: Hashable) -> Value | None:
        entry = self._entries.get(customer_id)
        if entry is None or entry[0] != stamp:
            return None
        return entry[1]

    def put(self, customer_id: int, stamp: Hashable, value: Value) -> None:
        if self.size <= 0:
            return
        if customer_id not in self._entries and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[customer_id] = (stamp, value)

    async def answer(
        self, customer_id: int, version: tuple[int, int], today: date, compute: Callable[[], Awaitable[Value]]
    ) -> Value:
        """The kept answer for this version and day, or `compute()`'s, kept for next time. A version
        of 0 was written by a projection that does not keep versions, so its answers are not kept."""
        stamp = (version, today)
        value = self.get(customer_id, stamp)
        if value is None:
            value = await compute()
            if version[0] > 0:
                self.put(customer_id, stamp, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
