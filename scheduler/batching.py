"""Several instances of one series in one job, for services that ask for it (`batchSize`).

A job costs a worker more than its service's own work: RQ's job cycle (dequeue, the started
and finished registries, the result) is ~15 Redis round trips and a few ms of CPU, paid once
per instance. A service whose per-instance work is small next to that — the ChRIS store
(`bench/chris_rate.py`, issue 23) — sets `"batchSize": N` in settings.json: the instances
of one delivery (one batch from the plugin) that belong to the same series and sender are
then planned as jobs of up to N instances each, in the order they arrived. The worker gets
them as `batch` (one item per instance: `headers`, `added_params`, `event`, `dcmpath`) and
`dcmpath` is a folder holding them all.

Everything per event stays per event: each event's callbacks ran for it alone, its run
record names the shared job (so a copy re-sent while the job is queued is a duplicate, and
one re-sent after it finished runs again), and a job that fails is retried as a whole —
the service must make its items idempotent (the built-in ones are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dicomflow.events import Event
from scheduler.planning import PlannedJob


@dataclass
class Chunk:
    """One job's worth of instances of a series, from one sender, for one service job."""

    job_id: str
    planned: PlannedJob
    items: list[dict[str, Any]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    waits_for: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first: Event | None = None


class Batcher:
    """Collects a delivery's instance jobs of batching services into chunks, in arrival order."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, str, str], Chunk] = {}
        self.chunks: list[Chunk] = []

    def add(self, planned: PlannedJob, event: Event, context: dict[str, Any], added_params: dict[str, Any],
            waits_for: list[str], job_id: str) -> str:
        """Put `event`'s job of `planned` into a chunk; returns that chunk's job id (`job_id`
        when it opens a new chunk)."""
        spec = planned.job.spec
        key = (spec.jobName, str(event.headers.get("SeriesInstanceUID") or ""), event.remoteAet or "",
               str(event.orthanc.get("server") or ""))  # the Orthanc that holds it (workers fetch from there)
        chunk = self._open.get(key)
        if chunk is None or len(chunk.items) >= spec.batchSize or chunk.planned.job is not planned.job:
            chunk = Chunk(job_id, planned, first=event)
            self._open[key] = chunk
            self.chunks.append(chunk)
        chunk.items.append({"headers": event.headers, "added_params": added_params, "event": context})
        chunk.events.append(event.key)
        chunk.waits_for.extend(w for w in waits_for if w not in chunk.waits_for)
        chunk.notes.extend(n for n in planned.notes if n not in chunk.notes)
        return chunk.job_id
