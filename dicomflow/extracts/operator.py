"""What an operator does with the export records (`dicomflow-export` and /api/v1/exports): list a
project's studies, look one up, and re-run failed (retry) or done (force) exports.

A re-run marks the study "requested" in the records and enqueues the service's job again with
what the records kept of it (its queue, timeout, retries, and the Orthanc instance ids of the
push: the worker fetches the files again and reads the headers from them). The job then claims
the study like any other: if another job exports it meanwhile, the re-run finds it done.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import redis
from redis import RedisError
from rq import Queue, Retry

from dicomflow.extracts.deid import Deidentifier
from dicomflow.extracts.errors import ProjectError
from dicomflow.extracts.project import SLUG, ExtractSettings, load_project
from dicomflow.extracts.records import RETRYABLE, ExportStatus, Records, study_key

#: The RQ function every service job runs (worker/runtime.py), as the scheduler enqueues it.
RUNNER = "worker.runtime.run_service_job"
DEFAULT_QUEUE = "low"
DEFAULT_TIMEOUT = 3600


__all__ = ["NotFound", "RedisError", "check_slug", "enqueue", "find_study", "rerun"]


class NotFound(ProjectError):
    """No such project or study in the export records."""


def check_slug(project: str) -> str:
    if not SLUG.match(project):
        raise NotFound(f"{project!r} is not a project slug")
    return project


def find_study(records: Records, settings: ExtractSettings, project: str, study: str) -> dict[str, Any]:
    """A study of the project's records, by its pseudonymised StudyInstanceUID or its original one.

    The original is matched by its keyed hash, which needs the project file and its secret.

    Raises:
        NotFound: no such study (or the original cannot be hashed: the message says why).
    """
    check_slug(project)
    found = records.find(project, study)
    if found is not None:
        return found
    why = ""
    try:
        deid = Deidentifier.for_project(load_project(settings.projects_dir / f"{project}.yaml"))
        found = records.find(project, study, study_hash=study_key(deid, study))
    except ProjectError as exc:
        why = f" (an original StudyInstanceUID cannot be looked up: {exc})"
    if found is None:
        raise NotFound(f"project {project} has no exported study {study}{why}")
    return found


def rerun(records: Records, settings: ExtractSettings, connection: redis.Redis, project: str,
          study: str | None, *, force: bool) -> list[dict[str, Any]]:
    """Re-run the export of one study (or of every re-runnable one of the project).

    Args:
        force: also a study already done (PIXL's "export again"); else only failed, partial
            or requested ones.

    Returns:
        One entry per study queued again: studyId, previousStatus, job (the new RQ job's id).

    Raises:
        NotFound: the study is unknown, or nothing qualifies (the message says why).
    """
    check_slug(project)
    study_ids = None
    if study is not None:
        row = find_study(records, settings, project, study)
        allowed = {s.value for s in (*RETRYABLE, *((ExportStatus.DONE,) if force else ()))}
        if row["status"] not in allowed:
            hint = " (use force to export it again)" if row["status"] == ExportStatus.DONE.value else ""
            raise NotFound(f"{project}/{row['studyId']} is {row['status']}: nothing to re-run{hint}")
        study_ids = [row["studyId"]]
    chosen = records.request_rerun(project, study_ids, force=force)
    if not chosen:
        raise NotFound(f"project {project} has no {'exported' if force else 'failed or partial'} study to re-run")
    return [{"studyId": row["studyId"], "previousStatus": row["previousStatus"],
             "job": enqueue(connection, row["job"], f"{project}/{row['studyId']}")} for row in chosen]


def enqueue(connection: redis.Redis, job: Mapping[str, Any], what: str) -> str:
    """Enqueue the service's job again from its record; the new job's id."""
    name = job.get("jobName") or "deid"
    kwargs = {"jobName": name, "worker": job.get("worker") or f"{name}.worker", "headers": {},
              "params": job.get("params") or {}, "added_params": job.get("added_params") or {},
              "event": job.get("event") or {}}
    intervals = [int(i) for i in job.get("retryIntervals") or []]
    queued = Queue(job.get("queue") or DEFAULT_QUEUE, connection=connection).enqueue(
        RUNNER, kwargs=kwargs, job_id=f"{name}-rerun-{uuid.uuid4().hex}", description=f"{name} re-run of {what}",
        job_timeout=job.get("timeout") or DEFAULT_TIMEOUT,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None)
    return queued.id
