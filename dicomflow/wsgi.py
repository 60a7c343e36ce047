"""Serving a Flask app with gunicorn (threads; gunicorn sets TCP_NODELAY on its sockets)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from dicomflow.logformat import LOG_FORMAT


class _Logger(Logger):
    """gunicorn's own messages (start, workers, errors) in the format of the app's, in the same file."""

    error_fmt = LOG_FORMAT
    datefmt = None  # logging's default, as logging.basicConfig uses


class _Server(BaseApplication):
    def __init__(self, app: Flask, options: dict):
        self.application, self.options = app, options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


def serve(app: Flask, host: str, port: int, threads: int = 8,
          on_start: Callable[[Flask], None] | None = None) -> None:
    """Serve `app` on host:port in one gunicorn process with `threads` threads, until stopped.

    `on_start(app)` runs in the serving process once it is up (gunicorn forks it: threads
    started before would not be there).
    """
    options = {
        "bind": f"{host}:{port}",
        "workers": 1,  # one process: one registry and one Redis pool; threads for concurrency
        "worker_class": "gthread",
        "threads": threads,
        "accesslog": None,
        "errorlog": "-",
        "logger_class": _Logger,
        "timeout": 120,
        "keepalive": 75,
        "control_socket_disable": True,  # one default path for every gunicorn of the host would clash
    }
    if on_start is not None:
        options["post_worker_init"] = lambda worker: on_start(app)
    _Server(app, options).run()
