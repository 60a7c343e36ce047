"""Research export destinations over the API: their rates, changed at run time for every worker
(what `dicomflow-export rate` does; docs/exports.md)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from dicomflow.config import settings_from_config
from dicomflow.extracts.destinations import UnknownDestinationError, rates
from dicomflow.extracts.project import ExtractSettings
from dicomflow.ratelimit import RateLimitError

bp = Blueprint("destinations", __name__, url_prefix="/api/v1/destinations")


def _context():
    state = current_app.extensions["dicomflow"]
    settings = settings_from_config(ExtractSettings, state.settings.config, "extracts")
    return state.connection, settings.projects_dir


@bp.errorhandler(UnknownDestinationError)
def _unknown(exc: UnknownDestinationError):
    return jsonify(error="not-found", message=str(exc)), 404


@bp.errorhandler(RateLimitError)
def _bad_rate(exc: RateLimitError):
    return jsonify(error="bad-request", message=str(exc)), 400


@bp.get("")
def all_rates():
    """Every destination the project files define, with its rate in force, override and configured rates."""
    connection, projects_dir = _context()
    return jsonify(destinations=rates.destination_rates(connection, projects_dir))


@bp.get("/<name>/rate")
def get_rate(name: str):
    """One destination's rate (instances per second, all workers; 0 = no limit)."""
    connection, projects_dir = _context()
    return jsonify(rates.destination_rate(connection, projects_dir, name))


@bp.put("/<name>/rate")
def put_rate(name: str):
    """Change it at run time: `{"rate": 10}`; `{"rate": null}` goes back to the project files' rate."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "rate" not in body or isinstance(body["rate"], bool) or not (
            body["rate"] is None or isinstance(body["rate"], (int, float))):
        return jsonify(error="bad-request", message='expected {"rate": <number >= 0, or null for the default>}'), 400
    connection, projects_dir = _context()
    return jsonify(rates.change_rate(connection, projects_dir, name, body["rate"]))
