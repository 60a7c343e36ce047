"""The RQ dashboard, behind HTTP Basic authentication, served by gunicorn on loopback.

rq-dashboard 0.9.0 (pinned) is used as it is, with one view replaced: its job data view
(`/<instance>/data/job/<id>.json`, the data of the job page) decodes `Job.dependency_ids`
as bytes, and rq 2 returns them as str, so the page of every job that depends on another
stayed blank (HTTP 500, `'str' object has no attribute 'decode'`; rq-dashboard issue #522,
fixed upstream after 0.9.0). `job_info` below is that view with the ids taken as they come,
and with the job's texts HTML-escaped: the job page's template inserts them unescaped
(`<%= %>`) while they can hold DICOM values (a description names the UID, an exception
message may quote a header). docs/observability.md says the same for operators.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import click
from flask import Flask, Response, current_app, jsonify, request
from markupsafe import escape

from dicomflow.config import load_config
from dicomflow import logformat
from dicomflow.errors import ConfigError
from dicomflow.settings import Settings
from dicomflow.wsgi import serve

#: The endpoint `job_info` replaces.
JOB_INFO = "rq_dashboard.job_info"


def create_dashboard(settings: Settings) -> Flask:
    """rq-dashboard's app on our Redis, behind the dashboard's login; refuses to run without a password."""
    if not settings.dashboard_password:
        raise ConfigError("DICOMFLOW_DASHBOARD_PASSWORD is empty: the dashboard refuses to run without one")
    # rq_dashboard imports six (0.9.0 does not declare it).
    from rq_dashboard import default_settings
    from rq_dashboard.web import blueprint, setup_rq_connection

    # Not rq_dashboard.cli.make_flask_app: its login is a before_request added to the
    # module-wide blueprint on every call (a second app would also ask for the first's
    # password), and it compares passwords with `!=`.
    app = Flask("rq_dashboard")  # its templates use the app's static files (rq_dashboard/static), as its CLI's app
    app.config.from_object(default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = [settings.redis_url]  # it indexes a list of instances
    app.register_blueprint(blueprint, url_prefix="")
    # The views without an instance number (requeue, delete) use the app's connection, which
    # 0.9.0 sets only in its own CLI: without this, a requeue before any other page failed.
    setup_rq_connection(app)
    if JOB_INFO not in app.view_functions:
        raise RuntimeError(f"rq-dashboard has no {JOB_INFO} view: check the fix in dicomflow/dashboard.py")
    app.view_functions[JOB_INFO] = job_info

    username, password = settings.dashboard_username.encode(), settings.dashboard_password.encode()

    @app.before_request
    def _login():
        auth = request.authorization
        if auth is not None and auth.type == "basic":
            user_ok = hmac.compare_digest((auth.username or "").encode(), username)
            password_ok = hmac.compare_digest((auth.password or "").encode(), password)
            if user_ok and password_ok:
                return None
        return Response("Please log in\n", 401, {"WWW-Authenticate": 'Basic realm="RQ Dashboard"'},
                        mimetype="text/plain")

    return app


def job_info(instance_number: int, job_id: str):
    """rq-dashboard 0.9.0's `job_info` for rq 2: dependency ids are str; texts are escaped."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    from rq_dashboard.web import config, format_job_description, serialize_date

    connection = current_app.redis_conn
    try:
        job = Job.fetch(job_id, serializer=config.serializer, connection=connection)
    except NoSuchJobError:
        return jsonify(error="not-found", message=f"no job {job_id}"), 404, {"Cache-Control": "no-store"}
    latest_result = job.latest_result()
    json_encoder = current_app.config.get("RQ_DASHBOARD_JSON_ENCODER", json.JSONEncoder)
    result: dict[str, Any] = dict(
        id=job.id,
        created_at=serialize_date(job.created_at),
        enqueued_at=serialize_date(job.enqueued_at),
        started_at=serialize_date(job.started_at),
        ended_at=serialize_date(job.ended_at),
        origin=_escaped(job.origin),
        status=job.get_status(),
        result=_escaped(job.return_value()),
        exc_info=_escaped(latest_result.exc_string if latest_result else None),
        description=_escaped(format_job_description(job)),
        metadata=_escaped(json.dumps(job.get_meta(), cls=json_encoder)),
    )
    dep_ids = [_text(di).split(":")[-1].strip() for di in job.dependency_ids]
    if dep_ids:
        result["depends_on"] = dep_ids
        result["depends_on_status"] = ["active" if connection.exists(Job.key_for(d)) else "expired"
                                       for d in dep_ids]
    return jsonify(**result), 200, {"Cache-Control": "no-store"}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _escaped(value: Any) -> Any:
    """Every string in `value` (JSON data) HTML-escaped, for a template that does not escape."""
    if isinstance(value, str):
        return str(escape(value))
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


@click.command()
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
def main(config_path: str | None) -> None:
    """Serve the dashboard on DICOMFLOW_DASHBOARD_HOST:DICOMFLOW_DASHBOARD_PORT."""
    logformat.configure()
    settings = Settings.from_config(load_config(config_path or None))
    serve(create_dashboard(settings), settings.dashboard_host, settings.dashboard_port, threads=4)


if __name__ == "__main__":
    main()
