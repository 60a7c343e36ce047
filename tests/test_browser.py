"""A real browser (Debian's Chromium, driven by selenium through Debian's chromedriver) on a real stack.

Orthanc with the plugin, the scheduler, a worker and the RQ dashboard run as processes; a
series is sent with storescu. The browser logs in to the status page, finds the series and
its jobs, follows the link to the dashboard's page of a failed dependent job, sees its
traceback, requeues it and sees it finish; and from Orthanc Explorer's study page it reaches
the study on the status page. Skipped only where Chromium is not installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from rq.registry import FailedJobRegistry

from tests.support.orthanc import write_series
from tests.support.procs import free_port, wait_for
from tests.support.services import job, make_service
from tests.support.stack import REPO, Pipeline

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "browser-test-password"
EVIL_NAME = "<script>alert(1)</script>"

STORE_WORKER = '''
def worker(jobName, headers, params, added_params, dcmpath=None, **kwargs):
    return "stored " + headers["SOPInstanceUID"]
'''

#: Fails while Redis holds test:fail, as a registration fails while CUBE refuses it.
REGISTER_WORKER = '''
def worker(jobName, headers, params, added_params, connection=None, **kwargs):
    if connection.exists("test:fail"):
        raise RuntimeError("CUBE refused the registration of " + headers["SOPInstanceUID"])
    return "registered " + headers["SOPInstanceUID"]
'''


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no Chromium here ({CHROMIUM} and {CHROMEDRIVER}: Debian's chromium and chromium-driver, "
                    "which .ci/run installs); the browser tests need them")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not download a browser or a driver
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture()
def stack(tmp_path, redis_url, connection):
    services = tmp_path / "services"
    make_service(services, "store", job("storeJob", "store", sortPosition=1), worker_code=STORE_WORKER)
    make_service(services, "register", job("registerJob", "register", sortPosition=2, dependsOn="storeJob"),
                 worker_code=REGISTER_WORKER)
    dashboard_port = free_port()
    config = {"DICOMFLOW_DASHBOARD_PASSWORD": PASSWORD, "DICOMFLOW_DASHBOARD_PORT": str(dashboard_port)}
    with Pipeline(tmp_path / "stack", redis_url, services, workers=1, extra_config=config) as pipeline:
        log = open(tmp_path / "dashboard.log", "ab")
        dashboard = subprocess.Popen([sys.executable, "-m", "dicomflow.dashboard"], env=pipeline.env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        pipeline.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        try:
            wait_for(lambda: _answers(pipeline.dashboard_url, dashboard), timeout=30, what="the dashboard")
            yield pipeline
        finally:
            dashboard.terminate()
            dashboard.wait(20)


def _answers(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the dashboard exited with {proc.returncode}")
    try:
        return requests.get(url + "/", timeout=1).status_code == 401
    except requests.RequestException:
        return False


def with_login(url: str, user: str = "admin", password: str = PASSWORD) -> str:
    """The URL with the credentials in it: Chromium answers the Basic challenge with them and
    keeps them for the origin (the pages' own requests use them too)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def send_series(folder: Path, stack: Pipeline) -> tuple[str, str, str]:
    """Two instances of a new series whose PatientName is markup; returns (study, series, Orthanc study id)."""
    files = write_series(folder, 2, patient_id="BROWSER1")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = EVIL_NAME
        ds.save_as(path)
    ds = pydicom.dcmread(files[0])
    stack.orthanc.store(files)
    study_id = stack.orthanc.post("/tools/lookup", str(ds.StudyInstanceUID).encode())[0]["ID"]
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), study_id


def test_from_the_status_page_to_a_failed_dependent_job_and_back(browser, stack, connection, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    connection.set("test:fail", 1)
    study_uid, series_uid, study_id = send_series(tmp_path / "dicom", stack)
    failed = FailedJobRegistry("default", connection=connection)
    wait_for(lambda: failed.count >= 2, timeout=90, what="both registerJob jobs to fail")

    # The status page: the series' events, their jobs, the markup shown as text.
    browser.get(with_login(stack.scheduler_url + "/?refresh=0&q=" + series_uid))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.event")
    assert len(rows) == 2, browser.page_source[-3000:]
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - an injected script would have opened one
    assert {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".patient-name")} == {EVIL_NAME}
    links = {a.text: a for a in rows[0].find_elements(By.CSS_SELECTOR, "a.job")}
    assert set(links) == {"storeJob", "registerJob"}
    assert "failed" in rows[0].text and "finished" in rows[0].text
    job_url = links["registerJob"].get_attribute("href")
    job_id = links["registerJob"].get_attribute("data-job")
    assert job_url == f"{stack.dashboard_url}/0/view/job/{job_id}"

    # The dashboard's job page of the failed dependent job: its traceback and dependency.
    browser.get(with_login(job_url))
    wait_for(lambda: "CUBE refused the registration" in _text(browser, "pre.exc_info"), timeout=20,
             what="the traceback on the job page")
    assert "Traceback (most recent call last)" in _text(browser, "pre.exc_info")
    assert "storeJob-" in browser.find_element(By.ID, "job-data").text  # "Depends on"
    connection.delete("test:fail")
    browser.find_element(By.ID, "requeue-job-btn").click()
    wait_for(lambda: connection.hget(f"rq:job:{job_id}", "status") == b"finished", timeout=60,
             what="the requeued job to finish")
    wait_for(lambda: "finished" in browser.find_element(By.ID, "job-data").text, timeout=20,
             what="the job page to show it finished")

    # Orthanc Explorer's study page links to the study on the status page.
    orthanc = stack.orthanc
    browser.get(with_login(f"{orthanc.url}/app/explorer.html#study?uuid={study_id}", orthanc.username,
                           orthanc.password))
    button = wait_for(lambda: _visible(browser, "dicomflow-status-study"), timeout=20,
                      what="the dicomflow button on the study page")
    button.click()
    wait_for(lambda: browser.current_url.startswith(stack.scheduler_url + "/?q="), timeout=20,
             what="the status page")
    assert study_uid in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.event")
    assert len(rows) == 2 and all(study_uid in row.text for row in rows)
    assert "finished" in rows[0].text or "finished" in rows[1].text


def _text(browser, selector: str) -> str:
    from selenium.webdriver.common.by import By
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def _visible(browser, element_id: str):
    from selenium.webdriver.common.by import By
    found = [e for e in browser.find_elements(By.ID, element_id) if e.is_displayed()]
    return found[0] if found else None
