"""Read-your-writes: wait until the projection has applied a command's last event.

The projector NOTIFYs its new position in the transaction that moves it, just after the
customers its page changed; one LISTEN connection per API process passes the changes on to the
kept answers (`api.querycache`) and then wakes every waiter the moment that commits.

The processes of one `ledger api` share the highest position any of them has seen
(`SharedPosition`): once one has answered a command, another serves kept answers only when its
own notices have reached that position too, and reads the database until they have.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import time
from collections.abc import Awaitable, Callable, Collection

from psycopg import AsyncConnection

from projections import views
from projections.projector import CHANGES_CHANNEL, NOTIFY_CHANNEL

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # how often the listener compares its position with the read model's
CHECK_TIMEOUT = 5.0  # a check with no answer by then: the connection is taken as dead


class SharedPosition:
    """The highest projection position any process of this server has seen: 8 bytes in a file
    that `ledger api` makes for its workers (LEDGER_API_POSITION_FILE), or this process's own."""

    def __init__(self, path: str | None = None) -> None:
        self._file = open(path, "r+b") if path else None  # noqa: SIM115 (closed by close())
        self._map = mmap.mmap(self._file.fileno(), 8) if self._file else None
        # One aligned 8-byte integer, read and written whole (struct would copy it byte by byte,
        # and a read racing a write could see half of each).
        self._cell: memoryview | list[int] = memoryview(self._map).cast("q") if self._map else [0]

    def get(self) -> int:
        return int(self._cell[0])

    def raise_to(self, position: int) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)  # two processes raising at once must not lower it
        try:
            if self._cell[0] < position:
                self._cell[0] = position
        finally:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        if isinstance(self._cell, memoryview) and self._map is not None and self._file is not None:
            self._cell.release()
            self._map.close()
            self._file.close()


def _awaiting(coro: object) -> list[str]:
    """Where a suspended coroutine is, through everything it awaits."""
    places = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            places.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
    return places


class PositionWatcher:
    def __init__(
        self,
        conninfo: str,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        on_change: Callable[[Collection[int] | None], None] = lambda customer_ids: None,
        shared: SharedPosition | None = None,
        events_table: str = "ledger_events",
    ) -> None:
        self.conninfo = conninfo
        self.events_table = events_table  # the store whose positions the commands wait for
        self.on_reconnect = on_reconnect
        self.on_change = on_change  # the customers a notice names, or None for "anyone"
        self.shared = shared or SharedPosition()
        self.position = 0
        self.connected = False  # a circuit breaker: while the listener is cut off, so is the database
        self._described = -1  # the position the changes notice just before was for
        self._behind: int | None = None  # a read-model position the notices had not reached at the last check
        self._changed = asyncio.Event()
        self._connected_once = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; wait (bounded) for the first connection so requests are not refused at startup."""
        self._task = asyncio.create_task(self._listen(), name="projection-position-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected_once.wait(), wait)

    async def stop(self) -> None:
        """Stop listening. A cancellation can be lost on the way (psycopg_pool's `check()` catches
        it; Python 3.11's `asyncio.wait_for` returns a result that was ready instead of raising
        it), and an API process once went on listening after its shutdown and never exited: the
        loops also check `_stopping`, and the cancellation is repeated until the task has ended."""
        self._stopping = True
        tries = 0
        while self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.5)
            tries += 1
            if tries == 2 and not self._task.done():  # say where, so that the next one can be found
                where = "\n".join(_awaiting(self._task.get_coro()))
                log.warning("projection listener still running 1 s after it was cancelled, at:\n%s", where)

    def current(self) -> bool:
        """Connected, and at least as far as any other process of this server has seen."""
        return self.connected and self.position >= self.shared.get()

    def _set(self, position: int) -> None:
        if position != self.position:
            self.position = position
            self.shared.raise_to(position)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def _notice(self, channel: str, payload: str) -> None:
        if channel == CHANGES_CHANNEL:  # "<position> <id>,<id>,..." or "<position> *"
            described, _, ids = payload.partition(" ")
            self._described = int(described)
            self.on_change(None if ids == "*" else [int(i) for i in ids.split(",") if i])
            return
        position, expected, self._described = int(payload), self._described, -1
        if position == expected:  # a page the projector described: positions only grow (a notice
            self._set(max(self.position, position))  # sent before this connection read the position may come after it)
            return
        # A rebuild, a read model started again, an older projector: everything kept goes, and
        # the position is taken as it is. It can be lower than before: an event store recreated
        # counts from 1 again (the projector announces 0 when it empties the read model, and a
        # rebuild of the new store its own position), and kept at the old store's height every
        # wait would end at once, before the projection shows the command. Taking a position too
        # low only makes waits longer. The shared position is never lowered: after a recreated
        # store this server's processes read the database until the new one passes the old height.
        self.on_change(None)
        self._behind = None  # a position the check saw before may be the old store's
        self._set(position)

    async def _check(self, conn: AsyncConnection) -> None:
        """A backstop: PostgreSQL loses no notice on a live connection, and a reconnection drops
        everything kept, but should the read model ever move without a notice (a writer that
        sends none), a position the notices have not reached one check later (1 to 2 s) is
        taken as lost. The check also finds a connection that died without a word (a dropped NAT
        entry, a host gone): its query gets no answer, and the listener reconnects (503s meanwhile)."""
        async with asyncio.timeout(CHECK_TIMEOUT):
            position = await views.projection_position(conn, self.events_table)
        if position < self.position:  # the read model went back: the event store was recreated, say
            log.warning("the read model is at %d, behind the %d announced: dropping every kept answer", position, self.position)
            self.on_change(None)
            self._behind = None
            self._set(position)
            return
        if self._behind is not None and self.position < self._behind:
            log.warning("projection notices up to %d did not arrive; dropping every kept answer", self._behind)
            self.on_change(None)
            self._set(self._behind)
        self._behind = position if position > self.position else None

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                conn = await AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=5)
                async with conn:
                    # Both at once (one transaction): a page committed between two LISTENs would bring
                    # its position without its changes, taken as it is, below the position read next.
                    await conn.execute(f"LISTEN {CHANGES_CHANNEL}; LISTEN {NOTIFY_CHANNEL}")
                    self.on_change(None)  # whatever was kept may have changed while no one listened
                    self._behind, self._described = None, -1
                    self._set(await views.projection_position(conn, self.events_table))
                    if self._connected_once.is_set() and self.on_reconnect is not None:
                        await self.on_reconnect()  # the database came back: drop connections it broke
                    self.connected = True
                    self._connected_once.set()
                    while not self._stopping:
                        async for notice in conn.notifies(timeout=CHECK_SECONDS):
                            self._notice(notice.channel, notice.payload)
                        await self._check(conn)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database went away: keep trying, waiters time out meanwhile
                self.connected = False
                log.warning("projection listener lost its connection (%s); reconnecting", error)
                await asyncio.sleep(0.5)

    async def wait_for(self, position: int | None, timeout: float) -> bool:
        """True once the read model includes `position`; False if `timeout` passed first."""
        if position is None:
            return True
        deadline = time.monotonic() + timeout
        while self.position < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return True
