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

#: How deeply a batch may nest (the body is 1, its events list 2, an event 3, its headers 4).
#: Orthanc's JSON of a DICOM sequence adds two levels per nesting: 100 leaves ~48 for those.
#: Deeper bodies would exhaust Python's recursion when copied or pickled for the jobs (500s).
MAX_DEPTH = 100


@bp.post("/events")
def receive_events():
    """Plan and enqueue a batch `{"events": [...]}`; one result per event, in order."""
    state = current_app.extensions["dicomflow"]
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json's decoder gives up on ~1000 levels; silent=True catches only ValueError
        body = None
        too_deep = True
    else:
        too_deep = body is not None and _deeper_than(body, MAX_DEPTH)
    if too_deep:
        return jsonify(error="bad-request", message=f"the JSON body nests deeper than {MAX_DEPTH} levels"), 400
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
            invalid[index] = "; ".join(_error_text(e) for e in exc.errors())
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


def _error_text(error: dict) -> str:
    """One pydantic error as `field: message` (just the message for the whole event)."""
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _deeper_than(value: object, limit: int) -> bool:
    """Whether `value` (parsed JSON) nests deeper than `limit` levels; level by level, no
    recursion (~1.5 ms for a batch of 1000 events as the plugin sends them)."""
    level, depth = ([value] if type(value) is dict or type(value) is list else []), 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list = []
        for item in level:
            children = item.values() if type(item) is dict else item
            below += [c for c in children if type(c) is dict or type(c) is list]
        level = below
    return False
