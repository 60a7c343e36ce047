"""`dicomflow-scheduler`: serve the scheduler app with gunicorn (threads, TCP_NODELAY)."""

from __future__ import annotations

import logging

import click
from gunicorn.app.base import BaseApplication

from dicomflow.config import load_config
from dicomflow.settings import Settings
from scheduler.app import create_app


class _Server(BaseApplication):
    def __init__(self, app, options: dict):
        self.application, self.options = app, options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


@click.command()
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
@click.option("--threads", type=int, default=8, show_default=True, envvar="DICOMFLOW_SCHEDULER_THREADS")
def main(config_path: str | None, threads: int) -> None:
    """Serve the scheduler on DICOMFLOW_SCHEDULER_HOST:DICOMFLOW_SCHEDULER_PORT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_config(load_config(config_path))
    app = create_app(settings)
    _Server(app, {
        "bind": f"{settings.scheduler_host}:{settings.scheduler_port}",
        "workers": 1,  # one process: one registry, one Redis pool; threads for concurrency
        "worker_class": "gthread",
        "threads": threads,
        "accesslog": None,
        "errorlog": "-",
        "timeout": 120,
        "keepalive": 75,
    }).run()


if __name__ == "__main__":
    main()
