"""Where a study's export for a project stands (the export records' states), importable without a database."""

from __future__ import annotations

from enum import Enum


class ExportStatus(str, Enum):
    """Where a study's export for a project stands."""

    EXPORTING = "exporting"   # claimed by a job, being exported now
    DONE = "done"             # every file confirmed by every destination
    PARTIAL = "partial"       # some files failed (named in failed_files); re-runnable
    FAILED = "failed"         # nothing went out (reason says why); re-runnable
    REQUESTED = "requested"   # an operator asked for a re-run (retry / force); the job is queued
