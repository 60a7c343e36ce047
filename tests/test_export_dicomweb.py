"""The DICOMweb export destination against a real second Orthanc with Debian's DICOMweb plugin:
what arrives is byte for byte the de-identified files, a refused instance is named and the rest
arrive, wrong credentials / an unreachable server / missing secrets are clear errors, the secrets
never reach a log, and the shared rate limit (with its run-time override) paces the upload."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicomflow.extracts.destinations import (
    DestinationAuthError,
    DestinationBusyError,
    DestinationConfigError,
    DestinationSettings,
    DestinationUnavailableError,
    UnknownDestinationError,
    send_study,
)
from dicomflow.ratelimit import BucketKeys, set_rate
from tests.support.exports import SECRET_ENV, deidentify, write_project
from tests.support.orthanc import OrthancServer, stop_all, write_series
from tests.support.procs import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The destination Orthanc refuses, as a filter would, every instance of this patient.
REJECTED = "REJECTME"
#: Fast settings: no back-off waits in the tests.
FAST = DestinationSettings(attempts=2, retry_base=0, timeout=20, rate_max_wait=5)
WHEN = pydicom.valuerep.DT("20261202120000").replace(tzinfo=None)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[OrthancServer]:
    """A second Orthanc: DICOMweb plugin, no dicomflow plugin, its REST API behind a password."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing: apt-get install orthanc-dicomweb (.ci/run does)")
    folder = tmp_path_factory.mktemp("research-pacs")
    lua = folder / "filter.lua"
    lua.write_text(f"function ReceivedInstanceFilter(dicom, origin, info)\n"
                   f"  return dicom.PatientID ~= '{REJECTED}'\nend\n")
    server = OrthancServer(folder / "orthanc", plugin=False, extra={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "LuaScripts": [str(lua)]})
    server.start()
    yield server
    stop_all([server])


@pytest.fixture()
def empty_pacs(pacs) -> OrthancServer:
    for patient in pacs.get("/patients"):
        pacs.session.delete(f"{pacs.url}/patients/{patient}", timeout=30).raise_for_status()
    return pacs


@pytest.fixture()
def env(monkeypatch, pacs) -> dict[str, str]:
    values = {SECRET_ENV: "a-test-secret-of-32-bytes-000000", "DFTEST_PACS_URL": pacs.url + "/dicom-web",
              "DFTEST_PACS_USERNAME": pacs.username, "DFTEST_PACS_PASSWORD": pacs.password}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _project(tmp_path, **endpoint):
    entry = {"type": "dicomweb", "secrets": {"envPrefix": "DFTEST_PACS"}, "rate": 0, "maxBatchInstances": 5,
             **endpoint}
    return write_project(tmp_path / "projects", {"research-pacs": entry}, dicom=["research-pacs"])


@pytest.fixture()
def study(tmp_path, sag_anon, env):
    """12 sag-anon instances de-identified for the project: (project, study folder, study uid)."""
    project = _project(tmp_path)
    folder, uid = deidentify(project, sorted(sag_anon.glob("*.dcm"))[:12], tmp_path / "extracts")
    return project, folder, uid


def _arrived(pacs: OrthancServer) -> dict[str, bytes]:
    """SOPInstanceUID -> the bytes Orthanc stored, for every instance it holds."""
    found = {}
    for instance in pacs.get("/instances"):
        uid = pacs.get(f"/instances/{instance}/simplified-tags")["SOPInstanceUID"]
        found[uid] = pacs.session.get(f"{pacs.url}/instances/{instance}/file", timeout=30).content
    return found


def _send(project, folder, connection, settings=FAST, study_id="S1"):
    return send_study(project, "research-pacs", folder, study_id=study_id, extract_time=WHEN, settings=settings,
                      connection=connection)


def test_the_study_arrives_byte_for_byte_in_batches(study, empty_pacs, connection, caplog):
    project, folder, _ = study
    caplog.set_level(logging.INFO, logger="dicomweb_client")
    result = _send(project, folder, connection)
    files = sorted(folder.rglob("*.dcm"))
    assert result.ok and not result.partial and result.destination == "research-pacs"
    assert sorted(result.sent) == sorted(p.relative_to(folder).as_posix() for p in files)
    arrived = _arrived(empty_pacs)
    assert len(arrived) == 12
    for path in files:
        assert arrived[path.stem] == path.read_bytes(), path.name   # the file name is its SOPInstanceUID
    # 12 instances at 5 per request: 3 STOW-RS requests (dicomweb-client logs each), not 12
    assert sum(r.getMessage().startswith("store instances") for r in caplog.records) == 3


def test_a_refused_instance_is_named_and_the_rest_arrive(study, empty_pacs, connection, tmp_path):
    project, folder, uid = study
    # one instance of another study in the folder: the server refuses it (409, named in its
    # Failed SOP Sequence), one the server drops (its filter), and one that is not DICOM
    stray = write_series(tmp_path / "stray", 1, patient_id="OTHER")[0]
    shutil.copy(stray, folder / "stray.dcm")
    dropped = write_series(tmp_path / "dropped", 1, patient_id=REJECTED, study_uid=uid)[0]
    shutil.copy(dropped, folder / "dropped.dcm")
    (folder / "broken.dcm").write_bytes(b"not DICOM at all")
    result = _send(project, folder, connection)
    assert result.partial and not result.ok
    assert set(result.failed) == {"stray.dcm", "dropped.dcm", "broken.dcm"}
    assert result.failed["stray.dcm"].startswith("HTTP 409: FailureReason 0x0110")
    # Orthanc confirms a filtered instance in its STOW-RS answer; the QIDO-RS check catches it
    assert "does not hold it (QIDO-RS)" in result.failed["dropped.dcm"]
    assert "cannot read it as DICOM" in result.failed["broken.dcm"]
    assert len(result.sent) == 12
    arrived = _arrived(empty_pacs)
    assert set(arrived) == {Path(name).stem for name in result.sent}   # nothing claimed that did not arrive


