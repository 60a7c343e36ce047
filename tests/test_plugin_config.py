"""Orthanc's generated configuration (dicomflow.orthanc_config): what the plugin and run.sh rely on."""

from __future__ import annotations

import json
import stat

import pytest

from dicomflow.errors import ConfigError
from dicomflow.orthanc_config import PLUGIN_SCRIPT, STABLE_SCRIPT, OrthancSettings, main, render_orthanc_config

BASE = {"DICOMFLOW_HOME": "/srv/df", "ORTHANC_PASSWORD": "s3cret"}


def test_defaults_and_plugin_section():
    settings = OrthancSettings.from_config({**BASE, "ORTHANC_PLUGIN_TAGS": "PatientID, SOPInstanceUID"})
    config = render_orthanc_config(settings, scheduler_url="http://127.0.0.1:8642", token="tok")
    assert (config["HttpPort"], config["DicomPort"], config["DicomAet"]) == (8042, 4242, "DICOMFLOW")
    assert config["StorageCompression"] is False
    assert config["RemoteAccessAllowed"] is False
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"dicomflow": "s3cret"}
    assert config["Plugins"] == ["/usr/share/orthanc/plugins/libOrthancPython.so"]
    assert config["PythonScript"] == str(PLUGIN_SCRIPT)
    # Series/study completion is the scheduler's: no Lua script, no stable events from Orthanc
    # (the plugin's StableEvents defaults to "off"); the script stays beside the plugin for users.
    assert "LuaScripts" not in config and STABLE_SCRIPT.is_file()
    assert STABLE_SCRIPT.parent == PLUGIN_SCRIPT.parent  # the docker-compose mounts that one folder
    assert config["StorageDirectory"] == "/srv/df/orthanc/storage"
    section = config["Dicomflow"]
    assert section["SchedulerUrl"] == "http://127.0.0.1:8642" and section["Token"] == "tok"
    assert section["SpoolPath"] == "/srv/df/orthanc/spool.sqlite"
    assert section["Tags"] == ["PatientID", "SOPInstanceUID"]


def test_without_plugin_or_with_another_script():
    settings = OrthancSettings.from_config(BASE)
    bare = render_orthanc_config(settings, scheduler_url="http://x", token="t", plugin=False)
    assert bare["Plugins"] == [] and "PythonScript" not in bare and "Dicomflow" not in bare
    assert "LuaScripts" not in bare
    other = render_orthanc_config(settings, scheduler_url="http://x", token="t", plugin="/tmp/noop.py")
    assert other["PythonScript"] == "/tmp/noop.py" and "LuaScripts" not in other


@pytest.mark.parametrize("key,value", [("ORTHANC_HTTP_PORT", "http"), ("ORTHANC_AET", "A" * 17),
                                       ("ORTHANC_MODALITIES", "PACS@host"), ("ORTHANC_STABLE_AGE", "0")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        OrthancSettings.from_config({**BASE, key: value})


def test_no_password_no_config():
    with pytest.raises(ConfigError, match="ORTHANC_PASSWORD"):
        render_orthanc_config(OrthancSettings.from_config({}), scheduler_url="http://x", token="t")


def test_modalities_restrict_store():
    settings = OrthancSettings.from_config({**BASE, "ORTHANC_ALWAYS_ALLOW_STORE": "false",
                                            "ORTHANC_MODALITIES": "PACS@10.0.0.5:104"})
    config = render_orthanc_config(settings, scheduler_url="http://x", token="t")
    assert config["DicomModalities"] == {"PACS": ["PACS", "10.0.0.5", 104]}
    assert config["DicomAlwaysAllowStore"] is False and config["DicomCheckModalityHost"] is True


def test_cli_writes_an_owner_only_file(tmp_path, monkeypatch):
    env = tmp_path / "dicomflow.env"
    env.write_text(f"DICOMFLOW_HOME={tmp_path}/state\nORTHANC_PASSWORD=pw\nDICOMFLOW_SCHEDULER_TOKEN=tok\n"
                   "DICOMFLOW_SCHEDULER_HOST=0.0.0.0\nORTHANC_HTTP_PORT=18042\n")
    for key in [k for k in list(__import__("os").environ) if k.startswith(("ORTHANC_", "DICOMFLOW_"))]:
        monkeypatch.delenv(key)
    out = tmp_path / "orthanc.json"
    assert main(["--config", str(env), "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = json.loads(out.read_text())
    assert config["HttpPort"] == 18042
    assert config["Dicomflow"]["SchedulerUrl"] == "http://127.0.0.1:8642"
    assert config["Dicomflow"]["Token"] == "tok"
    assert (tmp_path / "state" / "orthanc" / "storage").is_dir()
