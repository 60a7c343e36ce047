"""RQ job hashes for planned jobs, filled into one template per service job.

Building an RQ `Job` and calling `Job.save` for every job was two thirds of the scheduler's
CPU per event (`bench/scheduler.py`), most of it in `zlib.compress` of each job's data:
setting up a deflate stream costs ~10 µs, whatever the size, and each event makes one job
per service. Every CPU cycle the scheduler spends is taken from Orthanc's ingest on a small
host (`bench/ingest.py`).

So the scheduler writes the hash itself, from a template: RQ's own `Job.to_dict()` of a job
made with the service job's settings (queue, timeouts, TTLs, retries, dependency policy),
minus the fields that differ per job (`PER_JOB`), which are set here with RQ's encodings.
Every field RQ writes is therefore there, encoded by RQ. One difference: `data` is stored
as RQ's serializer gives it, without zlib. RQ reads both forms (`Job.restore` falls back to
the raw bytes when zlib cannot decompress them, and a pickle never starts with a zlib
header); a job takes ~0.5 KB more memory in Redis until it expires. Another: the fields
RQ writes as "" (unset: started_at, ended_at, worker_name, the callbacks' names, ...) are
left out, as `Job.restore` reads a missing field as unset; RQ's worker sets them when it
runs the job. That is 9 of a queued job's 18 fields: ~10 % of the bytes Redis appends to
its append-only file per event, and ~1 KB of memory per event. The test suite compares these
hashes with what RQ writes for the same job, field by field, and RQ's reading of both, so
an RQ upgrade that changes the format fails there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Retry
from rq.job import Dependency, Job, JobStatus

from dicomflow.settings import Settings
from scheduler.registry import LoadedJob

#: The function every job runs on the worker side; it resolves the service's worker.
RUNNER = "worker.runtime.run_service_job"

#: Fields set per job; the template holds all the others.
PER_JOB = ("created_at", "enqueued_at", "data", "description", "meta", "dependency_id", "dependency_ids")


@dataclass(frozen=True)
class _Template:
    job: LoadedJob  # kept so that its id() stays unique while the template is cached
    fields: dict[str, Any]


class JobHashes:
    """The hashes of a scheduler's jobs; templates are cached per loaded service job."""

    def __init__(self, connection: Redis, settings: Settings):
        self.connection = connection
        self.settings = settings
        self._templates: dict[tuple[int, bool], _Template] = {}
        self.serializer = Job(connection=connection).serializer

    def template(self, loaded: LoadedJob, deferred: bool) -> dict[str, Any]:
        """RQ's fields for a job of `loaded`, queued or deferred, without the per-job ones."""
        key = (id(loaded), deferred)
        cached = self._templates.get(key)
        if cached is not None and cached.job is loaded:
            return cached.fields
        if len(self._templates) > 512:  # services were reloaded many times: drop the old ones
            self._templates.clear()
        fields = self._template_job(loaded, deferred).to_dict()
        for name in PER_JOB:
            fields.pop(name, None)
        # RQ writes "" for what is unset (started_at, worker_name, the callbacks, ...) and
        # reads a missing field the same way (`Job.restore` takes `obj.get(name)`): left out.
        fields = {name: value for name, value in fields.items() if value != ""}
        odd = {name: value for name, value in fields.items()
               if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float))}
        if odd:  # the batch script takes strings and numbers only (redis-py would refuse the rest too)
            raise TypeError(f"RQ's job fields {odd} are neither strings nor numbers")
        self._templates[key] = _Template(loaded, fields)
        return fields

    def _template_job(self, loaded: LoadedJob, deferred: bool) -> Job:
        """The RQ `Job` RQ's own API makes for a job of `loaded` (its per-job fields are dropped)."""
        spec, settings = loaded.spec, self.settings
        return Job.create(
            RUNNER, connection=self.connection, id="template", origin=spec.priority,
            status=JobStatus.DEFERRED if deferred else JobStatus.QUEUED,
            timeout=spec.timeout or settings.default_timeout,
            result_ttl=settings.result_ttl, failure_ttl=settings.failure_ttl,
            retry=Retry(max=spec.retry.max, interval=spec.retry.interval) if spec.retry else None,
            depends_on=Dependency(jobs=["dependency"], allow_failure=spec.runOnDependencyFailure)
            if deferred else None,
        )

    def mapping(self, loaded: LoadedJob, kwargs: dict[str, Any], description: str, meta: dict[str, Any],
                depends_on: Sequence[str], stamp: str) -> dict[str, Any]:
        """The hash of one job: queued when `depends_on` is empty, deferred otherwise.

        `stamp` is its creation time (and, for a queued job, its enqueue time) in RQ's format
        (`rq.utils.utcformat`).
        """
        fields = dict(self.template(loaded, bool(depends_on)))
        fields["created_at"] = stamp
        fields["data"] = self.serializer.dumps((RUNNER, None, (), kwargs))
        fields["description"] = description
        fields["meta"] = self.serializer.dumps(meta)
        if depends_on:
            fields["dependency_id"] = depends_on[0]
            fields["dependency_ids"] = json.dumps(list(depends_on))
        else:
            fields["enqueued_at"] = stamp
        return fields