def test_wrong_credentials_are_an_error_and_nothing_is_sent(study, empty_pacs, connection, monkeypatch):
    project, folder, _ = study
    monkeypatch.setenv("DFTEST_PACS_PASSWORD", "wrong-password")
    with pytest.raises(DestinationAuthError, match="research-pacs: HTTP 401"):
        _send(project, folder, connection)
    assert empty_pacs.get("/instances") == []


def test_an_unreachable_server_is_an_error_after_the_attempts(study, connection, monkeypatch, caplog):
    project, folder, _ = study
    monkeypatch.setenv("DFTEST_PACS_URL", f"http://127.0.0.1:{free_port()}/dicom-web")
    start = time.monotonic()
    with pytest.raises(DestinationUnavailableError, match="failed 2 times; last: ConnectionError"):
        _send(project, folder, connection)
    assert time.monotonic() - start < 10
    assert "attempt 1 of 2 failed" in caplog.text


def test_missing_secrets_and_unknown_destinations_are_named(study, connection, monkeypatch, tmp_path):
    project, folder, _ = study
    monkeypatch.delenv("DFTEST_PACS_URL")
    with pytest.raises(DestinationConfigError, match="environment variable DFTEST_PACS_URL"):
        _send(project, folder, connection)
    monkeypatch.setenv("DFTEST_PACS_URL", "https://user:pw@example.org/dicom-web")
    with pytest.raises(DestinationConfigError, match="carries credentials") as caught:
        _send(project, folder, connection)
    assert "pw" not in str(caught.value)
    with pytest.raises(UnknownDestinationError, match="does not define it"):
        send_study(project, "elsewhere", folder, study_id="S1", extract_time=WHEN, settings=FAST,
                   connection=connection)


def test_the_secrets_never_reach_the_log(study, empty_pacs, connection, caplog, env):
    project, folder, _ = study
    caplog.set_level(logging.DEBUG)
    assert _send(project, folder, connection).ok
    assert caplog.records, "the send logged nothing at DEBUG: the check below would prove nothing"
    assert env["DFTEST_PACS_PASSWORD"] not in caplog.text


def test_the_shared_rate_paces_the_upload_and_changes_at_run_time(study, empty_pacs, connection, tmp_path):
    _, folder, _ = study
    project = _project(tmp_path, rate=1000)                      # as configured: fast
    set_rate(connection, BucketKeys.named("research-pacs"), 10)  # an operator slows it down at run time
    start = time.monotonic()
    assert _send(project, folder, connection).ok
    # 12 instances at 10/s with a burst of 10: the last 2 tokens take >= 0.2 s, and not the
    # 0.012 s the configured rate would
    assert time.monotonic() - start >= 0.18


def test_no_token_in_time_stops_the_send_instead_of_holding_the_worker(study, empty_pacs, connection, tmp_path):
    _, folder, _ = study
    slow = DestinationSettings(attempts=1, retry_base=0, rate_max_wait=0.5)
    project = _project(tmp_path, rate=0.1, maxBatchInstances=5)   # capacity 1: a batch of 5 cannot go
    start = time.monotonic()
    with pytest.raises(DestinationBusyError, match="no rate-limit token for research-pacs"):
        _send(project, folder, connection, settings=slow)
    assert time.monotonic() - start < 4                        # not the 10 s the next token is away
    assert empty_pacs.get("/instances") == []
    # one per request: the first goes, the rest are reported not sent (partial, retryable)
    project = _project(tmp_path, rate=0.1, maxBatchInstances=1)
    connection.delete(BucketKeys.named("research-pacs").bucket)
    result = _send(project, folder, connection, settings=slow)
    assert result.partial and len(result.sent) == 1 and len(result.failed) == 11
    assert all(reason.startswith("not sent: destination research-pacs: no rate-limit token")
               for reason in result.failed.values())
    assert len(empty_pacs.get("/instances")) == 1



def test_https_trusts_the_projects_ca_file_and_refuses_other_certificates(tmp_path, study, connection,
                                                                          monkeypatch):
    """Debian's Orthanc 1.10 drops every HTTPS connection here, so the TLS peer is a plain HTTPS
    server of the test with a certificate from the test's CA: enough to show whose certificate is
    trusted (it answers 404 to STOW-RS once TLS is through)."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.support.ftps import make_certificates

    project, folder, _ = study
    ca, server_pem = make_certificates(tmp_path / "certs")

    class NotDicomweb(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not here\n")

        def log_message(self, *args):
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), NotDicomweb)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DFTEST_PACS_URL", f"https://127.0.0.1:{port}/dicom-web")
        start = time.monotonic()
        with pytest.raises(DestinationConfigError, match="TLS with the server failed .*caFile"):
            _send(_project(tmp_path, verify=False), folder, connection)    # the system's CAs: refused
        assert time.monotonic() - start < 5                                  # at once, not retried
        result = _send(_project(tmp_path, caFile=str(ca), verify=False, maxBatchInstances=12), folder, connection)
        assert not result.sent and len(result.failed) == 12                  # TLS through; then a 404
        assert all(reason.startswith("HTTP 404") for reason in result.failed.values())
    finally:
        server.shutdown()
        server.server_close()
