"""The scheduler's Flask application factory."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from dicomflow.settings import Settings
from scheduler.enqueue import Enqueuer, EventsBusy
from scheduler.pushes import Completer
from scheduler.registry import RegistryHolder

log = logging.getLogger(__name__)

#: The largest request body the scheduler reads (MiB), unless DICOMFLOW_SCHEDULER_MAX_BODY_MB
#: says otherwise. A batch of the plugin's 1000 instance events is ~1.3 MB; a study event
#: lists ~41 bytes per instance id.
MAX_BODY_MB = 64

#: Seconds a client should wait when Redis is full (the plugin's longest retry pause).
REDIS_FULL_RETRY_AFTER = 30


@dataclass
class SchedulerState:
    """What the blueprints share, kept in `app.extensions["dicomflow"]`."""

    settings: Settings
    connection: redis.Redis
    registry: RegistryHolder
    enqueuer: Enqueuer
    #: Fires completed pushes; its thread is started by the serving process (`start_background`).
    completer: Completer


def create_app(settings: Settings, connection: redis.Redis | None = None) -> Flask:
    """Build the scheduler app.

    Args:
        settings: the core settings; `scheduler_token` must be set (no anonymous intake).
        connection: a Redis client (default: one from `settings.redis_url`).
    """
    if not settings.scheduler_token:
        from dicomflow.errors import ConfigError
        raise ConfigError("DICOMFLOW_SCHEDULER_TOKEN is empty: the scheduler refuses to run without a token")
    app = Flask(__name__, static_folder=None)  # scheduler/static is the status page's (ui.bp), behind its login
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = _max_body(settings.config)
    connection = connection or redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    holder = RegistryHolder(settings.services_dir / "registry", settings.queues, settings.config,
                            poll_interval=settings.registry_poll)
    enqueuer = Enqueuer(connection, settings)
    completer = Completer(connection, enqueuer, holder, settings.push_poll)
    app.extensions["dicomflow"] = SchedulerState(settings, connection, holder, enqueuer, completer)

    from scheduler import api_chris, api_events, api_status, api_studies, metrics, ui
    app.register_blueprint(api_events.bp)
    app.register_blueprint(api_status.bp)
    app.register_blueprint(api_chris.bp)
    app.register_blueprint(api_studies.bp)
    from scheduler import api_redisstore
    app.register_blueprint(api_redisstore.bp)
    from scheduler import api_exports
    app.register_blueprint(api_exports.bp)
    from scheduler import api_destinations
    app.register_blueprint(api_destinations.bp)
    # For people and Prometheus: the dashboard's login (HTTP Basic), not the plugin's token.
    app.register_blueprint(ui.bp)
    app.register_blueprint(metrics.bp)

    @app.before_request
    def _authenticate():
        if request.endpoint in ("status.health", "status.openapi") or request.endpoint is None:
            return None
        if request.blueprint in LOGIN_BLUEPRINTS:
            return _login(settings)
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {settings.scheduler_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return jsonify(error="unauthorized", message="missing or wrong bearer token"), 401
        return None

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: redis.RedisError):
        if _redis_full(exc):
            # Redis refuses writes (maxmemory, noeviction): nothing of the batch was written
            # (the batch's write is one script, refused at its first write). 503: the plugin
            # keeps the batch in its spool and sends it again.
            log.error("Redis is full, events refused until it has room: %s", exc)
            return (jsonify(error="redis-full", message=f"Redis is out of memory (maxmemory): {exc}"), 503,
                    {"Retry-After": str(REDIS_FULL_RETRY_AFTER)})
        log.error("Redis unavailable: %s", exc)
        return jsonify(error="redis-unavailable", message=f"Redis is unavailable: {exc}"), 503

    @app.errorhandler(EventsBusy)
    def _busy(exc: EventsBusy):
        # 503: the plugin keeps the batch in its spool and sends it again after a pause.
        return jsonify(error="busy", message=str(exc)), 503, {"Retry-After": "1"}

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return jsonify(error="too-large", message=f"the request body is larger than {limit // 2**20} MiB "
                       "(DICOMFLOW_SCHEDULER_MAX_BODY_MB)"), 413

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify(error=exc.name.lower().replace(" ", "-"), message=exc.description), exc.code

    return app


#: The blueprints behind the dashboard's login (the status page, /metrics) instead of the token.
LOGIN_BLUEPRINTS = ("ui", "metrics")


def _login(settings: Settings) -> Response | None:
    """None if the request carries the dashboard's credentials (HTTP Basic), else a 401 that
    asks the browser for them. Without a dashboard password nobody gets in."""
    auth = request.authorization
    if settings.dashboard_password and auth is not None and auth.type == "basic":
        user_ok = hmac.compare_digest((auth.username or "").encode(), settings.dashboard_username.encode())
        password_ok = hmac.compare_digest((auth.password or "").encode(), settings.dashboard_password.encode())
        if user_ok and password_ok:
            return None
    message = "log in with the dashboard's user and password (DICOMFLOW_DASHBOARD_USERNAME/PASSWORD)\n"
    if not settings.dashboard_password:
        message = "the status page and /metrics need DICOMFLOW_DASHBOARD_PASSWORD set\n"
    return Response(message, 401, {"WWW-Authenticate": 'Basic realm="dicomflow", charset="UTF-8"'},
                    mimetype="text/plain")


def _max_body(config) -> int:
    """MAX_CONTENT_LENGTH in bytes, from DICOMFLOW_SCHEDULER_MAX_BODY_MB (whole MiB)."""
    raw = str(config.get("DICOMFLOW_SCHEDULER_MAX_BODY_MB", "") or MAX_BODY_MB).strip()
    if not raw.isdigit() or int(raw) < 1:
        from dicomflow.errors import ConfigError
        raise ConfigError(f"DICOMFLOW_SCHEDULER_MAX_BODY_MB must be a whole number of MiB >= 1, not {raw!r}")
    return int(raw) * 2**20


def _redis_full(exc: redis.RedisError) -> bool:
    """Whether Redis refused a write for want of memory: redis-py's OutOfMemoryError (an OOM
    reply, also from a write inside a script), or the text Redis 6 wraps into a script's error."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "used memory > 'maxmemory'" in str(exc)


def start_background(app: Flask) -> None:
    """Start what the scheduler runs besides requests (in the process that serves them)."""
    app.extensions["dicomflow"].completer.start()
