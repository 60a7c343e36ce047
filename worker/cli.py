"""`dicomflow-worker`: an RQ worker on the configured queues, highest priority first."""

from __future__ import annotations

import sys

import click
import redis

from dicomflow import logformat
from dicomflow.config import load_config
from dicomflow.settings import Settings
from worker.liveness import DicomflowForkWorker, DicomflowSimpleWorker
from worker.runtime import WorkerRuntime, install

CLASSES = {"simple": DicomflowSimpleWorker, "fork": DicomflowForkWorker}


@click.command()
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
@click.option("--worker-class", type=click.Choice(sorted(CLASSES)), default=None,
              help="simple: jobs run in the worker process (faster); fork: one child per job "
                   "[default: DICOMFLOW_WORKER_CLASS, else simple]")
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
@click.option("--name", default=None, help="worker name (default: RQ's)")
@click.option("--max-jobs", type=int, default=None,
              help="exit after this many jobs (the supervisor restarts it)")
def main(config_path: str | None, worker_class: str | None, burst: bool, name: str | None,
         max_jobs: int | None) -> None:
    """Run one worker process."""
    logformat.configure()
    settings = Settings.from_config(load_config(config_path or None))
    chosen = worker_class or settings.worker_class
    runtime = WorkerRuntime(settings)
    if chosen != "simple":   # a forked job's process ends with its job, and a fetch ahead with it
        runtime.prefetcher = None
    runtime.preload()
    install(runtime)
    connection = redis.Redis.from_url(settings.redis_url)
    worker = CLASSES[chosen](list(settings.queues), connection=connection, name=name)
    worker.set_heartbeat_ttl(settings.job_heartbeat_ttl)
    worker.start_reaper(settings.queues)
    ok = worker.work(burst=burst, with_scheduler=True, max_jobs=max_jobs)
    sys.exit(0 if ok or burst else 1)


if __name__ == "__main__":
    main()
