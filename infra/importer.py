"""One import job, start to finish: read both files, then replay them through the ledger.

The Celery task runs this in a worker; `ledger init` runs it in-process (a container's
one-shot init has no worker yet).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from infra.xlsx import read_history
from ledger.application import Ledger
from ledger.history import UnreadableFile


def run_import(
    app: Ledger,
    job_id: UUID,
    customers_path: Path,
    loans_path: Path,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    job = app.get_import_job(job_id)
    if job.finished:  # delivered again after it finished: nothing to do
        return {"state": job.state}
    try:
        customers, loans, issues = read_history(customers_path, loans_path)
    except UnreadableFile as unreadable:
        app.fail_import(job_id, str(unreadable))
        return {"state": "failed", "error": str(unreadable)}
    report = app.import_history(job_id, customers, loans, issues, batch_size=batch_size, on_batch=on_batch)
    return {"state": "completed", **report.summary()}
