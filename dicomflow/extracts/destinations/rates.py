"""The destinations' rates for operators: what the project files configure, what is in force, and
the run-time override (`dicomflow-export rate`, ``/api/v1/destinations``) — one implementation for both."""

from __future__ import annotations

from pathlib import Path

import redis

from dicomflow.extracts.destinations.errors import UnknownDestinationError
from dicomflow.extracts.project import load_projects
from dicomflow.ratelimit import BucketKeys, check_rate, override, set_rate


def _configured(projects_dir: Path) -> dict[str, dict]:
    """Destination name -> {"type", "configured": {project: rate}} over every project that loads."""
    found: dict[str, dict] = {}
    for slug, project in sorted(load_projects(projects_dir).projects.items()):
        for name, endpoint in project.model.destinations.endpoints.items():
            entry = found.setdefault(name, {"type": endpoint.type, "configured": {}})
            entry["configured"][slug] = endpoint.rate
    return found


def _describe(connection: redis.Redis, name: str, entry: dict) -> dict:
    run_time = override(connection, BucketKeys.named(name))
    rates = set(entry["configured"].values())
    configured = rates.pop() if len(rates) == 1 else None
    return {"destination": name, "type": entry["type"],
            "rate": run_time if run_time is not None else configured,
            "override": run_time, "configured": entry["configured"],
            "unit": "instances per second, all workers (0: no limit)"}


def destination_rates(connection: redis.Redis, projects_dir: Path) -> list[dict]:
    """Every destination the projects define: its rate in force, the override, the configured rates.

    `rate` is None when projects configure different rates for one name and no override is
    set (each project's sends then use its own).
    """
    return [_describe(connection, name, entry) for name, entry in sorted(_configured(projects_dir).items())]


def destination_rate(connection: redis.Redis, projects_dir: Path, name: str) -> dict:
    """One destination's rate (see `destination_rates`).

    Raises:
        UnknownDestinationError: no project of `projects_dir` defines it.
    """
    entry = _configured(projects_dir).get(name)
    if entry is None:
        raise UnknownDestinationError(name, f"no project in {projects_dir} defines it (destinations.endpoints)")
    return _describe(connection, name, entry)


def change_rate(connection: redis.Redis, projects_dir: Path, name: str, rate: float | None) -> dict:
    """Set destination `name`'s rate at run time for every worker (None: back to the project files').

    Raises:
        UnknownDestinationError: no project defines it (a typo would otherwise set a rate nobody reads).
        RateLimitError: `rate` is not a finite number >= 0.
    """
    destination_rate(connection, projects_dir, name)
    set_rate(connection, BucketKeys.named(name), None if rate is None else check_rate(rate))
    return destination_rate(connection, projects_dir, name)
