"""A restart of Orthanc does not fail the jobs fetching at that moment (issue 16, case 6).

A real Orthanc (no plugin) is stopped while a worker's cache fetches from it and started again
on the same port: the fetch waits with back-off and completes. Orthanc that stays away fails
the fetch with an OrthancUnavailableError once DICOMFLOW_ORTHANC_RETRY_SECONDS have passed.
"""

from __future__ import annotations

import threading
import time

import pytest

from dicomflow.errors import OrthancError, OrthancUnavailableError
from tests.support.services import settings_for
from worker.dicomcache import DicomCache


@pytest.fixture()
def orthanc(plain_orthanc):
    return plain_orthanc


def cache_for(tmp_path, redis_url, services, orthanc, retry: float) -> DicomCache:
    return DicomCache(settings_for(tmp_path, redis_url, services, ORTHANC_URL=orthanc.url,
                                   ORTHANC_USERNAME=orthanc.username, ORTHANC_PASSWORD=orthanc.password,
                                   DICOMFLOW_ORTHANC_RETRY_SECONDS=str(retry)))


def test_a_fetch_during_an_orthanc_restart_waits_and_completes(tmp_path, redis_url, services, orthanc, sag_anon):
    first = sorted(sag_anon.glob("*.dcm"))[0]
    instance_id = orthanc.post("/instances", first.read_bytes())["ID"]
    cache = cache_for(tmp_path, redis_url, services, orthanc, retry=60)
    orthanc.stop()
    outcome: dict = {}

    def fetch():
        started = time.monotonic()
        try:
            outcome["path"] = cache.instance(instance_id)
        except OrthancError as exc:  # what the job would have failed with
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started
    thread = threading.Thread(target=fetch)
    thread.start()
    time.sleep(1.5)  # the fetch is refused (connection refused) and backs off meanwhile
    assert thread.is_alive(), f"the fetch gave up while Orthanc restarted: {outcome}"
    orthanc.start()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["path"].read_bytes() == first.read_bytes()
    assert outcome["took"] >= 1.5


def test_an_orthanc_that_stays_away_fails_the_fetch_after_the_retry_time(tmp_path, redis_url, services, orthanc):
    cache = cache_for(tmp_path, redis_url, services, orthanc, retry=2)
    orthanc.stop()
    started = time.monotonic()
    with pytest.raises(OrthancUnavailableError, match="still unavailable after"):
        cache.instance("0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
    assert 1 <= time.monotonic() - started <= 10
