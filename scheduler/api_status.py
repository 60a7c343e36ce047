"""Operator endpoints: health, installed services and their problems, errors, counters, OpenAPI."""

from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, current_app, jsonify, request

from dicomflow import keys

bp = Blueprint("status", __name__)

OPENAPI = Path(__file__).with_name("openapi.json")


@bp.get("/health")
def health():
    """Liveness plus whether Redis answers (no secrets, no patient data: unauthenticated)."""
    state = current_app.extensions["dicomflow"]
    try:
        redis_ok = bool(state.connection.ping())
    except Exception:  # noqa: BLE001 - health must answer whatever Redis does
        redis_ok = False
    return jsonify(status="ok" if redis_ok else "degraded", redis=redis_ok), (200 if redis_ok else 503)


@bp.get("/api/v1/services")
def services():
    """Loaded jobs in planning order, inactive ones and why, load problems, and jobs switched
    off because their callback kept timing out."""
    state = current_app.extensions["dicomflow"]
    return jsonify({**state.registry.current().describe(), "switchedOff": state.enqueuer.callbacks.report()})


@bp.post("/api/v1/services/<job_name>/resume")
def resume_service(job_name: str):
    """Switch a job whose callback kept timing out back on."""
    state = current_app.extensions["dicomflow"]
    if not state.enqueuer.callbacks.resume(job_name):
        return jsonify(error="not-switched-off", message=f"{job_name} is not switched off"), 404
    return jsonify(resumed=job_name)


@bp.get("/api/v1/pushes")
def pushes():
    """Open pushes (series/study deliveries not complete yet) and when the next one completes."""
    return jsonify(current_app.extensions["dicomflow"].completer.status())


@bp.post("/api/v1/services/reload")
def reload_services():
    """Reload the registry now (service.sh calls this after an install)."""
    return jsonify(current_app.extensions["dicomflow"].registry.reload().describe())


@bp.get("/api/v1/errors")
def errors():
    """Recent callback failures and invalid events, newest first (`?limit=N`)."""
    state = current_app.extensions["dicomflow"]
    limit = max(1, min(request.args.get("limit", 100, type=int), state.settings.error_log_length))
    pipe = state.connection.pipeline(transaction=False)
    pipe.lrange(keys.CALLBACK_ERRORS, 0, limit - 1)
    pipe.lrange(keys.EVENT_ERRORS, 0, limit - 1)
    callback_errors, event_errors = pipe.execute()
    return jsonify(callbacks=[json.loads(e) for e in callback_errors],
                   events=[json.loads(e) for e in event_errors])


@bp.get("/api/v1/stats")
def stats():
    """Counters of events by outcome and jobs enqueued since Redis started."""
    state = current_app.extensions["dicomflow"]
    raw = state.connection.hgetall(keys.STATS)
    return jsonify({k.decode(): int(v) for k, v in raw.items()})


@bp.get("/api/v1/openapi.json")
def openapi():
    """The OpenAPI document of this API."""
    return current_app.response_class(OPENAPI.read_text(), mimetype="application/json")
