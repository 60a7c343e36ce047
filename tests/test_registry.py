"""The service registry: loading, validation problems with file and field, hot reload."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomflow.events import Level
from dicomflow.service import parse_duration
from scheduler.registry import RegistryHolder, load_registry
from tests.support.services import job, make_service

QUEUES = ("high", "default", "low")


def load(services: Path, config=None):
    registry, importer = load_registry(services / "registry", QUEUES, config or {})
    return registry


def messages(registry) -> list[str]:
    return [str(p) for p in registry.errors]


def test_good_service_loads_with_all_fields(tmp_path):
    make_service(tmp_path, "alpha", job("alphaJob", "alpha", timeout="1h", dependsOn=None, params={"x": 1},
                                        sortPosition=3, description="d", retry={"max": 2, "interval": [1, "2m"]},
                                        triggerLevel="instance", runOnDependencyFailure=False, enabled=True))
    registry = load(tmp_path)
    assert registry.errors == []
    spec = registry.jobs["alphaJob"].spec
    assert spec.timeout == 3600 and spec.params == {"x": 1} and spec.retry.interval == [1, 120]
    assert registry.jobs["alphaJob"].callback(jobName="alphaJob", headers={"SOPInstanceUID": "9"}, params={},
                                              added_params={})[1]["sop"] == "9"


@pytest.mark.parametrize("value, seconds", [("1h", 3600), ("30m", 1800), ("45s", 45), (90, 90), ("1h30m", 5400)])
def test_timeout_forms(value, seconds):
    assert parse_duration(value) == seconds


def test_broken_json_is_reported_and_others_keep_working(tmp_path):
    make_service(tmp_path, "good", job("goodJob", "good"))
    make_service(tmp_path, "broken", '{"jobName": "x", "worker": ')
    registry = load(tmp_path)
    assert list(registry.jobs) == ["goodJob"]
    (problem,) = registry.errors
    assert problem.service == "broken" and problem.source.endswith("broken/settings.json")
    assert "not valid JSON" in problem.message


@pytest.mark.parametrize("field, value, expected", [
    ("timeout", "soon", "timeout"),
    ("dependsOn", 5, "dependsOn"),
    ("params", [1], "params"),
    ("worker", "nodots", "worker"),
    ("triggerLevel", "patient", "triggerLevel"),
    ("sortPosition", "first", "sortPosition"),
    ("retry", {"max": 0}, "retry.max"),
])
def test_wrong_field_type_names_the_field(tmp_path, field, value, expected):
    make_service(tmp_path, "bad", job("badJob", "bad", **{field: value}))
    registry = load(tmp_path)
    assert "badJob" not in registry.jobs
    (problem,) = registry.errors
    assert problem.field == expected, str(problem)


def test_list_settings_name_the_entry(tmp_path):
    make_service(tmp_path, "multi", [job("one", "multi"), job("two", "multi", timeout=-1)])
    (problem,) = load(tmp_path).errors
    assert problem.field == "[1].timeout"


def test_duplicate_job_name(tmp_path):
    make_service(tmp_path, "first", job("sameJob", "first"))
    make_service(tmp_path, "second", job("sameJob", "second"))
    registry = load(tmp_path)
    assert registry.jobs["sameJob"].service == "first"
    (problem,) = registry.errors
    assert problem.service == "second" and problem.field == "jobName" and "already used" in problem.message


@pytest.mark.parametrize("callback_code, expected", [
    ("raise ImportError('no such lib')", "importing the registry package failed: ImportError: no such lib"),
    ("def other(**kw): return True", "has no function 'callback'"),
])
def test_callback_not_importable(tmp_path, callback_code, expected):
    make_service(tmp_path, "nocb", job("nocbJob", "nocb"), callback_code=callback_code)
    make_service(tmp_path, "fine", job("fineJob", "fine"))
    registry = load(tmp_path)
    assert list(registry.jobs) == ["fineJob"]
    (problem,) = registry.errors
    assert problem.field == "callback" and expected in problem.message


def test_callback_in_missing_submodule(tmp_path):
    make_service(tmp_path, "sub", job("subJob", "sub", callback="sub.nothere.callback"))
    (problem,) = load(tmp_path).errors
    assert problem.field == "callback" and "not importable" in problem.message


def test_unknown_dependency_and_cascade(tmp_path):
    make_service(tmp_path, "a", job("aJob", "a", dependsOn="ghostJob"))
    make_service(tmp_path, "b", job("bJob", "b", dependsOn=["aJob"]))
    registry = load(tmp_path)
    assert registry.jobs == {}
    by_service = {p.service: p for p in registry.errors}
    assert "'ghostJob', which is not a known job" in by_service["a"].message
    assert "'aJob', which is excluded" in by_service["b"].message


def test_cycle_is_reported(tmp_path):
    make_service(tmp_path, "a", job("aJob", "a", dependsOn="bJob"))
    make_service(tmp_path, "b", job("bJob", "b", dependsOn="aJob"))
    make_service(tmp_path, "c", job("cJob", "c"))
    registry = load(tmp_path)
    assert list(registry.jobs) == ["cJob"]
    assert all("dependency cycle" in p.message for p in registry.errors) and len(registry.errors) == 2


def test_priority_must_be_a_configured_queue(tmp_path):
    make_service(tmp_path, "a", job("aJob", "a", priority="urgent"))
    (problem,) = load(tmp_path).errors
    assert problem.field == "priority" and "'urgent' is not a configured queue" in problem.message


def test_bad_folder_name_is_reported(tmp_path):
    make_service(tmp_path, "bad-name", job("x", "bad-name"))
    (problem,) = load(tmp_path).errors
    assert "not a Python identifier" in problem.message


def test_disabled_and_unconfigured_jobs_are_inactive(tmp_path):
    make_service(tmp_path, "off", job("offJob", "off", enabled=False))
    make_service(tmp_path, "needs", job("needsJob", "needs", requiresConfig=["CHRIS_URL"]))
    registry = load(tmp_path)
    assert registry.jobs == {}
    assert registry.inactive == {"offJob": "disabled (enabled: false)",
                                 "needsJob": "waiting for configuration: CHRIS_URL"}
    assert "needsJob" in load(tmp_path, {"CHRIS_URL": "http://cube/api/v1/"}).jobs


def test_unknown_fields_are_warnings(tmp_path):
    make_service(tmp_path, "extra", job("extraJob", "extra", colour="blue"))
    registry = load(tmp_path)
    assert "extraJob" in registry.jobs
    assert [(p.severity, p.field) for p in registry.problems] == [("warning", "colour")]


def test_planning_order_respects_dependencies_then_sort_position(tmp_path):
    make_service(tmp_path, "a", job("late", "a", sortPosition=1, dependsOn="early"))
    make_service(tmp_path, "b", job("early", "b", sortPosition=5))
    make_service(tmp_path, "c", job("first", "c", sortPosition=0))
    make_service(tmp_path, "d", job("unsorted", "d"))
    make_service(tmp_path, "e", job("seriesJob", "e", triggerLevel="series"))
    registry = load(tmp_path)
    assert [j.spec.jobName for j in registry.for_level(Level.INSTANCE)] == ["first", "early", "late", "unsorted"]
    assert [j.spec.jobName for j in registry.for_level(Level.SERIES)] == ["seriesJob"]


def test_dependency_across_levels_is_refused(tmp_path):
    make_service(tmp_path, "s", job("seriesJob", "s", triggerLevel="series"))
    make_service(tmp_path, "i", job("instJob", "i", dependsOn="seriesJob"))
    (problem,) = load(tmp_path).errors
    assert problem.service == "i" and "triggers at series level" in problem.message


def test_holder_picks_up_added_and_changed_services(tmp_path):
    make_service(tmp_path, "a", job("aJob", "a"))
    holder = RegistryHolder(tmp_path / "registry", QUEUES, {}, poll_interval=0)
    assert list(holder.current().jobs) == ["aJob"]
    make_service(tmp_path, "b", job("bJob", "b"))
    assert sorted(holder.current().jobs) == ["aJob", "bJob"]
    settings = tmp_path / "registry" / "a" / "settings.json"
    settings.write_text('{"jobName": "aJob", "worker": "a.worker", "callback": "a.callback", "priority": "nope"}')
    os.utime(settings, (time.time() + 5, time.time() + 5))
    registry = holder.current()
    assert sorted(registry.jobs) == ["bJob"] and registry.errors[0].field == "priority"


def test_duplicate_job_name_inside_one_settings_file(tmp_path):
    make_service(tmp_path, "twice", [job("same", "twice"), job("same", "twice", triggerLevel="series")])
    registry = load(tmp_path)
    assert registry.jobs == {}
    (problem,) = registry.errors
    assert problem.field == "jobName" and "twice in this settings.json" in problem.message
