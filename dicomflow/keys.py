"""Every Redis key dicomflow writes, under one prefix, defined here only."""

PREFIX = "dicomflow:"


def claim(event_key: str) -> str:
    """Short-lived lock taken while one event is planned (idempotency)."""
    return f"{PREFIX}claim:{event_key}"


def event_run(event_key: str) -> str:
    """JSON object jobName -> RQ job id of the latest run planned for an event key."""
    return f"{PREFIX}run:{event_key}"


def series_state(series_uid: str) -> str:
    """Set of Orthanc instance ids already handed to series-level jobs."""
    return f"{PREFIX}series-state:{series_uid}"


def study_jobs(study_uid: str) -> str:
    """Set of the RQ job ids planned for a study's events (every level): is it all done?"""
    return f"{PREFIX}study-jobs:{study_uid}"


def study_state(study_uid: str) -> str:
    """Set of Orthanc series ids already handed to study-level jobs."""
    return f"{PREFIX}study-state:{study_uid}"


def head_start(job_id: str, enqueued_at: str) -> str:
    """Hash of a head start on one queued run of a job: which worker process holds it, and the
    outcome of each item it began (worker/ahead.py)."""
    return f"{PREFIX}ahead:{job_id}:{enqueued_at}"


CALLBACK_ERRORS = f"{PREFIX}errors:callback"
EVENT_ERRORS = f"{PREFIX}errors:event"
STATS = f"{PREFIX}stats"


def service_key(name: str) -> str:
    """Namespace for a service's own keys: dicomflow:svc:<name>:..."""
    return f"{PREFIX}svc:{name}:"


def push(level: str, sender: str, uid: str) -> str:
    """Hash of one open push (one sender's delivery of a series or study): its id, template event, counts."""
    return f"{PREFIX}push:{level}:{sender}:{uid}"


def push_members(push_key: str) -> str:
    """Set of the Orthanc instance ids an open push delivered."""
    return f"{push_key}:members"


#: Sorted set: open push key -> when it completes (its last instance + the stable age).
PUSHES_DUE = f"{PREFIX}pushes:due"
#: Hash jobName -> JSON reason: services whose callback kept timing out, switched off.
SUSPENDED = f"{PREFIX}callbacks:suspended"

#: List of the latest events' outcomes (JSON, newest first, capped): the status page's "what
#: happened to this study?" (scheduler/enqueue.py writes it, scheduler/ui.py reads it).
RECENT_EVENTS = f"{PREFIX}events:recent"
#: Hash "<service>/<jobName>" -> jobs enqueued since Redis started (the metrics' per-service count).
JOBS_ENQUEUED = f"{PREFIX}stats:jobs"


def rate_bucket(bucket: int) -> str:
    """Hash of the events and jobs counted in one 10-second bucket (`int(time) // 10`), kept an hour."""
    return f"{PREFIX}rate:{bucket}"


def rate_limit(name: str) -> str:
    """Namespace of one shared token bucket (dicomflow.ratelimit): `<ns>bucket` (its state) and
    `<ns>rate` (the rate an operator set at run time), e.g. an export destination's."""
    return f"{PREFIX}ratelimit:{name}:"
