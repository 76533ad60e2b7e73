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
