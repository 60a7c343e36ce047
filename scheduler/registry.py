"""Loading and validating the installed services (`services/registry/*/settings.json`).

A service that cannot load is excluded and reported with its file and field; the others
keep working. Callbacks are imported under a private package name so that a service's
registry package and its worker package (same name, other folder) never collide.
"""

from __future__ import annotations

import heapq
import importlib
import importlib.util
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicomflow.errors import ServiceLoadError, ServiceNameError
from dicomflow.events import Level
from dicomflow.service import JobSpec, check_service_name

log = logging.getLogger(__name__)

_generation = count(1)


@dataclass(frozen=True)
class Problem:
    """Something wrong with an installed service, for the log, service.sh and /api/v1/services."""

    service: str
    source: str
    message: str
    field: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = self.source + (f" [{self.field}]" if self.field else "")
        return f"{self.severity}: {where}: {self.message}"


@dataclass(frozen=True)
class LoadedJob:
    """A job that passed validation, with its callback resolved."""

    spec: JobSpec
    service: str
    source: str
    callback: Callable[..., Any] | None


@dataclass
class Registry:
    """The services as loaded at one moment: active jobs in planning order, and what is not."""

    jobs: dict[str, LoadedJob] = field(default_factory=dict)
    order: dict[Level, list[LoadedJob]] = field(default_factory=dict)
    inactive: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    services: dict[str, list[str]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def for_level(self, level: Level) -> list[LoadedJob]:
        return self.order.get(level, [])

    def push_levels(self) -> tuple[Level, ...]:
        """The levels whose pushes the scheduler must track: those some active job triggers on."""
        return tuple(level for level in (Level.SERIES, Level.STUDY) if self.order.get(level))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for the status endpoint."""
        return {
            "loadedAt": self.loaded_at,
            "jobs": [
                {"jobName": j.spec.jobName, "service": j.service, "triggerLevel": j.spec.triggerLevel.value,
                 "priority": j.spec.priority, "dependsOn": list(j.spec.dependsOn),
                 "sortPosition": j.spec.sortPosition, "description": j.spec.description}
                for level in Level for j in self.for_level(level)
            ],
            "inactive": self.inactive,
            "problems": [
                {"service": p.service, "source": p.source, "field": p.field, "message": p.message,
                 "severity": p.severity}
                for p in self.problems
            ],
        }


#: The largest settings.json the registry reads: a service's jobs take a few KB; a bigger
#: file is a mistake (or a data file in the wrong place) and would be read on every reload.
MAX_SETTINGS_BYTES = 1 << 20


def _settings_entries(path: Path) -> list[dict[str, Any]]:
    """The job objects of one settings.json (an object or a list of objects)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_SETTINGS_BYTES + 1)  # never more, whatever the file claims to be
        if len(raw) > MAX_SETTINGS_BYTES:
            raise ServiceLoadError(f"larger than {MAX_SETTINGS_BYTES // 1024} KiB: not read", str(path))
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ServiceLoadError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                               str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ServiceLoadError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", str(path)) from exc
    except RecursionError as exc:
        raise ServiceLoadError("not valid JSON: nested too deeply", str(path)) from exc
    except OSError as exc:
        raise ServiceLoadError(f"cannot read: {exc.strerror}", str(path)) from exc
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise ServiceLoadError("must hold a JSON object or a non-empty list of objects", str(path))
    return entries


def _validate(entry: dict[str, Any], source: str, index: int | None) -> JobSpec:
    try:
        return JobSpec.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        prefix = f"[{index}]." if index is not None else ""
        value = entry.get(str(err["loc"][0])) if err["loc"] else None
        detail = err["msg"] + (f" (got {value!r})" if value is not None else "")
        raise ServiceLoadError(detail, source, f"{prefix}{loc}" if loc else None) from exc


