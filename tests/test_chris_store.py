"""Atomic writes into CUBE's storage and the ChRIS settings."""

from __future__ import annotations

import pytest

from dicomflow.chris.errors import StorageWriteError
from dicomflow.chris.settings import ChrisSettings, Registration, chris_enabled
from dicomflow.chris.store import TMP_DIR, count_dicom_files, write_file
from dicomflow.errors import ConfigError


def test_write_is_atomic_and_a_resend_overwrites(tmp_path):
    root = tmp_path / "data"
    source = tmp_path / "a.dcm"
    source.write_bytes(b"first")
    target = write_file(source, root, "SERVICES/PACS/X/p/s/00001-d-abc/0001-1.2.dcm")
    assert target.read_bytes() == b"first"
    source.write_bytes(b"second")
    write_file(source, root, "SERVICES/PACS/X/p/s/00001-d-abc/0001-1.2.dcm")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["0001-1.2.dcm"]  # no temporary file beside it
    assert list((root / TMP_DIR).iterdir()) == []
    assert count_dicom_files(target.parent) == 1


def test_write_refuses_paths_outside_the_root_and_reports_io_errors(tmp_path):
    source = tmp_path / "a.dcm"
    source.write_bytes(b"x")
    with pytest.raises(StorageWriteError, match="leaves"):
        write_file(source, tmp_path / "data", "../escape.dcm")
    with pytest.raises(StorageWriteError, match="cannot write"):
        write_file(tmp_path / "missing.dcm", tmp_path / "data", "SERVICES/PACS/X/a.dcm")


def test_settings_from_config():
    config = {"CHRIS_URL": "http://cube:8000/api/v1", "CHRIS_FILES_ROOT": "/data", "CHRIS_PASSWORD": "pw",
              "CHRIS_REGISTRATION": "Series", "CHRIS_RATE_LIMIT": "", "OTHER": "x"}
    settings = ChrisSettings.from_config(config)
    assert settings.url == "http://cube:8000/api/v1/" and settings.registration is Registration.SERIES
    assert settings.rate_limit == 0 and settings.username == "chris"
    assert settings.http_retries == 2 and settings.retry_cap == 1
    with pytest.raises(ConfigError, match="CHRIS_HTTP_RETRIES"):
        ChrisSettings.from_config({**config, "CHRIS_HTTP_RETRIES": "0"})
    with pytest.raises(ConfigError, match="CHRIS_REGISTRATION"):
        ChrisSettings.from_config({**config, "CHRIS_REGISTRATION": "ftp"})
    with pytest.raises(ConfigError, match="CHRIS_PASSWORD or CHRIS_TOKEN"):
        ChrisSettings.from_config({**config, "CHRIS_PASSWORD": ""})
    with pytest.raises(ConfigError, match="CHRIS_FILES_ROOT"):
        ChrisSettings.from_config({**config, "CHRIS_FILES_ROOT": ""})
    assert chris_enabled(config) and not chris_enabled({"CHRIS_URL": "x", "CHRIS_FILES_ROOT": " "})
