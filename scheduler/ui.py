"""The status page at `/`: the pipeline on one server-rendered page, for a person with a browser.

Jinja templates (autoescaped: every DICOM value is shown as text), one stylesheet, a refresh
every few seconds; behind the dashboard's Basic login (scheduler/app.py). It reads what the
scheduler keeps in Redis (the latest events' outcomes, the rate buckets), RQ's registries,
the ChRIS service's progress and the plugin's counters in Orthanc.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

from flask import Blueprint, current_app, render_template, request

from dicomflow import keys
from dicomflow.chris import progress
from dicomflow.repack import progress as repack_progress
from dicomflow.settings import Settings
from scheduler import metrics

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static", static_url_path="/static")

#: Events shown without a search, and at most with one.
SHOWN_EVENTS, MAX_SHOWN = 100, 1000
#: Seconds between the page's own refreshes (`?refresh=0`: none).
REFRESH = 10
#: The event fields a search looks in (a case-insensitive substring of any of them).
SEARCHED = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def links(settings: Settings) -> dict[str, str]:
    """Where the page points a browser: the RQ dashboard and Orthanc Explorer.

    DICOMFLOW_DASHBOARD_URL and DICOMFLOW_ORTHANC_EXPLORER_URL, when the browser reaches them
    by another address than the scheduler does (a proxy, another host name).
    """
    dashboard = settings.config.get("DICOMFLOW_DASHBOARD_URL") or \
        f"http://{settings.dashboard_host}:{settings.dashboard_port}"
    explorer = settings.config.get("DICOMFLOW_ORTHANC_EXPLORER_URL") or \
        settings.orthanc_url.rstrip("/") + "/app/explorer.html"
    return {"dashboard": dashboard.rstrip("/"), "explorer": explorer}


@bp.app_template_filter("when")
def when(value: float | None) -> str:
    """A unix time as local date and time (seconds)."""
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))


@bp.app_template_filter("path")
def path_segment(value: Any) -> str:
    """A value as one URL path segment (or fragment parameter)."""
    return quote(str(value), safe="")


def _matches(record: dict[str, Any], needle: str) -> bool:
    return any(needle in str(record.get(k) or "").lower() for k in SEARCHED)


def recent_events(connection, query: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The latest events' outcomes, newest first, those matching `query` (all without one).

    Returns the events (at most `limit`) and how many outcomes were searched.
    """
    needle = query.strip().lower()
    raw = connection.lrange(keys.RECENT_EVENTS, 0, -1 if needle else limit - 1)
    found: list[dict[str, Any]] = []
    for item in raw:
        record = json.loads(item)
        if needle and not _matches(record, needle):
            continue
        found.append(record)
        if len(found) >= limit:
            break
    return found, len(raw)


def job_states(connection, events: list[dict[str, Any]]) -> dict[str, str]:
    """RQ's status of every job the events name ("expired" once RQ has deleted it)."""
    ids = sorted({jid for event in events for jid in (event.get("jobs") or {}).values()})
    pipe = connection.pipeline(transaction=False)
    for jid in ids:
        pipe.hget(f"rq:job:{jid}", "status")
    return {jid: (status.decode() if status else "expired") for jid, status in zip(ids, pipe.execute())}


def refused_events(connection, query: str, limit: int = 50) -> list[dict[str, Any]]:
    """Events the scheduler refused as malformed (they never reached planning), newest first."""
    needle = query.strip().lower()
    found = []
    for item in connection.lrange(keys.EVENT_ERRORS, 0, -1 if needle else limit - 1):
        record = json.loads(item)
        preview = record.get("event")
        record["preview"] = preview if isinstance(preview, str) else json.dumps(preview, default=str)[:2000]
        if needle and needle not in record["preview"].lower():
            continue
        found.append(record)
        if len(found) >= limit:
            break
    return found


def services(state) -> dict[str, Any]:
    """The registry as the page shows it: each job with its queue, trigger level, dependencies,
    whether it runs and why not, and its failed jobs."""
    described = state.registry.current().describe()
    switched_off = state.enqueuer.callbacks.report()
    failed = metrics.failed_by_job(state.connection, state.settings.queues)
    failed_total: Counter = Counter()
    for per_queue in failed.values():
        failed_total.update(per_queue)
    jobs = []
    for job in described["jobs"]:
        name = job["jobName"]
        off = switched_off.get(name)
        jobs.append({**job, "state": "switched off" if off else "active",
                     "reason": off["reason"] if off else "", "failed": failed_total.pop(name, 0),
                     "failedQueues": [q for q, per in failed.items() if per.get(name)]})
    return {
        "loadedAt": described["loadedAt"], "jobs": jobs, "inactive": described["inactive"],
        "problems": described["problems"], "switchedOff": switched_off,
        # Failed jobs of jobs no longer loaded (a removed or broken service): still to look at.
        "otherFailed": sorted(failed_total.items()),
        "failedQueues": {q: sum(per.values()) for q, per in failed.items()},
    }


def chris_series(connection, query: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ChRIS service's progress: of the latest series, or with a search, of the series of
    the events found (and of a series whose UID is the search)."""
    if not query:
        return progress.recent_series(connection, 50)
    wanted = sorted({str(e["SeriesInstanceUID"]) for e in events if e.get("SeriesInstanceUID")} | {query})[:50]
    return [item for uid in wanted for item in progress.series_senders(connection, uid)]


def repack_series(connection, query: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The repack service's progress: of the latest series, or of the series of the events found."""
    if not query:
        return repack_progress.recent_series(connection, 50)
    wanted = sorted({str(e["SeriesInstanceUID"]) for e in events if e.get("SeriesInstanceUID")} | {query})[:50]
    found = (repack_progress.series_progress(connection, uid) for uid in wanted)
    return [item for item in found if item is not None]


@bp.get("/")
def index():
    """The status page; `?q=` searches the events by patient, study, series or instance."""
    state = current_app.extensions["dicomflow"]
    connection, settings = state.connection, state.settings
    query = request.args.get("q", "").strip()[:200]
    limit = max(1, min(request.args.get("limit", SHOWN_EVENTS, type=int), MAX_SHOWN))
    refresh = request.args.get("refresh", REFRESH, type=int)
    events, searched = recent_events(connection, query, limit)
    plugin, plugin_error = metrics.plugin_status(settings)
    buckets = metrics.rates(connection)
    peak = max([b["events"] for b in buckets] + [b["jobs"] for b in buckets] + [1])
    series = chris_series(connection, query, events)
    repacked = repack_series(connection, query, events)
    stats = {k.decode(): int(v) for k, v in connection.hgetall(keys.STATS).items()}
    return render_template(
        "status.html", query=query, limit=limit, refresh=refresh, events=events, searched=searched,
        states=job_states(connection, events), refused=refused_events(connection, query),
        services=services(state), plugin=plugin, plugin_error=plugin_error, buckets=buckets, peak=peak,
        rates={m: {w: metrics.per_second(buckets, w, m) for w in ("events", "jobs")} for m in (1, 5, 15)},
        queues=metrics.queue_counts(connection, settings.queues), series=series, repacked=repacked, stats=stats,
        links=links(settings), now=time.time(), outcomes=metrics.OUTCOMES,
    )
