"""Per-study job state: has every service finished with a study? (retention asks before deleting)."""

from __future__ import annotations

from collections import Counter

from flask import Blueprint, current_app, jsonify
from rq.job import Job

from dicomflow import keys

bp = Blueprint("studies", __name__, url_prefix="/api/v1/studies")

#: Job states that mean "a service has not finished with it yet".
PENDING = frozenset({"queued", "started", "deferred", "scheduled"})


@bp.get("/<study_uid>/jobs")
def study_jobs(study_uid: str):
    """The jobs planned for a study's events by state, and `finished`: none is pending or
    failed. A job whose record expired (DICOMFLOW_RESULT_TTL after it finished) counts as done."""
    connection = current_app.extensions["dicomflow"].connection
    job_ids = sorted(j.decode() for j in connection.smembers(keys.study_jobs(study_uid)))
    pipe = connection.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(Job.key_for(job_id), "status")
    states = Counter((s.decode() if s else "expired") for s in pipe.execute())
    pending = sum(n for state, n in states.items() if state in PENDING)
    return jsonify(StudyInstanceUID=study_uid, jobs=dict(states), pending=pending,
                   finished=pending == 0 and states.get("failed", 0) == 0)
