"""The destinations part of a project file (issue 20): endpoints validated on load, connection
details refused in the YAML, secrets read by reference when a send needs them."""

from __future__ import annotations

import pytest
import yaml

from dicomflow.extracts.destinations import DestinationConfigError, endpoint_of
from dicomflow.extracts.destinations.secrets import read_credentials
from dicomflow.extracts.errors import ProjectError
from dicomflow.extracts.project import load_project, load_projects


def _write(tmp_path, destinations) -> object:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"slug": "p", "studies": {"all": True}, "secret": {"env": "P_SECRET"},
                                    "destinations": destinations}))
    return path


@pytest.mark.parametrize(("destinations", "field", "message"), [
    ({"dicom": ["pacs"], "endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"},
                                                "url": "https://pacs"}}},
     "destinations.endpoints.pacs", "url must not be written in the project file"),
    ({"endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}, "password": "hunter2"}}},
     "destinations.endpoints.pacs", "password must not be written"),
    ({"endpoints": {"pacs": {"type": "dicomweb", "secrets": "https://user:pw@pacs"}}},
     "destinations.endpoints.pacs.secrets", "connection details live in the project's secrets"),
    ({"endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X", "file": "f"}}}},
     "destinations.endpoints.pacs.secrets", "exactly one of envPrefix or file"),
    ({"endpoints": {"pacs": {"type": "sftp", "secrets": {"envPrefix": "X"}}}},
     "destinations.endpoints.pacs.type", "'dicomweb' or 'ftps'"),
    ({"endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}, "rate": -1}}},
     "destinations.endpoints.pacs.rate", "greater than or equal to 0"),
    ({"parquet": ["pacs"], "endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}}}},
     "destinations.parquet", "takes DICOM, not Parquet"),
    ({"dicom": ["../etc"]}, "destinations.dicom", "not a destination name"),
    ({"endpoints": {"a b": {"type": "ftps", "secrets": {"envPrefix": "X"}}}}, "destinations.endpoints",
     "not a destination name"),
    ({"dicom": ["research-pacs"]}, "destinations.dicom",
     "'research-pacs' is not defined under destinations.endpoints (defined: none)"),
    ({"dicom": ["pacs"], "parquet": ["local", "files"], "endpoints": {
        "pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}}}},
     "destinations.parquet", "'files' is not defined under destinations.endpoints (defined: pacs)"),
    ({"dicom": ["local"]}, "destinations.dicom", "local is for parquet only"),
    ({"endpoints": {"local": {"type": "ftps", "secrets": {"envPrefix": "X"}}}}, "destinations.endpoints",
     "local is the local extract folder"),
    ({"endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}, "ratee": 3}}},
     "destinations.endpoints.pacs.ratee", "Extra inputs"),
])
def test_broken_destinations_are_refused_naming_the_field(tmp_path, destinations, field, message):
    with pytest.raises(ProjectError) as caught:
        load_project(_write(tmp_path, destinations))
    assert caught.value.field == field and message in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'p.yaml'} [{field}]: ")
    assert "hunter2" not in str(caught.value)


def test_a_project_naming_an_undefined_destination_is_refused_and_the_others_load(tmp_path):
    _write(tmp_path, {"dicom": ["pacs"], "parquet": ["local"],
                      "endpoints": {"pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}}}})
    (tmp_path / "q.yaml").write_text("slug: q\nstudies: {all: true}\nsecret: {env: Q_SECRET}\n"
                                     "destinations: {dicom: [pacs]}\n")
    loaded = load_projects(tmp_path)
    assert list(loaded.projects) == ["p"]
    [problem] = loaded.problems
    assert problem.source == str(tmp_path / "q.yaml") and problem.field == "destinations.dicom"
    assert "'pacs' is not defined under destinations.endpoints" in str(problem)


def test_defaults_and_secrets_from_a_file(tmp_path):
    (tmp_path / "s.env").write_text("URL=ftps://files.example.org:2121/in\nUSERNAME=u\nPASSWORD=p4ss\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    project = load_project(_write(tmp_path, {"dicom": ["f"], "endpoints": {
        "f": {"type": "ftps", "secrets": {"file": "s.env"}, "caFile": "ca.pem"}}}))
    endpoint = endpoint_of(project, "f")
    assert (endpoint.rate, endpoint.burst, endpoint.max_batch_instances, endpoint.verify) == (5.0, 1.0, 20, True)
    credentials = read_credentials(project, "f", endpoint)
    assert (credentials.url, credentials.username, credentials.password) == (
        "ftps://files.example.org:2121/in", "u", "p4ss")
    assert credentials.ca_file == tmp_path / "ca.pem" and "p4ss" not in repr(credentials)


@pytest.mark.parametrize(("content", "message"), [
    ("URL=https://files.example.org\nUSERNAME=u\nPASSWORD=p\n", "must be a ftps URL"),
    ("URL=ftps://files.example.org\nUSERNAME=u\n", "needs USERNAME in"),
    ("URL=ftps://files.example.org\nUSERNAME=u\nPASSWORD=p\nPASWORD=typo\n", "unknown keys PASWORD"),
    ("this line holds the secret s3cr3t\n", "is not KEY=VALUE lines"),
])
def test_bad_secrets_files_are_named_without_their_values(tmp_path, content, message):
    (tmp_path / "s.env").write_text(content)
    project = load_project(_write(tmp_path, {"dicom": ["f"], "endpoints": {
        "f": {"type": "ftps", "secrets": {"file": "s.env"}}}}))
    with pytest.raises(DestinationConfigError, match=message) as caught:
        read_credentials(project, "f", endpoint_of(project, "f"))
    assert "s3cr3t" not in str(caught.value) and str(tmp_path / "s.env") in str(caught.value)


def test_a_missing_ca_file_is_named(tmp_path):
    project = load_project(_write(tmp_path, {"dicom": ["d"], "endpoints": {
        "d": {"type": "dicomweb", "secrets": {"envPrefix": "DFTEST_D"}, "caFile": "nowhere.pem"}}}))
    with pytest.raises(DestinationConfigError, match="nowhere.pem does not exist"):
        read_credentials(project, "d", endpoint_of(project, "d"), environ={"DFTEST_D_URL": "https://pacs"})


def test_a_send_result_says_ok_partial_or_failed_and_survives_pickling():
    import pickle

    from dicomflow.extracts.destinations import SendResult

    assert SendResult("d", ("a", "b")).ok and not SendResult("d", ("a", "b")).partial
    partial = SendResult("d", ("a",), {"b": "HTTP 409"})
    assert partial.partial and not partial.ok
    failed = SendResult("d", (), {"a": "x", "b": "y"})
    assert not failed.ok and not failed.partial
    assert pickle.loads(pickle.dumps(partial)) == partial                 # RQ keeps job results pickled
    assert partial.as_dict() == {"destination": "d", "sent": 1, "failed": {"b": "HTTP 409"}, "ok": False,
                                 "partial": True}


def test_a_send_takes_destination_settings_or_a_configuration_not_other_settings(tmp_path, connection):
    """No fallback to the process's configuration: what is not the caller's configuration is refused."""
    from dicomflow.extracts.destinations import send_study
    from dicomflow.extracts.project import ExtractSettings

    project = load_project(_write(tmp_path, {"dicom": ["d"], "endpoints": {
        "d": {"type": "dicomweb", "secrets": {"envPrefix": "DFTEST_NOWHERE"}}}}))
    with pytest.raises(TypeError, match="not ExtractSettings"):
        send_study(project, "d", tmp_path, study_id="S1", extract_time=None, settings=ExtractSettings(),
                   connection=connection)
    with pytest.raises(DestinationConfigError, match="DFTEST_NOWHERE_URL"):    # a mapping is read as one
        send_study(project, "d", tmp_path, study_id="S1", extract_time=None,
                   settings={"DICOMFLOW_EXPORT_ATTEMPTS": "1"}, connection=connection)
