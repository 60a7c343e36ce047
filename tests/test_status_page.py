"""The status page at `/`: login, services, events and their outcome, search, escaping, progress."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from typing import Any

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry

from dicomflow import keys
from dicomflow.chris.progress import SeriesProgress
from tests.support.procs import free_port
from tests.support.services import AUTH, job, make_service
from tests.support.services import instance_event as _event_without_ids

PASSWORD = "status-test-password"
LOGIN = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}

RAISING_CALLBACK = '''
def callback(jobName, headers, params, added_params, **kwargs):
    raise ValueError("callback broke on " + headers["PatientID"])
'''


def orthanc_id(text: str) -> str:
    digest = hashlib.sha1(text.encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def instance_event(sop: str, patient: str = "P1", **headers: Any) -> dict[str, Any]:
    """An instance event as the plugin sends it, with Orthanc ids (these tests fetch no file)."""
    event = _event_without_ids(sop, patient, **headers)
    event["orthanc"] = {"instance": orthanc_id(sop), "study": orthanc_id(event["headers"]["StudyInstanceUID"])}
    return event


@pytest.fixture()
def client(make_client, services):
    make_service(services, "store", job("storeJob", "store", sortPosition=1))
    make_service(services, "register", job("registerJob", "register", sortPosition=2, dependsOn="storeJob"))
    # Orthanc is not running on this port: the page must say so and show everything else.
    return make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD, ORTHANC_URL=f"http://127.0.0.1:{free_port()}",
                       DICOMFLOW_DASHBOARD_URL="http://dash.example:9181")


def send(client, *events) -> list[dict]:
    answer = client.post("/api/v1/events", json={"events": list(events)}, headers=AUTH)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()["results"]


def page(client, **params) -> str:
    answer = client.get("/", query_string=params, headers=LOGIN)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.mimetype == "text/html"
    return answer.get_data(as_text=True)


def test_the_page_needs_the_dashboard_login_not_the_token(client):
    assert client.get("/").status_code == 401
    assert 'Basic realm="dicomflow"' in client.get("/").headers["WWW-Authenticate"]
    assert client.get("/", headers=AUTH).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:nope").decode()}
    assert client.get("/", headers=wrong).status_code == 401
    assert client.get("/", headers=LOGIN).status_code == 200
    assert client.get("/static/status.css").status_code == 401
    css = client.get("/static/status.css", headers=LOGIN)
    assert css.status_code == 200 and "body" in css.get_data(as_text=True)
    # The API keeps its bearer token; the login does not open it.
    assert client.get("/api/v1/stats", headers=LOGIN).status_code == 401
    assert client.get("/api/v1/stats", headers=AUTH).status_code == 200


def test_without_a_dashboard_password_nobody_gets_in(make_client, services):
    client = make_client()
    empty = {"Authorization": "Basic " + base64.b64encode(b"admin:").decode()}
    answer = client.get("/", headers=empty)
    assert answer.status_code == 401
    assert "DICOMFLOW_DASHBOARD_PASSWORD" in answer.get_data(as_text=True)


def test_a_patient_name_with_markup_is_shown_as_text(client):
    evil = "<script>alert(1)</script>"
    send(client, instance_event("1.2.3.4.1", patient="P<b>1</b>", PatientName=evil,
                                StudyInstanceUID='1.2"><img src=x onerror=alert(2)>'))
    text = page(client)
    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>1</b>" not in text and "P&lt;b&gt;1&lt;/b&gt;" in text
    assert "<img src=x" not in text
    # Searched for, it is still text (the search term itself is shown too).
    found = page(client, q="<script>")
    assert "<script>alert(1)" not in found and found.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 1


def test_events_show_their_outcome_jobs_and_links(client, connection):
    results = send(client, instance_event("1.2.3.4.1", patient="PA"))
    jobs = results[0]["jobs"]
    send(client, instance_event("1.2.3.4.1", patient="PA"))  # the same instance again: a duplicate
    text = page(client)
    assert text.count('class="event"') == 2
    assert 'class="duplicate">duplicate' in text and 'class="scheduled">scheduled' in text
    for name, jid in jobs.items():
        assert f'href="http://dash.example:9181/0/view/job/{jid}"' in text
        assert f">{name}</a>" in text
    assert 'class="queued">queued' in text and 'class="deferred">deferred' in text
    # Orthanc is not running: said, not an error page.
    assert 'id="plugin-error"' in text and "unreachable" in text


def test_search_finds_a_study_among_other_patients(client):
    send(client, instance_event("1.2.3.4.1", patient="ALICE", StudyInstanceUID="1.2.840.1",
                                SeriesInstanceUID="1.2.840.1.1"),
         instance_event("1.2.3.4.2", patient="BOB", StudyInstanceUID="1.2.840.2", SeriesInstanceUID="1.2.840.2.1"),
         instance_event("1.2.3.4.3", patient="BOB", StudyInstanceUID="1.2.840.2", SeriesInstanceUID="1.2.840.2.1"))
    by_study = page(client, q="1.2.840.2")
    assert by_study.count('class="event"') == 2 and "ALICE" not in by_study
    by_patient = page(client, q="alice")
    assert by_patient.count('class="event"') == 1 and "1.2.840.1.1" in by_patient
    by_series = page(client, q="1.2.840.1.1")
    assert by_series.count('class="event"') == 1
    assert page(client, q="nobody").count('class="event"') == 0


def test_a_callback_error_shows_its_traceback(make_client, services):
    make_service(services, "broken", job("brokenJob", "broken"), callback_code=RAISING_CALLBACK)
    client = make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD)
    send(client, instance_event("1.2.3.4.9", patient="CAROL"))
    text = page(client, q="CAROL")
    assert "<summary>brokenJob: " in text and "callback broke on CAROL" in html.unescape(text)
    assert "Traceback (most recent call last)" in text


def test_services_problems_and_failed_jobs_per_service(client, services, connection):
    make_service(services, "bad", '{"jobName": "badJob", "worker": "bad.worker", "callback": "bad.callback", '
                                  '"priority": "nowhere"}')
    client.post("/api/v1/services/reload", headers=AUTH)
    results = send(client, instance_event("1.2.3.4.1"), instance_event("1.2.3.4.2"))
    failed = FailedJobRegistry("default", connection=connection)
    for result in results:  # as a worker records a failed job (workers are tested end to end elsewhere)
        failed.add(Job.fetch(result["jobs"]["registerJob"], connection=connection), ttl=600, exc_string="boom")
    text = page(client)
    rows = {m.group(1): m.group(0) for m in re.finditer(r'<tr class="service-job">\s*<td[^>]*>(\w+)</td>.*?</tr>',
                                                        text, re.S)}
    assert "storeJob" in rows and "registerJob" in rows
    assert ">instance<" in rows["registerJob"] and ">default<" in rows["registerJob"]
    assert ">storeJob<" in rows["registerJob"]  # its dependency
    assert 'href="http://dash.example:9181/0/view/jobs/default/failed/8/asc/1">2</a>' in rows["registerJob"]
    assert ">0<" in rows["storeJob"]
    problem = re.search(r'<tr class="problem">.*?</tr>', text, re.S).group(0)
    assert "bad" in problem and "settings.json" in problem and "nowhere" in problem


def test_chris_progress_per_series(client, connection):
    record = SeriesProgress(connection, "PACS1", "1.2.840.77")
    for n in (1, 2):
        record.stored(f"i{n}", f"1.2.840.77.{n}", "PACS1", "SERVICES/PACS/PACS1/x", 3)
        record.registered(f"i{n}", f"1.2.840.77.{n}")
    text = page(client)
    row = re.search(r'<tr class="chris-series">.*?</tr>', text, re.S).group(0)
    assert "1.2.840.77" in row and "PACS1" in row and "2 of 3" in row


def test_repack_progress_per_series(client, connection):
    from dicomflow.repack import progress as repack_progress

    repack_progress.record(connection, "1.2.840.78", folder="/data/P1/S1/SER1")
    repack_progress.record(connection, "1.2.840.78", folder="/data/P1/S1/SER1")
    repack_progress.record(connection, "1.2.840.78", error="x.dcm: not DICOM <b>")
    row = re.search(r'<tr class="repack-series">.*?</tr>', page(client), re.S).group(0)
    assert "1.2.840.78" in row and ">2<" in row and "/data/P1/S1/SER1" in row
    assert "not DICOM &lt;b&gt;" in row


def test_rates_and_the_capped_event_list(make_client, services, connection):
    make_service(services, "store", job("storeJob", "store"))
    client = make_client(DICOMFLOW_DASHBOARD_PASSWORD=PASSWORD, DICOMFLOW_RECENT_EVENTS="5")
    send(client, *[instance_event(f"1.2.3.4.{n}") for n in range(8)])
    assert connection.llen(keys.RECENT_EVENTS) == 5
    newest = page(client)
    assert "1.2.3.4.7" in newest and "1.2.3.4.2" not in newest
    # Move the batch's bucket into the past (the current bucket is not shown: it is unfinished).
    (bucket,) = connection.keys(keys.rate_bucket(0).replace("0", "*"))
    connection.rename(bucket, keys.rate_bucket(int(bucket.decode().rsplit(":", 1)[1]) - 1))
    text = page(client)
    assert re.search(r"last 1 min<b>0\.1 events/s</b>0\.1 jobs/s", text), \
        re.search(r"last 1 min.{0,60}", text).group(0)


def test_the_page_refreshes_itself_unless_told_not_to(client):
    assert '<meta http-equiv="refresh" content="10">' in page(client)
    assert 'http-equiv="refresh"' not in page(client, refresh=0)
