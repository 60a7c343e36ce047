"""Operator and client endpoints of the built-in ChRIS service: series progress, CUBE rate limit."""

from __future__ import annotations

import math

from flask import Blueprint, current_app, jsonify, request

from dicomflow.chris import progress, ratelimit

bp = Blueprint("chris", __name__, url_prefix="/api/v1/chris")


@bp.get("/series")
def recent():
    """The progress of the most recently active series, newest first (`?limit=N`, at most 500)."""
    limit = max(1, min(request.args.get("limit", 50, type=int), 500))
    return jsonify(series=progress.recent_series(current_app.extensions["dicomflow"].connection, limit))


@bp.get("/series/<series_uid>")
def one(series_uid: str):
    """Announced, stored and registered counts and errors of one series, per PACS that sent it
    (`{"SeriesInstanceUID": ..., "pacs": [...]}`; `?pacs_name=X`: that one's progress alone)."""
    connection = current_app.extensions["dicomflow"].connection
    pacs_name = request.args.get("pacs_name")
    if pacs_name:
        found = progress.series_progress(connection, pacs_name, series_uid)
        if found is None:
            return jsonify(error="not-found", message=f"no ChRIS progress for series {series_uid} "
                                                      f"from {pacs_name}"), 404
        return jsonify(found)
    senders = progress.series_senders(connection, series_uid)
    if not senders:
        return jsonify(error="not-found", message=f"no ChRIS progress for series {series_uid}"), 404
    return jsonify(SeriesInstanceUID=series_uid, pacs=senders)


@bp.get("/rate-limit")
def get_rate():
    """The request rate to CUBE (per second, all workers; 0 = unlimited) in force now."""
    state = current_app.extensions["dicomflow"]
    try:
        configured = float(state.settings.config.get("CHRIS_RATE_LIMIT") or 0)
    except ValueError:
        configured = 0.0
    return jsonify(rate=ratelimit.current_rate(state.connection, configured), configured=configured)


@bp.put("/rate-limit")
def set_rate():
    """Change the rate at run time: `{"rate": 20}`; `{"rate": null}` goes back to CHRIS_RATE_LIMIT."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "rate" not in body or not (
            body["rate"] is None or (isinstance(body["rate"], (int, float)) and 0 <= body["rate"] < math.inf)):
        return jsonify(error="bad-request", message='expected {"rate": <number >= 0 or null>}'), 400
    state = current_app.extensions["dicomflow"]
    ratelimit.set_rate(state.connection, body["rate"])
    return get_rate()
