"""One import job, start to finish: read both files, then replay them through the ledger.

The Celery task runs this in a worker; `ledger init` runs it in-process (a container's
one-shot init has no worker yet). Both hold the import lock (`infra.postgres.exclusive`) around it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from infra.xlsx import read_history
from ledger.application import Ledger
from ledger.domain import ImportFilesChanged
from ledger.history import UnreadableFile


def run_import(
    app: Ledger,
    job_id: UUID,
    customers_path: Path,
    loans_path: Path,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
    *,
    settle: Callable[[], object] | None = None,
    split_size: int | None = None,
) -> dict[str, Any]:
    """`settle` brings the read model up to date before the import checks its loan IDs against it
    (an earlier import's last loans may still be on their way there). A loan sheet of `split_size`
    bytes of XML or more is read in two processes (`infra.xlsx_split`; None: its default)."""
    job = app.get_import_job(job_id)
    if job.finished:  # delivered again after it finished: nothing to do
        return {"state": job.state}
    with _no_full_collections():
        try:
            digest = files_digest(customers_path, loans_path)
            customers, loans, issues = read_history(customers_path, loans_path, split_size=split_size)
            if files_digest(customers_path, loans_path) != digest:
                raise UnreadableFile(
                    f"{customers_path.name} or {loans_path.name} changed while it was being read: import it again"
                )
            if settle is not None:
                settle()
            report = app.import_history(
                job_id, customers, loans, issues, batch_size=batch_size, on_batch=on_batch, files_digest=digest
            )
        except (UnreadableFile, ImportFilesChanged) as refused:
            app.fail_import(job_id, str(refused))
            return {"state": "failed", "error": str(refused)}
    return {"state": "completed", **report.summary()}


def files_digest(*paths: Path) -> str:
    """SHA-256 of the files' digests: what a run resuming an import checks it reads the same files
    by. About 0.1 s for the 55 MB of 100,000 customers and a million loans. "" when a file cannot
    be opened: the reader then says why."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            # Not blocking, and a regular file only: a name that became a pipe since it was queued
            # held the worker, and every import after it, until someone wrote to it (from a review).
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return ""
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                return ""
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


@contextmanager
def _no_full_collections() -> Iterator[None]:
    """Python's full garbage collection walks every object the import holds, a million loan rows
    among them: 27 walks, about 7 s of a 100,000-customer import's writing. The young generations
    still collect as usual; the full collection runs once, when the import ends."""
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000_000)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, full)
        gc.collect()
