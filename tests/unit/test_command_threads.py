"""Commands run on the API's own threads (api.endpoints.in_thread): their result or their error
comes back in the caller's context, and a cancelled caller is cancelled as Starlette's threadpool
cancels it: a call still waiting for a thread never runs, a running one finishes on its thread."""

from __future__ import annotations

import asyncio
import contextvars
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


def test_a_call_runs_in_its_callers_context(threads: ThreadPoolExecutor) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")

    async def scenario() -> str:
        request_id.set("r-1")
        return await in_thread(threads, request_id.get)

    assert asyncio.run(scenario()) == "r-1"


def test_a_caller_cancelled_while_its_call_runs_is_cancelled_at_once_and_the_call_finishes(threads: ThreadPoolExecutor) -> None:
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def command() -> str:
        started.set()
        release.wait(10)
        ended.set()
        return "recorded"

    async def scenario() -> None:
        task = asyncio.create_task(in_thread(threads, command))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        assert not ended.is_set()  # still running on its thread
        release.set()

    asyncio.run(scenario())
    assert ended.wait(5)


def test_a_call_cancelled_before_a_thread_is_free_never_runs() -> None:
    release = threading.Event()
    ran: list[str] = []

    async def scenario(threads: ThreadPoolExecutor) -> None:
        busy = asyncio.create_task(in_thread(threads, lambda: release.wait(10)))
        queued = asyncio.create_task(in_thread(threads, lambda: ran.append("queued")))
        await asyncio.sleep(0.1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await busy is True

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="command") as one:
        asyncio.run(scenario(one))
    assert ran == []
