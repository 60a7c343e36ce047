"""One log format per file (issue 21, item 8): the scheduler's log holds gunicorn's lines and the
app's in the same format, and so does a worker's."""

from __future__ import annotations

import re

import requests

from dicomflow.logformat import LOG_FORMAT
from tests.conftest import REPO
from tests.support.orthanc import write_series
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics

#: A line in LOG_FORMAT: `2026-12-02 12:19:05,123 gunicorn.error INFO Starting gunicorn 27.0.1`.
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.-]+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) .*")


def test_the_format_is_the_one_the_pattern_checks():
    assert LOG_FORMAT == "%(asctime)s %(name)s %(levelname)s %(message)s"


def test_every_line_of_the_scheduler_and_worker_logs_has_one_format(tmp_path, redis_url, connection):
    data = tmp_path / "pypx"
    stack = Pipeline(tmp_path / "stack", redis_url, REPO / "services", workers=1, stable_age=2,
                     extra_config={"REPACK_DATADIR": str(data), "REPACK_LOGDIR": str(tmp_path / "pypx-log")})
    with stack:
        stack.orthanc.store(write_series(tmp_path / "in", 3, patient_id="LOGFMT1"), aet="LOGTEST")
        assert requests.get(stack.scheduler_url + "/api/v1/services", timeout=5).status_code == 401
        try:
            wait_for(lambda: len(list(data.rglob("*.dcm"))) == 3, timeout=60, what="3 repacked files")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    for name in ("scheduler.log", "worker-0.log"):
        lines = (tmp_path / "stack" / name).read_text().splitlines()
        assert lines, f"{name} is empty"
        odd = [line for line in lines if not LINE.fullmatch(line)]
        assert not odd, f"{name}: lines in another format:\n" + "\n".join(odd[:20])
    scheduler = (tmp_path / "stack" / "scheduler.log").read_text()
    assert " gunicorn.error INFO Starting gunicorn" in scheduler  # gunicorn's own lines, in our format
    assert " gunicorn.error INFO Handling signal: term" in scheduler
