"""Planning one event: ask each service's callback, in order, whether it wants the event."""

from __future__ import annotations

import functools
import logging
import pickle
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomflow.events import Event
from scheduler.registry import LoadedJob, Registry

if TYPE_CHECKING:
    from scheduler.callbacks import CallbackRunner

log = logging.getLogger(__name__)


@dataclass
class PlannedJob:
    """A job a callback accepted, with the dependencies it will wait for."""

    job: LoadedJob
    waits_for: list[str]
    notes: list[str] = field(default_factory=list)
    #: A `fanOut` job's items, one job each (None: one job, as usual).
    items: list[Any] | None = None

    @property
    def name(self) -> str:
        return self.job.spec.jobName


@dataclass
class CallbackFailure:
    """A callback that raised or returned something unusable; its job is not scheduled."""

    jobName: str
    error: str
    traceback: str


@dataclass
class Plan:
    """What one event leads to."""

    event: Event
    jobs: list[PlannedJob] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    failures: list[CallbackFailure] = field(default_factory=list)
    added_params: dict[str, Any] = field(default_factory=dict)
    #: Jobs not asked because their callback kept timing out (scheduler/callbacks.py).
    switched_off: list[str] = field(default_factory=list)


class CallbackResultError(TypeError):
    """A callback returned a tuple that is not `(bool, dict)`, or a `fanOut` job's dict
    without its list of items."""


def _interpret(result: Any) -> tuple[bool, dict[str, Any] | None]:
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], (dict, type(None))):
            raise CallbackResultError(f"callback returned {result!r}; expected a bool or (bool, dict)")
        return bool(result[0]), result[1]
    return bool(result), None


def fan_out_items(jobName: str, key: str, extra: dict[str, Any] | None) -> list[Any]:
    """The items a `fanOut` job's callback named under `key`: a list of values distinct as text."""
    items = (extra or {}).get(key)
    if not isinstance(items, list):
        raise CallbackResultError(f"{jobName} fans out over {key!r}: its callback must return "
                                  f"(True, {{{key!r}: [...]}}), not {extra!r}")
    # The event's run record names each job `jobName[item]`: items must differ as text.
    if len({str(item) for item in items}) != len(items):
        raise CallbackResultError(f"{jobName}: the items of {key!r} must be distinct as text, not {items!r}")
    return items


def plan_event(event: Event, registry: Registry, config: Mapping[str, str],
               runner: CallbackRunner | None = None) -> Plan:
    """Run the callbacks for `event` in planning order and decide which jobs to enqueue.

    Every event gets a fresh `added_params`; a callback sees what earlier callbacks added.
    A callback that raises (or, with a `runner`, does not return in time) is recorded in
    `Plan.failures` and its job is not scheduled (the one error boundary around service code
    in the scheduler); a job the runner switched off is not asked.
    """
    plan = Plan(event=event)
    accepted: set[str] = set()
    context = event.context()
    for job in registry.for_level(event.level):
        spec = job.spec
        items = None
        if job.callback is None:
            wanted, extra = True, None
        elif runner is not None and runner.switched_off(job) is not None:
            plan.switched_off.append(spec.jobName)
            continue
        else:
            call = job.callback if runner is None else functools.partial(runner.call, job)
            try:
                wanted, extra = _interpret(call(
                    jobName=spec.jobName, headers=event.headers, params=spec.params,
                    added_params=plan.added_params, event=context, config=config,
                ))
                if extra is not None:
                    pickle.dumps(extra)  # it travels in RQ's job data: fail here, not in the batch
                items = fan_out_items(spec.jobName, spec.fanOut, extra) if wanted and spec.fanOut else None
            except Exception as exc:  # noqa: BLE001 - service code: report, never break the other services
                plan.failures.append(CallbackFailure(spec.jobName, f"{type(exc).__name__}: {exc}",
                                                     traceback.format_exc(limit=5)))
                log.warning("callback of %s failed for %s: %s", spec.jobName, event.key, exc)
                continue
        if extra is not None:
            plan.added_params[spec.jobName] = extra
        if not wanted or items == []:   # fanned out over nothing: no job
            plan.declined.append(spec.jobName)
            continue
        planned = PlannedJob(job, waits_for=[d for d in spec.dependsOn if d in accepted], items=items)
        for dep in spec.dependsOn:
            if dep not in accepted:
                planned.notes.append(f"dependency {dep} was not scheduled for this event; not waited for")
        plan.jobs.append(planned)
        accepted.add(spec.jobName)
    return plan
