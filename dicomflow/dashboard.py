"""The RQ dashboard, behind HTTP Basic authentication, served by gunicorn on loopback."""

from __future__ import annotations

import logging

import click
from flask import Flask

from dicomflow.config import load_config
from dicomflow.errors import ConfigError
from dicomflow.settings import Settings
from dicomflow.wsgi import serve


def create_dashboard(settings: Settings) -> Flask:
    """rq-dashboard's app on our Redis; refuses to run without a password."""
    if not settings.dashboard_password:
        raise ConfigError("DICOMFLOW_DASHBOARD_PASSWORD is empty: the dashboard refuses to run without one")
    from rq_dashboard.cli import make_flask_app  # imports six (rq-dashboard 0.9.0 does not declare it)

    app = make_flask_app(None, settings.dashboard_username, settings.dashboard_password, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = [settings.redis_url]  # it indexes a list of instances
    return app


@click.command()
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
def main(config_path: str | None) -> None:
    """Serve the dashboard on DICOMFLOW_DASHBOARD_HOST:DICOMFLOW_DASHBOARD_PORT."""
    logging.basicConfig(level=logging.INFO)
    settings = Settings.from_config(load_config(config_path or None))
    serve(create_dashboard(settings), settings.dashboard_host, settings.dashboard_port, threads=4)


if __name__ == "__main__":
    main()
