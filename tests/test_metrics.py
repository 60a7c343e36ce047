"""/metrics: Prometheus's exposition format, parsed with prometheus_client's parser, against what was sent."""

from __future__ import annotations

import base64

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry

from dicomflow.chris.progress import SeriesProgress
from tests.support.orthanc import write_series
from tests.support.procs import free_port, wait_for
from tests.support.services import AUTH, job, make_service
from tests.support.stack import Pipeline
from tests.test_status_page import instance_event

PASSWORD = "metrics-test-password"
LOGIN = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample: (name, its labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture()
def services(tmp_path):
    folder = tmp_path / "services"
    make_service(folder, "store", job("storeJob", "store", sortPosition=1))
    make_service(folder, "register", job("registerJob", "register", sortPosition=2, dependsOn="storeJob"))
    return folder


def test_metrics_count_what_was_sent(make_client, connection):
    client = make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD, ORTHANC_URL=f"http://127.0.0.1:{free_port()}")
    events = [instance_event(f"1.2.3.{n}") for n in range(3)]
    answer = client.post("/api/v1/events", headers=AUTH,
                         json={"events": [*events, events[0], {"level": "instance", "headers": {}}]})
    results = answer.get_json()["results"]
    FailedJobRegistry("default", connection=connection).add(
        Job.fetch(results[0]["jobs"]["storeJob"], connection=connection), ttl=600, exc_string="boom")
    Worker(["default"], connection=connection, name="metrics-test-worker").register_birth()
    record = SeriesProgress(connection, "PACS1", "1.2.840.5")
    for n in (1, 2):
        record.stored(f"i{n}", f"s{n}", "PACS1", "SERVICES/PACS/PACS1/x", 3)
        record.registered(f"i{n}", f"s{n}")
    record.failed("i3", "CUBE answered 500")

    response = client.get("/metrics", headers=LOGIN)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    found = samples(response.get_data(as_text=True))
    assert value(found, "dicomflow_events_total", outcome="scheduled") == 3
    assert value(found, "dicomflow_events_total", outcome="duplicate") == 1
    assert value(found, "dicomflow_events_total", outcome="invalid") == 1
    assert value(found, "dicomflow_events_total", outcome="unchanged") == 0
    assert value(found, "dicomflow_jobs_enqueued_total", service="store", job="storeJob") == 3
    assert value(found, "dicomflow_jobs_enqueued_total", service="register", job="registerJob") == 3
    assert value(found, "dicomflow_queue_jobs", queue="default", state="queued") == 3
    assert value(found, "dicomflow_queue_jobs", queue="default", state="deferred") == 3
    assert value(found, "dicomflow_queue_jobs", queue="default", state="failed") == 1
    assert value(found, "dicomflow_queue_jobs", queue="high", state="queued") == 0
    assert value(found, "dicomflow_workers") == 1
    assert value(found, "dicomflow_service_jobs", state="active") == 2
    assert value(found, "dicomflow_plugin_up") == 0  # Orthanc does not run: said, not an error
    assert value(found, "dicomflow_chris_series", state="receiving") == 1
    assert value(found, "dicomflow_chris_registered_files") == 2
    assert value(found, "dicomflow_chris_errors") == 1
    # Names as Prometheus wants them: a prefix, snake_case, counters ending in _total.
    for name, _ in found:
        assert name.startswith("dicomflow_") and name == name.lower(), name


def test_metrics_need_the_login(make_client):
    client = make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 401


def test_plugin_counters_from_a_real_orthanc(tmp_path, redis_url, connection, services):
    """A series sent with storescu: the plugin's and the scheduler's counts agree with it."""
    files = write_series(tmp_path / "dicom", 4)
    with Pipeline(tmp_path / "stack", redis_url, services, workers=0,
                  extra_config={"DICOMFLOW_DASHBOARD_PASSWORD": PASSWORD}) as stack:
        stack.orthanc.store(files)
        wait_for(lambda: stack.orthanc.status()["delivered"] >= 4, timeout=60, what="4 events delivered")

        def scraped() -> dict:
            answer = stack.session.get(stack.scheduler_url + "/metrics", headers=LOGIN, timeout=10)
            answer.raise_for_status()
            return samples(answer.text)

        found = wait_for(lambda: (f := scraped()) and value(f, "dicomflow_events_total", outcome="scheduled") >= 4
                         and f, timeout=30, what="the scheduled events in /metrics")
    assert value(found, "dicomflow_plugin_up") == 1
    assert value(found, "dicomflow_plugin_received_total") == 4
    assert value(found, "dicomflow_plugin_delivered_total") == 4
    assert value(found, "dicomflow_plugin_spool_length") == 0
    assert value(found, "dicomflow_plugin_dead_letters") == 0
    assert value(found, "dicomflow_events_total", outcome="scheduled") == 4
    assert value(found, "dicomflow_jobs_enqueued_total", service="store", job="storeJob") == 4
    assert value(found, "dicomflow_queue_jobs", queue="default", state="queued") == 4
    assert value(found, "dicomflow_queue_jobs", queue="default", state="deferred") == 4


def test_cube_registrations_are_counted_by_outcome(make_client, connection, make_cube, files_root):
    """Counters, not sums over kept records: every registration sent to CUBE (the double of
    tests/support/cube_double.py: CUBE cannot run here), by API and outcome."""
    from dicomflow.chris.client import ChrisClient
    from dicomflow.chris.errors import ChrisRequestError
    from dicomflow.chris.settings import ChrisSettings
    from tests.support.chris_env import chris_config

    cube = make_cube("cube5")
    settings = ChrisSettings.from_config(chris_config(cube, CHRIS_REGISTRATION="pacsfiles"))
    path = "SERVICES/PACS/PACS1/p/s/se/0001-1.2.3.dcm"
    (files_root / path).parent.mkdir(parents=True)
    (files_root / path).write_bytes(b"")
    fields = {"pacs_name": "PACS1", "path": path, "PatientID": "P1", "StudyDate": "2024-01-02",
              "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}
    with ChrisClient(settings, connection) as client:
        assert client.register_file(fields).created
        assert client.register_file(fields).already
        with pytest.raises(ChrisRequestError):
            client.register_file({**fields, "path": path.replace("0001", "0002")})  # no such file: 400
    found = samples(make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD, ORTHANC_URL=f"http://127.0.0.1:{free_port()}")
                    .get("/metrics", headers=LOGIN).get_data(as_text=True))
    assert value(found, "dicomflow_chris_registrations_total", api="files", outcome="created") == 1
    assert value(found, "dicomflow_chris_registrations_total", api="files", outcome="already") == 1
    assert value(found, "dicomflow_chris_registrations_total", api="files", outcome="refused") == 1
