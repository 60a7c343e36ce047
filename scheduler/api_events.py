"""The intake endpoint: batches of events from the Orthanc plugin."""

from __future__ import annotations

import json
import logging
import time

from flask import Blueprint, current_app, jsonify, request
from pydantic import ValidationError

from dicomflow import keys
from dicomflow.events import Event

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__, url_prefix="/api/v1")

MAX_BATCH = 10_000


@bp.post("/events")
def receive_events():
    """Plan and enqueue a batch `{"events": [...]}`; one result per event, in order."""
    state = current_app.extensions["dicomflow"]
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return jsonify(error="bad-request", message='expected a JSON object {"events": [...]}'), 400
    raw_events = body["events"]
    if len(raw_events) > MAX_BATCH:
        return jsonify(error="too-large", message=f"at most {MAX_BATCH} events per batch"), 413
    events, slots, invalid = [], [], {}
    for index, raw in enumerate(raw_events):
        try:
            events.append(Event.model_validate(raw))
            slots.append(index)
        except ValidationError as exc:
            invalid[index] = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    if invalid:
        pipe = state.connection.pipeline(transaction=False)
        for index, message in invalid.items():
            pipe.lpush(keys.EVENT_ERRORS, json.dumps({"time": time.time(), "error": message,
                                                      "event": _preview(raw_events[index])}))
        pipe.ltrim(keys.EVENT_ERRORS, 0, state.settings.error_log_length - 1)
        pipe.hincrby(keys.STATS, "events:invalid", len(invalid))
        pipe.execute()
        log.warning("%d invalid events in a batch of %d", len(invalid), len(raw_events))
    registry = state.registry.current()
    planned = state.enqueuer.submit(events, registry) if events else []
    results: list[dict] = [{}] * len(raw_events)
    for index, result in zip(slots, planned):
        results[index] = result.as_dict()
    for index, message in invalid.items():
        results[index] = {"status": "invalid", "errors": [message]}
    return jsonify(results=results)


def _preview(raw) -> object:
    """A bounded copy of a bad event for the error log."""
    text = json.dumps(raw, default=str)
    return raw if len(text) <= 2000 else text[:2000] + "..."
