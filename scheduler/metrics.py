"""The pipeline's numbers, read from Redis, RQ and the Orthanc plugin; served at /metrics in Prometheus's format.

Nothing is counted in this process: every figure is read when it is asked for (a scrape or
the status page), from what the scheduler writes in Redis (`keys.STATS`,
`keys.JOBS_ENQUEUED`, the rate buckets), from RQ's queues and registries, from the ChRIS
service's progress records, and from the plugin's `/dicomflow/status` in Orthanc. So the
figures survive a restart of the scheduler, and a second scheduler process reports the same.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import requests
from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from rq import Worker
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from dicomflow import keys
from dicomflow.chris import client as chris_client
from dicomflow.chris import progress
from dicomflow.settings import Settings

bp = Blueprint("metrics", __name__)

#: Every outcome an event can have (scheduler/enqueue.py's EventResult.status), reported even at 0.
OUTCOMES = ("scheduled", "duplicate", "known", "unchanged", "nothing", "invalid")

#: RQ's registries per queue, by the state label they are reported under (`queued` is the list).
REGISTRIES = {
    "deferred": DeferredJobRegistry.key_template,
    "scheduled": ScheduledJobRegistry.key_template,
    "started": StartedJobRegistry.key_template,
    "failed": FailedJobRegistry.key_template,
    "finished": FinishedJobRegistry.key_template,
    "canceled": CanceledJobRegistry.key_template,
}
QUEUE_STATES = ("queued", *REGISTRIES)

#: A job id the scheduler gives: `<jobName>-<12 hex digits of the event>-<8 of the batch>`.
_JOB_ID = re.compile(r"^(?P<name>.+)-[0-9a-f]{12}-[0-9a-f]{8}$")

#: How long the status page and a scrape wait for Orthanc's answer (seconds).
ORTHANC_TIMEOUT = 3.0

#: The plugin's counters (`/dicomflow/status`): metric name (without `dicomflow_plugin_` and
#: `_total`) and help. (Its other counters describe its internals: see `/dicomflow/status`.)
PLUGIN_COUNTERS = {
    "received": ("received", "Instances the plugin captured (stored by Orthanc)."),
    "delivered": ("delivered", "Events the scheduler accepted."),
    "spooled": ("spooled", "Events written to the spool because the scheduler was unreachable or failed."),
    "rejected": ("rejected", "Events the scheduler refused (kept as dead letters)."),
    "failed": ("delivery_failures", "Events whose delivery attempt failed (they stay queued or spooled)."),
    "overflow": ("overflow", "Events moved to the spool because the in-memory queue was full."),
    "batches": ("batches", "Batches the plugin posted."),
    "callbackErrors": ("callback_errors", "Errors inside the plugin's Orthanc callback."),
    "replayed": ("replayed", "Instances read back from Orthanc after a crash."),
}
#: The plugin's gauges: status key -> (metric name, help).
PLUGIN_GAUGES = {
    "queueLength": ("dicomflow_plugin_queue_length", "Events waiting in the plugin's memory queue."),
    "spoolLength": ("dicomflow_plugin_spool_length", "Events waiting in the plugin's on-disk spool."),
    "deadLetters": ("dicomflow_plugin_dead_letters", "Events the scheduler refused, kept in the spool's dead letters."),
}


def plugin_status(settings: Settings) -> tuple[dict[str, Any] | None, str | None]:
    """The plugin's counters from Orthanc's `/dicomflow/status`, or why they are not there.

    Returns:
        (status, None), or (None, a one-line reason: Orthanc unreachable, refused, no plugin).
    """
    auth = (settings.orthanc_username, settings.orthanc_password) if settings.orthanc_username else None
    url = settings.orthanc_url.rstrip("/") + "/dicomflow/status"
    try:
        answer = requests.get(url, auth=auth, timeout=ORTHANC_TIMEOUT)
    except requests.RequestException as exc:
        return None, f"Orthanc at {settings.orthanc_url} is unreachable: {type(exc).__name__}"
    if answer.status_code == 404:
        return None, f"Orthanc at {settings.orthanc_url} answers 404 for /dicomflow/status: the plugin is not loaded"
    if not answer.ok:
        return None, f"Orthanc at {settings.orthanc_url} answered {answer.status_code} for /dicomflow/status"
    try:
        status = answer.json()
    except ValueError:
        return None, f"Orthanc at {settings.orthanc_url} answered /dicomflow/status with something not JSON"
    if not isinstance(status, dict):
        return None, f"Orthanc at {settings.orthanc_url} answered /dicomflow/status with {type(status).__name__}"
    return status, None


def queue_counts(connection: redis.Redis, queues: Sequence[str]) -> dict[str, dict[str, int]]:
    """Jobs per queue and state (`QUEUE_STATES`), in one round trip.

    Registry counts are their sizes as RQ keeps them (entries past their expiry are removed
    by RQ's maintenance, not here).
    """
    pipe = connection.pipeline(transaction=False)
    for name in queues:
        pipe.llen(f"rq:queue:{name}")
        for template in REGISTRIES.values():
            pipe.zcard(template.format(name))
    replies = iter(pipe.execute())
    return {name: {state: int(next(replies)) for state in QUEUE_STATES} for name in queues}


def failed_by_job(connection: redis.Redis, queues: Sequence[str]) -> dict[str, Counter]:
    """Failed jobs per queue and jobName, read from the job ids (no job is fetched)."""
    pipe = connection.pipeline(transaction=False)
    for name in queues:
        pipe.zrange(FailedJobRegistry.key_template.format(name), 0, -1)
    found: dict[str, Counter] = {}
    for name, ids in zip(queues, pipe.execute()):
        found[name] = Counter(job_name(raw.decode()) for raw in ids)
    return found


def job_name(job_id: str) -> str:
    """The jobName of a job id the scheduler gave (the id itself for another one)."""
    match = _JOB_ID.match(job_id)
    return match.group("name") if match else job_id


def rates(connection: redis.Redis, minutes: int = 15, now: float | None = None) -> list[dict[str, float]]:
    """Events and jobs per 10-second bucket over the last `minutes`, oldest first.

    Each item: `start` (unix time), `events`, `jobs` (counts in the bucket). The current,
    unfinished bucket is left out (its rate would read low).
    """
    from scheduler.enqueue import RATE_BUCKET

    now = time.time() if now is None else now
    last = int(now) // RATE_BUCKET - 1
    buckets = list(range(last - minutes * 60 // RATE_BUCKET + 1, last + 1))
    pipe = connection.pipeline(transaction=False)
    for bucket in buckets:
        pipe.hmget(keys.rate_bucket(bucket), "events", "jobs")
    return [{"start": bucket * RATE_BUCKET, "events": int(events or 0), "jobs": int(jobs or 0)}
            for bucket, (events, jobs) in zip(buckets, pipe.execute())]


def per_second(buckets: list[dict[str, float]], what: str, minutes: int) -> float:
    """The mean rate of `what` ("events" or "jobs") over the last `minutes` of `buckets`."""
    from scheduler.enqueue import RATE_BUCKET

    recent = buckets[-(minutes * 60 // RATE_BUCKET):]
    return sum(b[what] for b in recent) / (len(recent) * RATE_BUCKET) if recent else 0.0


def chris_totals(connection: redis.Redis) -> dict[str, Any]:
    """The ChRIS service's progress records summed: series per state, files registered in CUBE,
    instances that failed to store or register (over the series it keeps, `progress.PROGRESS_TTL`)."""
    entries = [e.decode().rsplit("/", 1) for e in connection.zrange(progress.INDEX_KEY, 0, -1)]
    pipe = connection.pipeline(transaction=False)
    for pacs_name, series_uid in entries:
        record = progress.SeriesProgress(connection, pacs_name, series_uid)
        pipe.hmget(record.info_key, "state", "registeredCount")
        pipe.scard(record.registered_key)
        pipe.hlen(record.errors_key)
    replies = iter(pipe.execute())
    states: Counter = Counter({state.value: 0 for state in progress.SeriesState})
    registered = errors = 0
    for _ in entries:
        (state, registered_count), files, failed = next(replies), next(replies), next(replies)
        if state is None:  # expired between the listing and the read
            continue
        states[state.decode()] += 1
        registered += int(registered_count) if registered_count is not None else int(files)
        errors += int(failed)
    return {"series": dict(states), "registered": registered, "errors": errors}


class PipelineCollector:
    """A prometheus-client collector that reads the figures at each scrape (no state of its own)."""

    def __init__(self, state: Any):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        connection, settings = state.connection, state.settings
        pipe = connection.pipeline(transaction=False)
        pipe.hgetall(keys.STATS)
        pipe.hgetall(keys.JOBS_ENQUEUED)
        stats_raw, jobs_raw = pipe.execute()
        stats = {k.decode(): int(v) for k, v in stats_raw.items()}

        events = CounterMetricFamily("dicomflow_events", "Events the scheduler received, by outcome.",
                                     labels=["outcome"])
        for outcome in sorted({*OUTCOMES, *(k.split(":", 1)[1] for k in stats if k.startswith("events:"))}):
            events.add_metric([outcome], stats.get(f"events:{outcome}", 0))
        yield events

        jobs = CounterMetricFamily("dicomflow_jobs_enqueued", "Jobs the scheduler enqueued, by service and job.",
                                   labels=["service", "job"])
        for field, count in sorted(jobs_raw.items()):
            service, _, name = field.decode().partition("/")
            jobs.add_metric([service, name], int(count))
        yield jobs

        depth = GaugeMetricFamily("dicomflow_queue_jobs", "RQ jobs per queue and state (queued is the queue's "
                                  "length; the others are RQ's registries).", labels=["queue", "state"])
        for queue, counts in queue_counts(connection, settings.queues).items():
            for name, count in counts.items():
                depth.add_metric([queue, name], count)
        yield depth

        yield GaugeMetricFamily("dicomflow_workers", "RQ workers registered in Redis.",
                                value=Worker.count(connection=connection))

        registry = state.registry.current()
        switched_off = state.enqueuer.callbacks.report()
        described = registry.describe()
        services = GaugeMetricFamily("dicomflow_service_jobs", "Jobs of the installed services, by state.",
                                     labels=["state"])
        services.add_metric(["active"], len(described["jobs"]) - len(switched_off))
        services.add_metric(["inactive"], len(described["inactive"]))
        services.add_metric(["switched_off"], len(switched_off))
        yield services
        yield GaugeMetricFamily("dicomflow_service_load_problems", "Problems found loading the services.",
                                value=len(described["problems"]))

        yield from self._plugin(settings)

        chris = chris_totals(connection)
        series = GaugeMetricFamily("dicomflow_chris_series", "Series the ChRIS service keeps progress of, by state.",
                                   labels=["state"])
        for name, count in sorted(chris["series"].items()):
            series.add_metric([name], count)
        yield series
        yield GaugeMetricFamily("dicomflow_chris_registered_files",
                                "Files registered in CUBE, summed over the series the ChRIS service keeps.",
                                value=chris["registered"])
        yield GaugeMetricFamily("dicomflow_chris_errors",
                                "Instances that failed to store in or register with CUBE, over the kept series.",
                                value=chris["errors"])
        registrations = CounterMetricFamily(
            "dicomflow_chris_registrations", "Registrations sent to CUBE, by API and outcome (created, already "
            "registered, refused, unavailable after every retry).", labels=["api", "outcome"])
        for field, count in sorted(connection.hgetall(chris_client.COUNTERS_KEY).items()):
            api, _, outcome = field.decode().partition(":")
            registrations.add_metric([api, outcome], int(count))
        yield registrations

    def _plugin(self, settings: Settings) -> Iterator[Metric]:
        status, _reason = plugin_status(settings)
        yield GaugeMetricFamily("dicomflow_plugin_up", "1 if Orthanc's dicomflow plugin answered its status.",
                                value=1 if status is not None else 0)
        if status is None:
            return
        for key, value in status.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in PLUGIN_GAUGES:
                name, doc = PLUGIN_GAUGES[key]
                yield GaugeMetricFamily(name, doc, value=value)
            elif key in PLUGIN_COUNTERS:
                name, doc = PLUGIN_COUNTERS[key]
                yield CounterMetricFamily(f"dicomflow_plugin_{name}", doc, value=value)


def registry_for(state: Any) -> CollectorRegistry:
    """A prometheus-client registry with the pipeline's collector (one per app, no global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(state))
    return registry


@bp.get("/metrics")
def metrics():
    """Every figure above in Prometheus's text exposition format."""
    registry = current_app.extensions.get("dicomflow_metrics")
    if registry is None:
        registry = current_app.extensions["dicomflow_metrics"] = registry_for(current_app.extensions["dicomflow"])
    return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

