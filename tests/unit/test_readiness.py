"""How `/ready` tells a stalled projection from a busy one."""

from __future__ import annotations

from api.endpoints import ProjectionProgress


def test_a_projection_is_stalled_only_while_behind_at_one_position() -> None:
    seen = ProjectionProgress()
    assert seen.stalled_for(10, behind=True, now=100.0) == 0.0  # first seen behind there
    assert seen.stalled_for(10, behind=True, now=130.0) == 30.0  # still there
    assert seen.stalled_for(12, behind=True, now=131.0) == 0.0  # it moved: busy, not stalled
    assert seen.stalled_for(12, behind=True, now=141.5) == 10.5
    assert seen.stalled_for(12, behind=False, now=150.0) == 0.0  # caught up
    # Behind again at the position it caught up at: counted from now, not from when it was last seen there.
    assert seen.stalled_for(12, behind=True, now=500.0) == 0.0
    assert seen.stalled_for(12, behind=True, now=501.0) == 1.0


def test_callers_that_come_while_a_shared_call_runs_share_its_one_run_and_its_error() -> None:
    """Twenty /ready requests at once each pinged Celery's workers, and each held one of its ten
    pooled broker connections while waiting for another: the API process hung for good."""
    import asyncio
    import threading

    from api.endpoints import Shared

    runs: list[int] = []
    release = threading.Event()

    def probe() -> int:
        runs.append(1)
        release.wait(5)
        return len(runs)

    def failing() -> int:
        raise ConnectionError("broker gone")

    async def scenario() -> tuple[list[int], list[BaseException | int]]:
        shared: Shared[int] = Shared()
        callers = [asyncio.ensure_future(shared.result(probe)) for _ in range(40)]
        await asyncio.sleep(0.05)
        callers[0].cancel()  # a client that went away: the others still get the run's answer
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(*callers[1:])
        again = await shared.result(probe)  # a later caller gets a run of its own
        failed = await asyncio.gather(*(shared.result(failing) for _ in range(3)), return_exceptions=True)
        return [*answers, again], failed

    answers, failed = asyncio.run(scenario())
    assert answers == [1] * 39 + [2] and len(runs) == 2
    assert all(isinstance(error, ConnectionError) for error in failed)
