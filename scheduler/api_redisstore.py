"""Read endpoints of the built-in redisstore service: a file by name, a search with bytes, counts.

Off (404 ``not-configured``) until REDIS_STORE_URL is set; the store's client is made on
first use and kept in ``app.extensions["redisstore"]``.
"""

from __future__ import annotations

import base64
import threading

from flask import Blueprint, Response, current_app, jsonify, request

from dicomflow.errors import ConfigError
from dicomflow.redisstore import NotFoundError, RedisStore, RedisStoreError, StoreSettings
from dicomflow.redisstore.errors import AmbiguousError
from dicomflow.redisstore.model import RANGED
from dicomflow.redisstore.query import parse_date_range

bp = Blueprint("redisstore", __name__, url_prefix="/api/v1/redisstore")

#: Query parameters that are options, not filters.
OPTIONS = ("limit", "with_bytes", "by")
_lock = threading.Lock()


class NotConfigured(Exception):
    """REDIS_STORE_URL is not set."""


def _store() -> RedisStore:
    store = current_app.extensions.get("redisstore")
    if store is not None:
        return store
    with _lock:
        store = current_app.extensions.get("redisstore")
        if store is None:
            state = current_app.extensions["dicomflow"]
            if not str(state.settings.config.get("REDIS_STORE_URL", "")).strip():
                raise NotConfigured()
            settings = StoreSettings.from_config(state.settings.config)
            store = RedisStore.from_settings(settings, health_check_interval=30)
            if not settings.allow_queue_db:
                store.check_not_queue(state.connection)
            current_app.extensions["redisstore"] = store
    return store


def _filters() -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Query parameters: a date field (StudyDate, PatientBirthDate) is a range (YYYY[MM[DD]][-...]),
    every other one an equality."""
    eq, ranges = {}, {}
    for name, value in request.args.items():
        if name in OPTIONS:
            continue
        if name in RANGED:
            ranges[name] = parse_date_range(value)
        else:
            eq[name] = value
    return eq, ranges


@bp.errorhandler(NotConfigured)
def _not_configured(exc):
    return jsonify(error="not-configured", message="the redisstore service is off: set REDIS_STORE_URL"), 404


@bp.errorhandler(NotFoundError)
def _not_found(exc):
    return jsonify(error="not-found", message=str(exc)), 404


@bp.errorhandler(AmbiguousError)
def _ambiguous(exc):
    return jsonify(error="ambiguous", message=str(exc)), 409


@bp.errorhandler(ValueError)
def _bad_request(exc):
    return jsonify(error="bad-request", message=str(exc)), 400


@bp.errorhandler(ConfigError)
def _config(exc):
    return jsonify(error="misconfigured", message=str(exc)), 503


@bp.errorhandler(RedisStoreError)
def _store_error(exc):
    return jsonify(error="store-error", message=str(exc)), 500


def _file(found) -> Response:
    return Response(found.data, mimetype="application/dicom", headers={
        "Content-Disposition": f'attachment; filename="{found.file_name}"', "X-SOPInstanceUID": found.sop,
        "X-SHA256": found.doc["sha256"]})


@bp.get("/files/<path:file_name>")
def by_name(file_name: str):
    """Scenario 1: the bytes of a file by its name (application/dicom, SHA-256 verified)."""
    return _file(_store().get(file_name=file_name))


@bp.get("/instances/<sop>")
def by_sop(sop: str):
    """The bytes of an instance by its SOPInstanceUID; `?metadata=1`: its document instead."""
    if request.args.get("metadata"):
        return jsonify(_store().document(sop))
    return _file(_store().get(sop))


@bp.get("/find")
def find():
    """Scenario 2: `?ProtocolName=X&StudyDate=2013&with_bytes=1&limit=N` -> `{"total", "instances": [doc + "data"
    (base64) with with_bytes]}`; every parameter but limit/with_bytes is a filter (AND)."""
    eq, ranges = _filters()
    limit = max(0, request.args.get("limit", 0, type=int))
    with_bytes = request.args.get("with_bytes", "") not in ("", "0", "false")
    total, found = _store().find(eq, ranges, limit=limit, with_bytes=with_bytes)
    items = []
    for inst in found:
        item = {"SOPInstanceUID": inst.sop, **inst.doc}
        if with_bytes:
            item["data"] = base64.b64encode(inst.data).decode("ascii")
        items.append(item)
    return jsonify(total=total, instances=items)


@bp.get("/count")
def count():
    """Scenario 3: `?by=ProtocolName` (+ filters) -> `{"by", "counts": {value: n}}`, largest first."""
    by = request.args.get("by")
    if not by:
        raise ValueError("give ?by=FIELD")
    eq, ranges = _filters()
    return jsonify(by=by, counts=_store().count(by, eq, ranges))


@bp.get("/stats")
def stats():
    """Instances, bytes and the store Redis's memory."""
    return jsonify(_store().stats())
