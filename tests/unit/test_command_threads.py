"""Commands run on the API's own threads (api.endpoints.in_thread): their result or their error
comes back, and a caller cancelled meanwhile still waits for the command to end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.endpoints import in_thread


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="command") as executor:
        yield executor


def test_a_call_returns_its_result_from_a_command_thread(threads: ThreadPoolExecutor) -> None:
    result = asyncio.run(in_thread(threads, lambda a, b: (a + b, threading.current_thread().name), 2, 3))
    assert result[0] == 5 and result[1].startswith("command") and result[1] != threading.current_thread().name


def test_a_calls_error_reaches_its_caller(threads: ThreadPoolExecutor) -> None:
    def fails() -> None:
        raise LookupError("no such customer")

    with pytest.raises(LookupError, match="no such customer"):
        asyncio.run(in_thread(threads, fails))


def test_a_cancelled_caller_waits_for_the_call_to_end_then_is_cancelled(threads: ThreadPoolExecutor) -> None:
    release, ended = threading.Event(), threading.Event()

    def command() -> str:
        release.wait(10)
        ended.set()
        return "recorded"

    async def scenario() -> None:
        task = asyncio.create_task(in_thread(threads, command))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done()  # still waiting for the command
        task.cancel()  # a second cancellation is not lost, nor does it cut the wait short
        await asyncio.sleep(0.1)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended.is_set()

    asyncio.run(scenario())
