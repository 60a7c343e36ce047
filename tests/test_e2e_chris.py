"""Store into ChRIS end to end: storescu -> Orthanc -> scheduler -> workers -> storage + CUBE.

CUBE is the test double of tests/support/cube_double.py (CUBE cannot run here).
"""

from __future__ import annotations

import pytest
import requests

from tests.conftest import REPO, SAG_ANON_COUNT
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics

SERIES_UID = "1.3.12.2.1107.5.2.19.45152.2013030808061520200285270.0.0.0"
SERIES_PATH = ("SERVICES/PACS/OXITESTORTHANC/1449c1d-anonymized-20090701/"
               "MR-Brain_w_o_Contrast-98edede8b2-20130308/00005-SAG_MPRAGE_220_FOV-a27cf06")


def _config(cube, files_root) -> dict[str, str]:
    return {"CHRIS_URL": cube.url, "CHRIS_FILES_ROOT": str(files_root), "CHRIS_USERNAME": "chris",
            "CHRIS_PASSWORD": cube.users["chris"], "CHRIS_RETRY_BASE": "0.05"}


@pytest.mark.parametrize("mode, api", [("cube5", "pacsfiles"), ("cube7", "series")])
def test_sag_anon_stored_and_registered(tmp_path, redis_url, connection, sag_anon, make_cube, files_root, mode,
                                       api):
    cube = make_cube(mode)
    # StableAge long enough that a pause of storescu on a loaded machine does not make the
    # series stable half-way (it would then be registered with fewer files and reported as grown).
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=6,
                  extra_config=_config(cube, files_root)) as stack:
        services = stack.api("/api/v1/services")
        assert {"chrisStore", "chrisRegisterSeries"} <= {j["jobName"] for j in services["jobs"]}
        stack.orthanc.store([sag_anon], aet="OXITESTORTHANC", pattern="*.dcm")
        folder = files_root / SERIES_PATH
        try:
            wait_for(lambda: _finished(stack),
                     timeout=180, what="the series to be stored and registered")
        except (TimeoutError, requests.HTTPError) as exc:
            raise AssertionError(diagnostics(stack)) from exc
        progress = stack.api(f"/api/v1/chris/series/{SERIES_UID}?pacs_name=OXITESTORTHANC")
    names = sorted(p.name for p in folder.glob("*.dcm"))
    assert len(names) == SAG_ANON_COUNT
    assert names[0].startswith("0001-1.3.12.2.1107.5.2.19.45152.20130308081102589")
    assert progress["stored"] == SAG_ANON_COUNT and progress["registered"] == SAG_ANON_COUNT, progress
    assert not progress["errors"]
    posts = cube.registrations()
    if api == "pacsfiles":
        files = [r.body for r in posts if r.path.endswith("pacsfiles/") and r.body["pacs_name"] == "OXITESTORTHANC"]
        assert len(files) == SAG_ANON_COUNT and len({f["path"] for f in files}) == SAG_ANON_COUNT
        assert all(f["path"].startswith(SERIES_PATH + "/") for f in files)
    else:
        (series,) = [r.body for r in posts if r.path.endswith("pacs/series/")]
        assert series["path"] == SERIES_PATH and series["ndicom"] == SAG_ANON_COUNT


def test_rate_limit_can_be_changed_at_run_time(tmp_path, redis_url, connection, make_cube, files_root):
    cube = make_cube("cube5")
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", workers=0,
                  extra_config={**_config(cube, files_root), "CHRIS_RATE_LIMIT": "50"}) as stack:
        url = stack.scheduler_url + "/api/v1/chris/rate-limit"
        assert stack.session.get(url).json() == {"rate": 50.0, "configured": 50.0}
        assert stack.session.put(url, json={"rate": 5}).json()["rate"] == 5.0
        assert stack.session.put(url, json={"rate": -1}).status_code == 400
        assert stack.session.put(url, json={"rate": None}).json()["rate"] == 50.0
        assert stack.session.get(stack.scheduler_url + "/api/v1/chris/series/1.2.3").status_code == 404
        assert requests.get(url, timeout=5).status_code == 401


def _finished(stack: Pipeline) -> bool:
    response = stack.session.get(f"{stack.scheduler_url}/api/v1/chris/series/{SERIES_UID}",
                                 params={"pacs_name": "OXITESTORTHANC"}, timeout=5)
    return response.ok and response.json().get("state") in ("done", "registered") \
        and response.json()["registered"] == SAG_ANON_COUNT
