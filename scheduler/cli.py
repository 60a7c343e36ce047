"""`dicomflow-scheduler`: serve the scheduler app with gunicorn."""

from __future__ import annotations

import click

from dicomflow import logformat
from dicomflow.config import load_config
from dicomflow.settings import Settings
from dicomflow.wsgi import serve
from scheduler.app import create_app, start_background


@click.command()
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
@click.option("--threads", type=int, default=8, show_default=True, envvar="DICOMFLOW_SCHEDULER_THREADS")
def main(config_path: str | None, threads: int) -> None:
    """Serve the scheduler on DICOMFLOW_SCHEDULER_HOST:DICOMFLOW_SCHEDULER_PORT."""
    logformat.configure()
    settings = Settings.from_config(load_config(config_path or None))
    serve(create_app(settings), settings.scheduler_host, settings.scheduler_port, threads,
          on_start=start_background)


if __name__ == "__main__":
    main()