class _CallbackImporter:
    """Imports registry packages under a private, per-load package name."""

    def __init__(self, registry_dir: Path):
        self.registry_dir = registry_dir
        self.namespace = f"_dicomflow_registry_{next(_generation)}"
        package = types.ModuleType(self.namespace)
        package.__path__ = []  # a namespace package: children are added one by one
        sys.modules[self.namespace] = package

    def load_package(self, service: str) -> None:
        folder = self.registry_dir / service
        init = folder / "__init__.py"
        if not init.is_file():
            raise ServiceLoadError(f"has a callback but {init} does not exist", str(init), "callback")
        name = f"{self.namespace}.{service}"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a service's import-time failure: report it, never crash the scheduler
            del sys.modules[name]
            raise ServiceLoadError(f"importing the registry package failed: {type(exc).__name__}: {exc}",
                                   str(init), "callback") from exc

    def resolve(self, dotted: str, source: str) -> Callable[..., Any]:
        module_path, _, attr = dotted.rpartition(".")
        try:
            module = importlib.import_module(f"{self.namespace}.{module_path}")
        except Exception as exc:  # the callback's module does not import
            raise ServiceLoadError(f"callback {dotted!r} is not importable: {type(exc).__name__}: {exc}",
                                   source, "callback") from exc
        func = getattr(module, attr, None)
        if not callable(func):
            raise ServiceLoadError(f"callback {dotted!r}: {module_path} has no function {attr!r}",
                                   source, "callback")
        return func

    def retire(self) -> None:
        """Forget the modules of this load (a newer load replaces them)."""
        for name in [n for n in sys.modules if n == self.namespace or n.startswith(self.namespace + ".")]:
            del sys.modules[name]


def _service_dirs(registry_dir: Path) -> list[Path]:
    if not registry_dir.is_dir():
        return []
    return sorted(p for p in registry_dir.iterdir() if p.is_dir() and (p / "settings.json").exists())


