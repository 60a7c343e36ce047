"""The ChRIS service end to end without Orthanc: worker functions, RQ, the CUBE double, Redis."""

from __future__ import annotations

import importlib
import shutil
import threading
from pathlib import Path

import pydicom
import pytest
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from dicomflow.chris.client import ChrisClient
from dicomflow.chris.jobs import store_batch
from dicomflow.chris.progress import recent_series, series_progress
from dicomflow.chris.settings import ChrisSettings
from dicomflow.errors import MissingTagError
from tests.support.chris_env import (
    AET,
    SAG_FOLDER,
    SAG_SERIES_UID,
    SERVICE_MODULES,
    chris_config,
    instance_event,
    job_kwargs,
    load_callbacks,
    orthanc_id,
    series_event,
)


SAG_HEADERS = {"SeriesInstanceUID": SAG_SERIES_UID}


@pytest.fixture()
def service(monkeypatch):
    """The service's worker package `chris`, imported from services/modules as the runtime does."""
    monkeypatch.syspath_prepend(str(SERVICE_MODULES))
    return importlib.import_module("chris")


@pytest.fixture()
def incoming(tmp_path, sag_anon) -> Path:
    """The sag-anon files as a worker's cache holds them, named by (stand-in) Orthanc id."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for source in sorted(sag_anon.glob("*.dcm")):
        shutil.copyfile(source, folder / f"{orthanc_id(source)}.dcm")
    return folder


def without_study_date(path: Path) -> None:
    ds = pydicom.dcmread(path)
    del ds.StudyDate
    ds.save_as(path)


def instance_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def run_all(service, connection, config, files, store=True, register=True) -> list[Exception]:
    """Store (and register) every file by calling the worker functions directly; the errors raised."""
    errors: list[Exception] = []
    for path in files:
        event = instance_event(path.stem)
        try:
            if store:
                service.store(connection=connection, **job_kwargs("chrisStore", path, event, config))
            if register:
                service.register(connection=connection, **job_kwargs("chrisRegister", path, event, config))
        except MissingTagError as exc:
            errors.append(exc)
    return errors


def finish(service, connection, config, folder: Path) -> dict:
    event = series_event([p.stem for p in instance_files(folder)])
    return service.register_series(connection=connection, **job_kwargs(
        "chrisRegisterSeries", folder, event, config, headers=SAG_HEADERS))


def test_pacsfiles_mode_stores_registers_and_marks_the_series(service, connection, make_cube, incoming,
                                                             files_root, sag_anon_count):
    n = sag_anon_count
    cube = make_cube("cube5")
    config = chris_config(cube)
    assert run_all(service, connection, config, instance_files(incoming)) == []
    result = finish(service, connection, config, incoming)
    assert result["mode"] == "pacsfiles" and result["registered"] == n
    stored = sorted(p.relative_to(files_root).as_posix() for p in (files_root / SAG_FOLDER).glob("*.dcm"))
    assert len(stored) == n and stored[0].startswith(f"{SAG_FOLDER}/0001-")
    dicom = [p for p in cube.state.files if p.startswith(SAG_FOLDER + "/")]
    assert sorted(dicom) == stored
    # oxidicom's marker files, found the way its clients search for them.
    search = cube.url + "pacsfiles/search/"
    import requests
    token = requests.post(cube.url + "auth-token/", json={"username": "chris", "password": "chris1234"}).json()
    headers = {"Authorization": f"Token {token['token']}"}
    found = requests.get(search, headers=headers, params={
        "pacs_identifier": "org.fnndsc.oxidicom", "SeriesInstanceUID": SAG_SERIES_UID}).json()["results"]
    markers = {r["ProtocolName"]: r for r in found}
    assert markers["NumberOfSeriesRelatedInstances"]["SeriesDescription"] == "unknown"
    assert markers["OxidicomAttemptedPushCount"]["SeriesDescription"] == str(n)
    attempt_path = markers["OxidicomAttemptedPushCount"]["fname"]
    assert attempt_path.startswith(f"SERVICES/PACS/org.fnndsc.oxidicom/{SAG_FOLDER}/")
    assert attempt_path.endswith(f"/OxidicomAttemptedPushCount={n}")
    assert (files_root / attempt_path).is_file() and (files_root / attempt_path).stat().st_size == 0
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == n and progress["registered"] == n and progress["errors"] == {}
    assert progress["state"] == "done" and progress["path"] == SAG_FOLDER and progress["attempted"] == n
    assert [p["SeriesInstanceUID"] for p in recent_series(connection)] == [SAG_SERIES_UID]


def test_series_mode_body_is_cube_md_worked_example(service, connection, make_cube, incoming, sag_anon_count):
    n = sag_anon_count
    cube = make_cube("cube7")
    config = chris_config(cube)  # auto: detected from the double
    assert run_all(service, connection, config, instance_files(incoming)) == []
    assert not cube.registrations()  # the instance register jobs were no-ops
    result = finish(service, connection, config, incoming)
    assert result["mode"] == "series" and result["registered"] == n
    (request,) = cube.registrations()
    assert request.status == 201 and request.path == "/api/v1/pacs/series/"
    assert request.body == {
        "pacs_name": "OXITESTORTHANC", "PatientID": "1449c1d", "StudyDate": "2013-03-08",
        "PatientName": "anonymized", "PatientBirthDate": "20090701", "PatientAge": 1096, "PatientSex": "M",
        "AccessionNumber": "98edede8b2", "Modality": "MR", "ProtocolName": "SAG MPRAGE 220 FOV",
        "StudyDescription": "MR-Brain w/o Contrast", "SeriesDescription": "SAG MPRAGE 220 FOV",
        "StudyInstanceUID": "1.2.840.113845.11.1000000001785349915.20130308061609.6346698",
        "SeriesInstanceUID": SAG_SERIES_UID, "ndicom": n, "path": SAG_FOLDER,
    }
    assert len([p for p in cube.state.files if p.startswith(SAG_FOLDER)]) == n
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["registered"] == n and progress["state"] == "registered"
    # A re-sent series is idempotent: "already registered" is a success.
    assert finish(service, connection, config, incoming)["created"] is False


def test_series_job_waits_for_store_jobs_still_running(service, connection, make_cube, incoming, sag_anon_count):
    n = sag_anon_count
    cube = make_cube("cube7")
    config = chris_config(cube, CHRIS_REGISTRATION="series")
    files = instance_files(incoming)
    run_all(service, connection, config, files[:n // 2], register=False)
    outcome: dict = {}
    waiter = threading.Thread(target=lambda: outcome.update(finish(service, connection, config, incoming)))
    waiter.start()
    run_all(service, connection, config, files[n // 2:], register=False)
    waiter.join(30)
    assert outcome["registered"] == n
    (request,) = cube.registrations()
    assert request.body["ndicom"] == n and request.status == 201


def test_series_job_gives_up_waiting_with_a_clear_error(service, connection, make_cube, incoming, sag_anon_count):
    n = sag_anon_count
    from dicomflow.chris.errors import SeriesIncompleteError
    cube = make_cube("cube7")
    config = chris_config(cube, CHRIS_SERIES_WAIT="0.3")
    run_all(service, connection, config, instance_files(incoming)[:10], register=False)
    with pytest.raises(SeriesIncompleteError, match=f"{n - 10} of {n}"):
        finish(service, connection, config, incoming)
    assert not cube.registrations()


def test_missing_study_date_fails_that_instance_only(service, connection, make_cube, incoming, files_root,
                                                    sag_anon_count):
    n = sag_anon_count
    cube = make_cube("cube7")
    config = chris_config(cube)
    broken = instance_files(incoming)[n // 3]
    without_study_date(broken)
    errors = run_all(service, connection, config, instance_files(incoming))
    assert len(errors) == 1 and errors[0].keyword == "StudyDate" and "StudyDate" in str(errors[0])
    result = finish(service, connection, config, incoming)
    assert result["registered"] == n - 1 and result["errors"] == 1
    assert cube.registrations()[0].body["ndicom"] == n - 1
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == n - 1 and list(progress["errors"]) == [broken.stem]
    assert "StudyDate" in progress["errors"][broken.stem]


def test_a_series_that_grows_after_registration_is_reported(service, connection, make_cube, incoming,
                                                            sag_anon_count):
    n = sag_anon_count
    cube = make_cube("cube7")
    config = chris_config(cube)
    files = instance_files(incoming)
    run_all(service, connection, config, files[:n - 1])
    event = series_event([p.stem for p in files[:n - 1]])
    service.register_series(connection=connection, **job_kwargs("s", incoming, event, config,
                                                                headers=SAG_HEADERS))
    late = service.store(connection=connection, **job_kwargs("chrisStore", files[n - 1],
                                                               instance_event(files[n - 1].stem), config))
    assert late["grownAfterRegistration"] == 1
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["state"] == "grown" and progress["grownAfterRegistration"] == 1
    assert progress["registered"] == n - 1 and progress["stored"] == n


def test_through_rq_pacsfiles_with_cube_down_then_rerun(service, connection, make_cube, incoming, files_root):
    """One job stores, then registers (CUBE 5): with CUBE down the job fails after the file is
    in storage (a file CUBE refuses stays there); requeued, it registers it."""
    cube = make_cube("cube5")
    config = chris_config(cube, CHRIS_HTTP_RETRIES="2")
    files = instance_files(incoming)[:8]
    high = Queue("high", connection=connection)
    cube.down()
    jobs = [high.enqueue("tests.support.chris_env.run_service", "chris.store",
                         **job_kwargs("chrisStore", path, instance_event(path.stem), config)) for path in files]
    SimpleWorker([high], connection=connection).work(burst=True)
    failed = FailedJobRegistry(queue=high)
    assert sorted(failed.get_job_ids()) == sorted(j.id for j in jobs)
    job = jobs[0]
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert "ChrisUnavailableError" in job.latest_result().exc_string
    assert "failed after 2 attempt(s)" in job.latest_result().exc_string
    assert len(list((files_root / SAG_FOLDER).glob("*.dcm"))) == 8, "stored before CUBE was asked"
    assert series_progress(connection, AET, SAG_SERIES_UID)["errors"]  # visible to clients too
    cube.up()
    for job_id in failed.get_job_ids():
        failed.requeue(job_id)
    SimpleWorker([high], connection=connection).work(burst=True)
    assert all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs)
    assert len([p for p in cube.state.files if p.startswith(SAG_FOLDER)]) == 8
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["registered"] == 8 and progress["errors"] == {}


def test_through_rq_series_mode_with_a_503(service, connection, make_cube, incoming, sag_anon_count):
    cube = make_cube("cube7")
    config = chris_config(cube)
    high, low = Queue("high", connection=connection), Queue("low", connection=connection)
    files = instance_files(incoming)
    # The series event is planned first; the priorities make workers drain the store jobs first.
    series_job = low.enqueue("tests.support.chris_env.run_service", "chris.register_series",
                             **job_kwargs("chrisRegisterSeries", incoming, series_event([p.stem for p in files]),
                                          config, headers=SAG_HEADERS))
    for path in files:
        high.enqueue("tests.support.chris_env.run_service", "chris.store",
                     **job_kwargs("chrisStore", path, instance_event(path.stem), config))
    cube.fail_next(1, 503)
    SimpleWorker([high, low], connection=connection).work(burst=True)
    assert series_job.get_status(refresh=True) == JobStatus.FINISHED
    assert series_job.return_value()["registered"] == sag_anon_count
    statuses = [r.status for r in cube.registrations()]
    assert statuses.count(201) == 1 and len(cube.state.series) == 1


def test_callbacks_follow_the_configuration():
    callbacks = load_callbacks()
    args = {"jobName": "x", "headers": {}, "params": {}, "added_params": {}, "event": {}}
    on = {"CHRIS_URL": "http://cube/api/v1/", "CHRIS_FILES_ROOT": "/data"}
    assert not callbacks.want_store(config={}, **args)
    assert not callbacks.want_store(config={**on, "CHRIS_URL": ""}, **args)
    assert callbacks.want_store(config=on, **args) and callbacks.want_series(config=on, **args)


def test_settings_json_is_well_formed():
    import json
    jobs = json.loads((SERVICE_MODULES.parent / "registry" / "chris" / "settings.json").read_text())
    assert [j["jobName"] for j in jobs] == ["chrisStore", "chrisRegisterSeries"]
    service_functions = importlib.util.spec_from_file_location("m", SERVICE_MODULES / "chris" / "__init__.py")
    module = importlib.util.module_from_spec(service_functions)
    service_functions.loader.exec_module(module)
    callbacks = load_callbacks()
    for job in jobs:
        assert job["priority"] in ("high", "default", "low") and job["triggerLevel"] in ("instance", "series")
        assert callable(getattr(module, job["worker"].split(".", 1)[1]))
        assert callable(getattr(callbacks, job["callback"].split(".", 1)[1]))
        assert job["requiresConfig"] == ["CHRIS_URL", "CHRIS_FILES_ROOT"]


def test_pacsfiles_mode_writes_both_markers_for_every_push(service, connection, make_cube, incoming):
    """oxidicom writes NumberOfSeriesRelatedInstances and OxidicomAttemptedPushCount per push
    (issue 16, case 4): a second push of the same series from the same PACS gets its own pair."""
    cube = make_cube("cube5")
    config = chris_config(cube)
    files = instance_files(incoming)
    for _ in range(2):  # the series pushed, completed, then pushed again
        assert run_all(service, connection, config, files) == []
        finish(service, connection, config, incoming)
    markers = [r.body for r in cube.registrations() if r.status == 201 and r.body["pacs_name"] == "org.fnndsc.oxidicom"]
    pushes: dict[str, set[str]] = {}
    for marker in markers:
        attempt = marker["path"].rsplit("/", 2)[-2]
        pushes.setdefault(attempt, set()).add(marker["ProtocolName"])
    assert len(pushes) == 2, pushes
    assert all(kinds == {"NumberOfSeriesRelatedInstances", "OxidicomAttemptedPushCount"} for kinds in pushes.values())


def test_a_batch_stores_and_registers_all_it_can_and_its_retry_does_only_the_rest(service, connection, make_cube,
                                                                                  incoming, files_root, tmp_path):
    """`batchSize` jobs (settings.json): every instance of the batch is tried; the one that fails
    is named, the job fails and keeps the others' completion, and its retry redoes only that one."""
    cube = make_cube("cube5")
    config = chris_config(cube)
    files = instance_files(incoming)[:8]
    broken = files[5]
    original = tmp_path / "original.dcm"
    shutil.copyfile(broken, original)
    without_study_date(broken)
    batch = [{"headers": {}, "added_params": {}, "event": instance_event(p.stem), "dcmpath": str(p)} for p in files]
    high = Queue("high", connection=connection)
    job = high.enqueue("tests.support.chris_env.run_service", "chris.store", batch=batch,
                       **job_kwargs("chrisStore", incoming, instance_event(files[0].stem), config))
    SimpleWorker([high], connection=connection).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    error = job.latest_result().exc_string
    assert "BatchItemsError" in error and "1 of 8 instance(s) failed" in error
    assert broken.stem in error and "StudyDate" in error
    assert sorted(job.get_meta(refresh=True)["chrisDone"]) == sorted(p.stem for p in files if p != broken)
    registered = [r.body["path"] for r in cube.registrations() if r.status == 201
                  and r.body["path"].startswith(SAG_FOLDER + "/")]  # not oxidicom's marker file
    assert len(registered) == 7 and len(set(registered)) == 7
    shutil.copyfile(original, broken)
    FailedJobRegistry(queue=high).requeue(job.id)
    SimpleWorker([high], connection=connection).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert job.return_value()["skipped"] == 7 and job.return_value()["registered"] == 1
    [entry] = job.return_value()["results"].values()
    assert entry["registered"] == 8 and entry["created"]    # the series' registered count after it
    posts = [r.body["path"] for r in cube.registrations() if r.body["path"].startswith(SAG_FOLDER + "/")]
    assert len(posts) == 8 and len(set(posts)) == 8, "the retry registered only the instance that had failed"
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == 8 and progress["registered"] == 8 and progress["errors"] == {}


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_batch_stops_asking_cube_once_it_is_unavailable_and_its_retry_registers_the_rest(
        service, connection, make_cube, incoming, files_root, in_flight):
    """One retry layer: a request is tried CHRIS_HTTP_RETRIES times at once, then the job fails
    (RQ retries it later, waiting in Redis); the batch does not make every other instance wait
    for CUBE too, whatever number of registrations it keeps in flight. The files are stored
    either way."""
    cube = make_cube("cube5")
    config = chris_config(cube, CHRIS_HTTP_RETRIES="2", CHRIS_REGISTRATION="pacsfiles", CHRIS_RETRY_BASE="0.25",
                          CHRIS_RETRY_CAP="1", CHRIS_REGISTRATIONS_IN_FLIGHT=str(in_flight))
    files = instance_files(incoming)[:8]
    batch = [{"headers": {}, "added_params": {}, "event": instance_event(p.stem), "dcmpath": str(p)} for p in files]
    high = Queue("high", connection=connection)
    job = high.enqueue("tests.support.chris_env.run_service", "chris.store", batch=batch,
                       **job_kwargs("chrisStore", incoming, instance_event(files[0].stem), config))
    with ChrisClient(ChrisSettings.from_config(config), connection) as client:
        client.token()  # shared through Redis: the faults below are the registrations'
    # Each registration in flight is tried twice; the second tries come half a second after the
    # first ones (CHRIS_RETRY_BASE 0.25 s * 2), so every try of each meets CUBE's outage.
    cube.fail_next(2 * in_flight, status=503)
    SimpleWorker([high], connection=connection).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    error = job.latest_result().exc_string
    assert "8 of 8 instance(s) failed" in error and "HTTP 503" in error
    assert [r.status for r in cube.registrations()] == [503] * (2 * in_flight), "the others were not tried"
    assert len(list((files_root / SAG_FOLDER).glob("*.dcm"))) == 8, "stored all the same"
    FailedJobRegistry(queue=high).requeue(job.id)
    SimpleWorker([high], connection=connection).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert len([p for p in cube.state.files if p.startswith(SAG_FOLDER + "/")]) == 8


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_jobs_of_a_worker_process_register_over_kept_connections(service, connection, make_cube, incoming,
                                                                     in_flight):
    """The service keeps one session per CUBE per worker process: a job's registrations do not
    open connections of their own, one per registration in flight is kept from job to job (the
    double served as CUBE 5's runserver, Nagle on)."""
    cube = make_cube("cube5", nagle=True)
    config = chris_config(cube, CHRIS_REGISTRATIONS_IN_FLIGHT=str(in_flight))
    files = instance_files(incoming)[:8]
    high = Queue("high", connection=connection)
    for chunk in (files[:4], files[4:]):
        batch = [{"headers": {}, "added_params": {}, "event": instance_event(p.stem), "dcmpath": str(p)}
                 for p in chunk]
        high.enqueue("tests.support.chris_env.run_service", "chris.store", batch=batch,
                     **job_kwargs("chrisStore", incoming, instance_event(chunk[0].stem), config))
    SimpleWorker([high], connection=connection).work(burst=True)
    posts = [r for r in cube.registrations() if r.body["path"].startswith(SAG_FOLDER + "/")]
    assert len(posts) == 8 and {r.status for r in posts} == {201}
    assert 1 <= len({r.port for r in posts}) <= in_flight, "both jobs' registrations went over the kept connections"


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_batch_keeps_its_registrations_in_flight_as_configured(service, connection, make_cube, incoming,
                                                                 in_flight):
    """CUBE 5 registers one file at a time: a worker that waited for each answer before sending
    the next left CUBE idle while it did its own part in between. With two in flight, CUBE
    holds the next registration while it writes one; never more than configured."""
    cube = make_cube("cube5", write_cost=0.05)
    config = chris_config(cube, CHRIS_REGISTRATIONS_IN_FLIGHT=str(in_flight))
    files = instance_files(incoming)[:8]
    batch = [{"headers": {}, "added_params": {}, "event": instance_event(p.stem), "dcmpath": str(p)} for p in files]
    high = Queue("high", connection=connection)
    job = high.enqueue("tests.support.chris_env.run_service", "chris.store", batch=batch,
                       **job_kwargs("chrisStore", incoming, instance_event(files[0].stem), config))
    SimpleWorker([high], connection=connection).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert job.return_value()["registered"] == 8
    assert cube.state.most_in_flight == in_flight
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == 8 and progress["registered"] == 8 and progress["errors"] == {}


def test_a_batch_told_not_to_register_only_stores(connection, make_cube, incoming):
    """store_batch(register=False) writes and counts the files and sends CUBE nothing (its
    registration helper once shadowed the flag, and every batch registered)."""
    cube = make_cube("cube5")
    settings = ChrisSettings.from_config(chris_config(cube))
    files = instance_files(incoming)[:3]
    result = store_batch(settings, connection, [(p, instance_event(p.stem)) for p in files], register=False)
    assert (result["stored"], result["registered"]) == (3, 0)
    assert cube.registrations() == []
    assert all(Path(settings.files_root, r["path"]).is_file() for r in result["results"].values())
    assert series_progress(connection, AET, SAG_SERIES_UID)["stored"] == 3
