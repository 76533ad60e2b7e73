"""Read-your-writes: wait until the projection has applied a command's last event.

The projector NOTIFYs its new position in the transaction that moves it; one LISTEN
connection per API process wakes every waiter the moment that commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from psycopg import AsyncConnection

from projections import views
from projections.projector import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class PositionWatcher:
    def __init__(self, conninfo: str, on_reconnect: Callable[[], Awaitable[None]] | None = None) -> None:
        self.conninfo = conninfo
        self.on_reconnect = on_reconnect
        self.position = 0
        self.connected = False  # a circuit breaker: while the listener is cut off, so is the database
        self._changed = asyncio.Event()
        self._connected_once = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; wait (bounded) for the first connection so requests are not refused at startup."""
        self._task = asyncio.create_task(self._listen(), name="projection-position-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected_once.wait(), wait)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set(self, position: int) -> None:
        if position != self.position:
            self.position = position
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def _listen(self) -> None:
        while True:
            try:
                conn = await AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=5)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._set(await views.projection_position(conn))
                    if self._connected_once.is_set() and self.on_reconnect is not None:
                        await self.on_reconnect()  # the database came back: drop connections it broke
                    self.connected = True
                    self._connected_once.set()
                    async for notice in conn.notifies():
                        self._set(max(self.position, int(notice.payload)))
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
