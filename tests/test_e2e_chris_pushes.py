"""Series completion per push into ChRIS, end to end (issue 16, cases 1-3).

storescu -> Orthanc (real, with the plugin) -> scheduler -> workers -> storage + CUBE. CUBE
is the test double of tests/support/cube_double.py in CUBE 7 mode (one registration per
(pacs_name, SeriesInstanceUID), rejecting a second one), since CUBE cannot run here.
"""

from __future__ import annotations

import threading

import requests

from dicomflow import keys
from tests.conftest import REPO, SAG_ANON_COUNT
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics
from tests.test_e2e_chris import SERIES_PATH, SERIES_UID, _config

SENDERS = ("AE_ONE", "AE_TWO")


def _folder(pacs: str) -> str:
    return SERIES_PATH.replace("/OXITESTORTHANC/", f"/{pacs}/")


def _registered(stack: Pipeline, pacs: str) -> bool:
    response = stack.session.get(f"{stack.scheduler_url}/api/v1/chris/series/{SERIES_UID}",
                                 params={"pacs_name": pacs}, timeout=5)
    return response.ok and response.json()["state"] in ("registered", "done") \
        and response.json()["registered"] == SAG_ANON_COUNT


def _series_registrations(cube) -> list[dict]:
    return [r.body for r in cube.registrations() if r.path.endswith("pacs/series/") and r.status == 201]


def test_a_series_not_yet_complete_when_the_stack_stops_is_registered_after_the_restart(
        tmp_path, redis_url, connection, sag_anon, make_cube, files_root):
    cube = make_cube("cube7")
    # A job fetching from Orthanc when it stops keeps retrying (DICOMFLOW_ORTHANC_RETRY_SECONDS)
    # until its worker is killed; the reaper queues it again after the heartbeat TTL: both short here.
    config = {**_config(cube, files_root), "DICOMFLOW_JOB_HEARTBEAT_TTL": "8", "DICOMFLOW_ORTHANC_RETRY_SECONDS": "5"}
    stack = Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=10, extra_config=config).start()
    try:
        stack.orthanc.store([sag_anon], aet="OXITESTORTHANC", pattern="*.dcm")
        wait_for(lambda: int(connection.hget(keys.STATS, "events:scheduled") or 0) >= SAG_ANON_COUNT, timeout=60,
                 what=f"{SAG_ANON_COUNT} instance events at the scheduler")
        # Stopped within the stable age: the push is open, nothing has fired. (The scheduler is
        # killed first: a graceful stop may wait out the plugin's keep-alive connection, and its
        # completer would fire the push meanwhile, which is right, but not this case.)
        stack.scheduler.kill()
        stack.stop_scheduler()
        stack.stop()
        assert connection.zcard(keys.PUSHES_DUE) == 1, "the series push is open (no service listens to studies)"
        assert _series_registrations(cube) == []
        stack.start()
        try:
            wait_for(lambda: _registered(stack, "OXITESTORTHANC"), timeout=180, what="the series registered")
        except (TimeoutError, requests.HTTPError) as exc:
            raise AssertionError(diagnostics(stack)) from exc
    finally:
        stack.stop()
    (series,) = _series_registrations(cube)
    assert series["path"] == SERIES_PATH and series["ndicom"] == SAG_ANON_COUNT


def test_the_same_series_from_two_senders_at_once_and_again_from_a_third_is_registered_per_sender(
        tmp_path, redis_url, connection, sag_anon, make_cube, files_root):
    cube = make_cube("cube7")
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=6,
                  extra_config=_config(cube, files_root)) as stack:
        senders = [threading.Thread(target=stack.orthanc.store, args=([sag_anon],),
                                    kwargs={"aet": aet, "pattern": "*.dcm"}) for aet in SENDERS]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(300)
        try:
            for aet in SENDERS:
                wait_for(lambda aet=aet: _registered(stack, aet), timeout=180, what=f"the series from {aet}")
            # A re-send from another AE title, after Orthanc holds every instance already (Orthanc
            # itself would emit no stable event for it).
            stack.orthanc.store([sag_anon], aet="AE_THREE", pattern="*.dcm")
            wait_for(lambda: _registered(stack, "AE_THREE"), timeout=180, what="the series from AE_THREE")
        except (TimeoutError, requests.HTTPError) as exc:
            raise AssertionError(diagnostics(stack)) from exc
        listing = stack.api(f"/api/v1/chris/series/{SERIES_UID}")
    for pacs in (*SENDERS, "AE_THREE"):
        assert len(list((files_root / _folder(pacs)).glob("*.dcm"))) == SAG_ANON_COUNT, pacs
    registered = {s["pacs_name"]: s for s in _series_registrations(cube)}
    assert sorted(registered) == ["AE_ONE", "AE_THREE", "AE_TWO"]
    assert all(s["ndicom"] == SAG_ANON_COUNT and s["path"] == _folder(p) for p, s in registered.items())
    assert sorted(p["pacs_name"] for p in listing["pacs"]) == ["AE_ONE", "AE_THREE", "AE_TWO"]
    assert all(p["stored"] == SAG_ANON_COUNT and not p["errors"] for p in listing["pacs"])
