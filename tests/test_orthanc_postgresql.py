"""Orthanc's index in PostgreSQL (ORTHANC_DB_URL, Debian's orthanc-postgresql): configuration, and
the whole pipeline on it (storescu -> Orthanc on PostgreSQL -> plugin -> scheduler -> worker).

The rest of the end-to-end suite runs on it too with TEST_ORTHANC_INDEX=postgresql
(tests/support/orthanc_index.py; docs/scaling.md says how).
"""

from __future__ import annotations

import json

import pytest

from dicomflow.errors import ConfigError
from dicomflow.orthanc_config import POSTGRESQL_INDEX_PLUGIN, OrthancSettings, main, render_orthanc_config
from tests.support.orthanc import write_series
from tests.support.orthanc_index import INDEX_ENV, create_database, drop_database, index_rows
from tests.support.procs import wait_for
from tests.support.services import job, make_service
from tests.support.stack import Pipeline, diagnostics

BASE = {"DICOMFLOW_HOME": "/srv/df", "ORTHANC_PASSWORD": "s3cret"}

READING_WORKER = '''
import pydicom

def worker(jobName, headers, params, added_params, dcmpath=None, connection=None, **kwargs):
    ds = pydicom.dcmread(dcmpath, stop_before_pixels=True)
    connection.rpush("pg:log", str(ds.SOPInstanceUID))
'''


def test_orthanc_db_url_turns_on_the_postgresql_index_plugin():
    url = "postgresql://orthanc:pw@db.example:5432/orthanc"
    config = render_orthanc_config(OrthancSettings.from_config({**BASE, "ORTHANC_DB_URL": url}),
                                   scheduler_url="http://x", token="t")
    assert config["Plugins"] == [str(POSTGRESQL_INDEX_PLUGIN), "/usr/share/orthanc/plugins/libOrthancPython.so"]
    assert config["PostgreSQL"] == {"EnableIndex": True, "EnableStorage": False, "ConnectionUri": url, "Lock": True}
    # The files stay in the storage folder; only the index moves.
    assert config["StorageDirectory"] == "/srv/df/orthanc/storage"
    default = render_orthanc_config(OrthancSettings.from_config(BASE), scheduler_url="http://x", token="t")
    assert "PostgreSQL" not in default and str(POSTGRESQL_INDEX_PLUGIN) not in default["Plugins"]


def test_a_database_url_that_is_not_postgresql_is_refused_by_name():
    with pytest.raises(ConfigError, match="ORTHANC_DB_URL"):
        OrthancSettings.from_config({**BASE, "ORTHANC_DB_URL": "mysql://orthanc@db/orthanc"})


def test_the_cli_writes_the_postgresql_section(tmp_path):
    env = tmp_path / "dicomflow.env"
    env.write_text(f"DICOMFLOW_HOME={tmp_path}\nORTHANC_PASSWORD=pw\nDICOMFLOW_SCHEDULER_TOKEN=tok\n"
                   "ORTHANC_DB_URL=postgresql://postgres@127.0.0.1:5432/orthanc\n")
    assert main(["--config", str(env), "--out", str(tmp_path / "orthanc.json")]) == 0
    written = json.loads((tmp_path / "orthanc.json").read_text())
    assert written["PostgreSQL"]["ConnectionUri"] == "postgresql://postgres@127.0.0.1:5432/orthanc"


def test_storescu_to_orthanc_on_postgresql_runs_every_job(tmp_path, redis_url, connection, monkeypatch):
    """The same path as tests/test_e2e_pipeline.py, with the index in a throwaway database."""
    monkeypatch.setenv(INDEX_ENV, "postgresql")  # what the suite-wide switch does, for this test
    services = tmp_path / "services"
    make_service(services, "reader", job("readJob", "reader"), worker_code=READING_WORKER)
    files = write_series(tmp_path / "series", 12)
    with Pipeline(tmp_path / "stack", redis_url, services, workers=1) as stack:
        db_url = stack.orthanc.settings.db_url
        assert db_url.startswith("postgresql://"), "TEST_ORTHANC_INDEX=postgresql gave the Orthanc no database"
        try:
            assert "postgresql-index" in stack.orthanc.get("/plugins")
            stack.orthanc.store(files, aet="PGTEST")
            wait_for(lambda: connection.llen("pg:log") >= len(files), timeout=60,
                     what=f"{len(files)} jobs (Orthanc on PostgreSQL)\n{diagnostics(stack)}")
            assert stack.orthanc.get("/statistics")["CountInstances"] == len(files)
            # patient + study + series + instances: the index is PostgreSQL's, not a SQLite file.
            assert index_rows(db_url) == 3 + len(files)
            assert not (stack.orthanc.settings.effective_storage_dir / "index").exists()
        finally:
            stack.stop()
            drop_database(db_url)
    import pydicom
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {s.decode() for s in connection.lrange("pg:log", 0, -1)} == sent


def test_an_unreachable_database_stops_orthanc_with_postgresql_in_its_log(tmp_path, servers):
    """A wrong ORTHANC_DB_URL is not silently replaced by SQLite: Orthanc does not start."""
    from tests.support.orthanc import OrthancServer

    url = create_database()
    drop_database(url)  # a database that no longer exists
    quick = {"EnableIndex": True, "ConnectionUri": url, "MaximumConnectionRetries": 1, "ConnectionRetryInterval": 1}
    server = OrthancServer(tmp_path / "o", plugin=False, db_url=url, extra={"PostgreSQL": quick})
    servers.append(server)
    with pytest.raises((RuntimeError, TimeoutError)):
        server.start(timeout=20)
    assert "postgresql" in server.log_tail(60).lower()
