"""The RQ dashboard wrapper: the job page's data for dependent jobs, requeue, login (no browser)."""

from __future__ import annotations

import base64

import pytest
from rq import Queue, SimpleWorker

from dicomflow.dashboard import create_dashboard
from dicomflow.errors import ConfigError
from tests.support.services import settings_for


def first_step() -> str:
    return "stored"


def second_step(connection_url: str) -> str:
    import redis
    if redis.Redis.from_url(connection_url).exists("test:fail"):
        raise RuntimeError("registration failed on purpose for <img src=x onerror=alert(1)>")
    return "registered"


def login(password: str, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture()
def dashboard(tmp_path, redis_url, services, connection):
    settings = settings_for(tmp_path, redis_url, services, DICOMFLOW_DASHBOARD_PASSWORD="dash-pw")
    return create_dashboard(settings).test_client()


@pytest.fixture()
def failed_dependent(redis_url, connection):
    """A job that depends on another, failed with a traceback (as a worker leaves it)."""
    queue = Queue("default", connection=connection)
    first = queue.enqueue(first_step)
    second = queue.enqueue(second_step, redis_url, depends_on=first)
    connection.set("test:fail", 1)
    SimpleWorker([queue], connection=connection).work(burst=True)
    second.refresh()
    assert second.get_status() == "failed"
    return first, second


def test_the_job_data_of_a_failed_dependent_job(dashboard, failed_dependent):
    first, second = failed_dependent
    answer = dashboard.get(f"/0/data/job/{second.id}.json", headers=login("dash-pw"))
    assert answer.status_code == 200, answer.get_data(as_text=True)  # 0.9.0's view: 500 here
    data = answer.get_json()
    assert data["status"] == "failed"
    assert data["depends_on"] == [first.id] and data["depends_on_status"] == ["active"]
    assert "Traceback (most recent call last)" in data["exc_info"]
    assert "RuntimeError: registration failed on purpose" in data["exc_info"]
    # The job page inserts these unescaped: the wrapper sends them as text.
    assert "<img" not in data["exc_info"] and "&lt;img src=x onerror=alert(1)&gt;" in data["exc_info"]
    page = dashboard.get(f"/0/view/job/{second.id}", headers=login("dash-pw"))
    assert page.status_code == 200 and "requeue-job-btn" in page.get_data(as_text=True)


def test_a_job_without_dependencies_and_an_unknown_job(dashboard, failed_dependent):
    first, _ = failed_dependent
    data = dashboard.get(f"/0/data/job/{first.id}.json", headers=login("dash-pw")).get_json()
    assert data["status"] == "finished" and "depends_on" not in data and data["result"] == "stored"
    assert dashboard.get("/0/data/job/nope.json", headers=login("dash-pw")).status_code == 404


def test_requeue_as_the_first_request_runs_the_job_again(dashboard, failed_dependent, connection):
    _, second = failed_dependent
    connection.delete("test:fail")
    answer = dashboard.post(f"/job/{second.id}/requeue", headers=login("dash-pw"))
    assert answer.status_code == 200 and answer.get_json() == {"status": "OK"}
    assert second.get_status(refresh=True) == "queued"
    SimpleWorker(["default"], connection=connection).work(burst=True)
    assert second.get_status(refresh=True) == "finished" and second.return_value() == "registered"


def test_login_is_per_dashboard_and_required(tmp_path, redis_url, services, connection):
    one = create_dashboard(settings_for(tmp_path, redis_url, services,
                                        DICOMFLOW_DASHBOARD_PASSWORD="one")).test_client()
    two = create_dashboard(settings_for(tmp_path, redis_url, services, DICOMFLOW_DASHBOARD_PASSWORD="two",
                                        DICOMFLOW_DASHBOARD_USERNAME="ops")).test_client()
    assert one.get("/0/data/queues.json").status_code == 401
    assert one.get("/0/data/queues.json", headers=login("two")).status_code == 401
    assert one.get("/0/data/queues.json", headers=login("one")).status_code == 200
    assert two.get("/0/data/queues.json", headers=login("two", "ops")).status_code == 200
    assert two.get("/0/data/queues.json", headers=login("one")).status_code == 401
    with pytest.raises(ConfigError):
        create_dashboard(settings_for(tmp_path, redis_url, services))
