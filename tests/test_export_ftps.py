"""The FTPS export destination against a real FTPS server (pyftpdlib, TLS required, a certificate
made by the test): PIXL's remote layout, files under a temporary name until complete, a dropped
connection retried to completion with no final-named partial file, the certificate verified
against the project's CA file, and clear errors for a refused login."""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dicomflow.extracts.destinations import (
    DestinationAuthError,
    DestinationConfigError,
    DestinationSettings,
    DestinationUnavailableError,
    send_parquet,
    send_study,
)
from tests.support.exports import SECRET_ENV, deidentify, write_project
from tests.support.ftps import FtpsServer, make_certificates

FAST = DestinationSettings(attempts=3, retry_base=0, timeout=10, rate_max_wait=5)
ONCE = DestinationSettings(attempts=1, retry_base=0, timeout=10, rate_max_wait=5)
WHEN = dt.datetime(2026, 12, 2, 9, 30, 5, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture()
def ftps(tmp_path, certificates) -> Iterator[FtpsServer]:
    server = FtpsServer(tmp_path / "ftp-root", certificates[1]).start()
    yield server
    server.stop()


@pytest.fixture()
def project(tmp_path, ftps, certificates, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "a-test-secret-of-32-bytes-000000")
    secrets = tmp_path / "projects" / "secrets" / "ftps.env"
    secrets.parent.mkdir(parents=True)
    secrets.write_text(f"URL={ftps.url}/upload\nUSERNAME={ftps.username}\nPASSWORD={ftps.password}\n")
    return write_project(tmp_path / "projects", {"research-ftps": {
        "type": "ftps", "secrets": {"file": "secrets/ftps.env"}, "caFile": str(certificates[0]), "rate": 0}},
        dicom=["research-ftps"], parquet=["research-ftps"])


@pytest.fixture()
def study(project, sag_anon, tmp_path):
    folder, _ = deidentify(project, sorted(sag_anon.glob("*.dcm"))[:6], tmp_path / "extracts")
    return folder


def _zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_a_study_lands_as_one_zip_in_pixls_layout(project, study, ftps, connection):
    result = send_study(project, "research-ftps", study, study_id="2.25.1234", extract_time=WHEN, settings=FAST,
                        connection=connection)
    names = sorted(p.relative_to(study).as_posix() for p in study.rglob("*.dcm"))
    assert result.ok and sorted(result.sent) == names
    files = ftps.files()
    assert list(files) == ["upload/lung-ct/2.25.1234.zip"]          # nothing else: no temporary file left
    assert _zip_members(files["upload/lung-ct/2.25.1234.zip"]) == {n: (study / n).read_bytes() for n in names}
    # the data connection resumed the control connection's TLS session (servers may require it)
    assert ftps.data_sessions_reused == [True]


def test_a_parquet_extract_lands_under_its_datetime(project, ftps, connection, tmp_path):
    extract = tmp_path / "all_extracts" / "2026-12-02t09-30-05"
    (extract / "radiology").mkdir(parents=True)
    (extract / "omop" / "public").mkdir(parents=True)
    pq.write_table(pa.table({"study": ["a", "b"], "instances": [3, 4]}), extract / "radiology" / "radiology.parquet")
    pq.write_table(pa.table({"person_id": [1, 2]}), extract / "omop" / "public" / "PERSON.parquet")
    result = send_parquet(project, "research-ftps", extract, extract_time=WHEN, settings=FAST, connection=connection)
    assert result.ok and sorted(result.sent) == ["omop/public/PERSON.parquet", "radiology/radiology.parquet"]
    base = "upload/lung-ct/2026-12-02t09-30-05/parquet/"
    assert ftps.files() == {base + name: (extract / name).read_bytes()
                            for name in ("omop/public/PERSON.parquet", "radiology/radiology.parquet")}
    assert pq.read_table(ftps.root / base / "radiology/radiology.parquet").column("instances").to_pylist() == [3, 4]


def test_a_connection_dropped_mid_file_leaves_no_final_file_and_the_retry_completes_it(project, study, ftps,
                                                                                        connection):
    final = "upload/lung-ct/S9.zip"
    ftps.drop_uploads = 1                                    # the next upload is cut after 40 kB
    with pytest.raises(DestinationUnavailableError, match="upload of upload/lung-ct/S9.zip failed 1 times"):
        send_study(project, "research-ftps", study, study_id="S9", extract_time=WHEN, settings=ONCE,
                   connection=connection)
    left = ftps.files()
    assert final not in left                                 # a reader never sees half a file by its name
    assert list(left) == ["upload/lung-ct/.S9.zip.part"] and 0 < len(left["upload/lung-ct/.S9.zip.part"]) < 10**6
    # the export is retried: the same zip (identical bytes) over the same temporary name, then renamed
    result = send_study(project, "research-ftps", study, study_id="S9", extract_time=WHEN, settings=ONCE,
                        connection=connection)
    assert result.ok
    files = ftps.files()
    assert list(files) == [final]
    assert len(_zip_members(files[final])) == 6


def test_a_drop_within_one_send_is_retried_on_a_new_connection(project, study, ftps, connection, caplog):
    ftps.drop_uploads = 2
    result = send_study(project, "research-ftps", study, study_id="S10", extract_time=WHEN, settings=FAST,
                        connection=connection)
    assert result.ok and list(ftps.files()) == ["upload/lung-ct/S10.zip"]
    assert "attempt 1 of 3 failed" in caplog.text and "attempt 2 of 3 failed" in caplog.text


def test_a_certificate_not_from_the_projects_ca_is_refused(tmp_path, ftps, study, connection, project):
    other_ca, _ = make_certificates(tmp_path / "other-certs")
    untrusting = write_project(tmp_path / "projects", {"research-ftps": {
        "type": "ftps", "secrets": {"file": "secrets/ftps.env"}, "caFile": str(other_ca)}}, dicom=["research-ftps"])
    with pytest.raises(DestinationConfigError, match="certificate is not trusted"):
        send_study(untrusting, "research-ftps", study, study_id="S1", extract_time=WHEN, settings=FAST,
                   connection=connection)
    assert ftps.files() == {}


def test_a_refused_login_is_an_error_naming_the_destination(project, study, ftps, connection, tmp_path):
    secrets = tmp_path / "projects" / "secrets" / "ftps.env"
    secrets.write_text(f"URL={ftps.url}\nUSERNAME={ftps.username}\nPASSWORD=not-the-password\n")
    with pytest.raises(DestinationAuthError, match="research-ftps: the server refused the login") as caught:
        send_study(project, "research-ftps", study, study_id="S1", extract_time=WHEN, settings=FAST,
                   connection=connection)
    assert "not-the-password" not in str(caught.value)
    secrets.write_text(f"URL={ftps.url}\nUSERNAME={ftps.username}\n")
    with pytest.raises(DestinationConfigError, match="needs USERNAME in .* and PASSWORD in"):
        send_study(project, "research-ftps", study, study_id="S1", extract_time=WHEN, settings=FAST,
                   connection=connection)


def test_a_study_id_that_is_not_a_file_name_is_refused(project, study, ftps, connection):
    with pytest.raises(Exception, match="cannot be a file name"):
        send_study(project, "research-ftps", study, study_id="../escape", extract_time=WHEN, settings=FAST,
                   connection=connection)
    assert ftps.files() == {}