def load_registry(registry_dir: Path, queues: Sequence[str],
                  config: Mapping[str, str]) -> tuple[Registry, _CallbackImporter]:
    """Load every service under `registry_dir`.

    Returns:
        The registry, and the importer holding its callback modules (retire it when replaced).
    """
    reg = Registry()
    importer = _CallbackImporter(registry_dir)
    candidates: dict[str, list[tuple[JobSpec, str]]] = {}
    dirs = _service_dirs(registry_dir)

    def exclude(service: str, problem: Problem) -> None:
        reg.problems.append(problem)
        candidates.pop(service, None)

    for folder in dirs:
        service = folder.name
        source = str(folder / "settings.json")
        try:
            check_service_name(service)
            entries = _settings_entries(folder / "settings.json")
            many = len(entries) > 1 or isinstance(json.loads((folder / "settings.json").read_text()), list)
            specs = [_validate(e, source, i if many else None) for i, e in enumerate(entries)]
        except ServiceNameError as exc:
            reg.problems.append(Problem(service, str(folder), str(exc)))
            continue
        except ServiceLoadError as exc:
            reg.problems.append(Problem(service, exc.source or source, str(exc.args[0]).split(": ", 1)[-1],
                                        exc.field))
            continue
        for spec in specs:
            for name in spec.unknown_fields:
                reg.problems.append(Problem(service, source, "unknown field (ignored)", name, "warning"))
        candidates[service] = [(s, source) for s in specs]
    reg.services = {svc: [s.jobName for s, _ in jobs] for svc, jobs in candidates.items()}

    # Duplicate job names, disabled jobs, priorities.
    owner: dict[str, str] = {}
    for service in list(candidates):
        mine: dict[str, str] = {}
        for spec, source in candidates.get(service, []):
            if spec.jobName in owner or spec.jobName in mine:
                other = owner.get(spec.jobName, service)
                where = "twice in this settings.json" if other == service else f"by service {other!r}"
                exclude(service, Problem(service, source, f"jobName {spec.jobName!r} is already used {where}",
                                         "jobName"))
                break
            if spec.priority not in queues:
                exclude(service, Problem(service, source, f"priority {spec.priority!r} is not a configured queue "
                                         f"({', '.join(queues)}): no worker would run it", "priority"))
                break
            mine[spec.jobName] = service
        else:
            owner.update(mine)

    # Callbacks.
    for service in list(candidates):
        jobs = candidates[service]
        if any(spec.callback for spec, _ in jobs):
            try:
                importer.load_package(service)
                resolved = [(spec, source, importer.resolve(spec.callback, source) if spec.callback else None)
                            for spec, source in jobs]
            except ServiceLoadError as exc:
                exclude(service, Problem(service, exc.source, str(exc.args[0]).split(": ", 1)[-1], exc.field))
                continue
        else:
            resolved = [(spec, source, None) for spec, source in jobs]
        candidates[service] = resolved  # type: ignore[assignment]

    # Dependencies: unknown, across levels, cycles. Repeat until stable (exclusion cascades).
    while True:
        by_name = {spec.jobName: (svc, spec, src) for svc, jobs in candidates.items() for spec, src, *_ in jobs}
        broken = None
        for svc, spec, src in by_name.values():
            for dep in spec.dependsOn:
                if dep not in by_name:
                    why = "is excluded (see its error)" if dep in owner else "is not a known job"
                    broken = (svc, Problem(svc, src, f"depends on {dep!r}, which {why}", "dependsOn"))
                elif by_name[dep][1].triggerLevel != spec.triggerLevel:
                    broken = (svc, Problem(svc, src, f"depends on {dep!r}, which triggers at "
                                           f"{by_name[dep][1].triggerLevel.value} level, not "
                                           f"{spec.triggerLevel.value}", "dependsOn"))
                if broken:
                    break
            if broken:
                break
        if broken is None:
            cycle = _find_cycle({n: v[1].dependsOn for n, v in by_name.items()})
            if cycle:
                for svc in {by_name[n][0] for n in cycle}:
                    exclude(svc, Problem(svc, by_name[cycle[0]][2] if by_name[cycle[0]][0] == svc
                                         else next(by_name[n][2] for n in cycle if by_name[n][0] == svc),
                                         "dependency cycle: " + " -> ".join(cycle + [cycle[0]]), "dependsOn"))
                continue
            break
        exclude(*broken)

    # Active or inactive, then planning order per level.
    for service, jobs in candidates.items():
        for spec, source, callback in jobs:
            if not spec.enabled:
                reg.inactive[spec.jobName] = "disabled (enabled: false)"
            elif missing := spec.missing_config(config):
                reg.inactive[spec.jobName] = "waiting for configuration: " + ", ".join(missing)
            else:
                reg.jobs[spec.jobName] = LoadedJob(spec, service, source, callback)
    for level in Level:
        reg.order[level] = _planning_order([j for j in reg.jobs.values() if j.spec.triggerLevel == level])
    for p in reg.problems:
        log.log(logging.ERROR if p.severity == "error" else logging.WARNING, "service %s", p)
    return reg, importer


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One cycle of the dependency graph, as a list of job names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _planning_order(jobs: list[LoadedJob]) -> list[LoadedJob]:
    """Topological order (dependencies first), ties broken by sortPosition then name.

    Jobs without a sortPosition come after the ones with one.
    """
    names = {j.spec.jobName: j for j in jobs}
    waiting = {n: {d for d in j.spec.dependsOn if d in names} for n, j in names.items()}
    key = lambda j: (j.spec.sortPosition is None, j.spec.sortPosition or 0.0, j.spec.jobName)  # noqa: E731
    ready = [(key(names[n]), n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    ordered: list[LoadedJob] = []
    while ready:
        _, name = heapq.heappop(ready)
        ordered.append(names[name])
        for other, deps in waiting.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, (key(names[other]), other))
    return ordered


def _fingerprint(registry_dir: Path) -> tuple:
    """What changes when a service is installed, removed or edited."""
    items = []
    if registry_dir.is_dir():
        for path in sorted(registry_dir.rglob("*")):
            if path.suffix in (".json", ".py") and "__pycache__" not in path.parts:
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                items.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(items)


class RegistryHolder:
    """The current registry of a running scheduler, reloaded when the folder changes."""

    def __init__(self, registry_dir: Path, queues: Sequence[str], config: Mapping[str, str],
                 poll_interval: float = 2.0):
        self.registry_dir = registry_dir
        self.queues = tuple(queues)
        self.config = config
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self._fingerprint: tuple | None = None
        self._importer: _CallbackImporter | None = None
        self._registry = Registry()
        self.reload()

    def reload(self) -> Registry:
        """Load the services now (always)."""
        with self._lock:
            fingerprint = _fingerprint(self.registry_dir)
            registry, importer = load_registry(self.registry_dir, self.queues, self.config)
            old, self._importer = self._importer, importer
            self._registry, self._fingerprint = registry, fingerprint
            self._checked = time.monotonic()
            if old is not None:
                old.retire()
            log.info("services loaded: %d active jobs, %d inactive, %d problems",
                     len(registry.jobs), len(registry.inactive), len(registry.problems))
            return registry

    def current(self) -> Registry:
        """The registry, reloaded first if the folder changed (checked at most every poll_interval)."""
        if time.monotonic() - self._checked >= self.poll_interval:
            self._checked = time.monotonic()
            if _fingerprint(self.registry_dir) != self._fingerprint:
                return self.reload()
        return self._registry
