"""A save that met another writer's: telling it from a fault, and waiting before deciding again."""

from __future__ import annotations

import random
import time

from eventsourcing.persistence import RecordConflictError

SAVE_ATTEMPTS = 200  # a command decides again after each conflict, this many times at most
UNIQUE_VIOLATION = "23505"  # SQLSTATE


def another_writer(error: RecordConflictError) -> bool:
    """Whether a conflict is another writer's: a unique key the save met (an aggregate's version
    recorded first). Any other integrity error (a NOT NULL or CHECK the stored events broke, in a
    store whose schema was changed by hand) is a fault no retry mends, not contention to answer
    503 about after every try. The recorder's error names the database's in its cause."""
    sqlstate = getattr(error.__cause__, "sqlstate", None)
    return sqlstate is None or sqlstate == UNIQUE_VIOLATION


def back_off(attempt: int) -> None:
    """After a version conflict: someone else just saved; let them get clear before reloading."""
    time.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
