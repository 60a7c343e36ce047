"""Research projects (issue 19): a YAML file each, validated on load, and which studies belong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dicomflow.config import settings_from_config
from dicomflow.extracts.errors import ProjectError, SecretError
from dicomflow.extracts.project import ExtractSettings, load_project, load_projects

SECRET = "s3cret-of-at-least-16-bytes"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def projects(tmp_path) -> Path:
    folder = tmp_path / "projects"
    folder.mkdir()
    (folder / "cohort.csv").write_text("PatientID,AccessionNumber\nP1,A1\n P2 ,A2\n")
    pq.write_table(pa.table({"AccessionNumber": ["A9", "A8"]}), folder / "cohort.parquet")
    write(folder, "lung-ct.yaml", """\
        slug: lung-ct
        studies:
          modalities: [ct]
          callingAeTitles: [SCANNER1]
          cohort: {file: cohort.csv}
        series:
          dropDescriptions: ["localizer", "^scout"]
          minInstances: 3
        deid:
          profile: basic
          dateShift: true
          overrides: {SeriesDescription: keep, InstitutionName: {replace: HOSPITAL}}
        destinations:
          dicom: [research-pacs]
          parquet: [local]
          endpoints: {research-pacs: {type: dicomweb, secrets: {envPrefix: LUNG_PACS}}}
        secret: {env: LUNG_SECRET}
        """)
    write(folder, "everything.yaml", """\
        slug: everything
        studies: {all: true}
        secret: {file: everything.key}
        """)
    (folder / "everything.key").write_text(SECRET + "\n")
    write(folder, "acc.yaml", """\
        slug: acc
        studies:
          cohort: {file: cohort.parquet, column: AccessionNumber}
        secret: {env: ACC_SECRET}
        """)
    return folder


def test_projects_load_with_their_fields(projects):
    loaded = load_projects(projects)
    assert loaded.problems == []
    assert sorted(loaded.projects) == ["acc", "everything", "lung-ct"]
    lung = loaded.projects["lung-ct"]
    assert lung.model.studies.modalities == ("CT",)
    assert lung.cohort == frozenset({"P1", "P2"})
    assert lung.model.deid.date_shift is True
    assert lung.model.deid.overrides["InstitutionName"] == {"replace": "HOSPITAL"}
    assert lung.model.destinations.dicom == ("research-pacs",)
    assert loaded.projects["acc"].cohort == frozenset({"A9", "A8"})


def test_which_studies_belong(projects):
    loaded = load_projects(projects)
    lung = loaded.projects["lung-ct"]
    study = {"Modality": "CT", "PatientID": "P2", "AccessionNumber": "A9"}
    assert lung.selects_study(study, "SCANNER1")
    assert lung.selects_study({**study, "Modality": "", "ModalitiesInStudy": "SR\\CT"}, "SCANNER1 ")
    assert not lung.selects_study(study, "OTHER")                       # another sender
    assert not lung.selects_study({**study, "Modality": "MR"}, "SCANNER1")
    assert not lung.selects_study({**study, "PatientID": "P3"}, "SCANNER1")  # not in the cohort
    assert not lung.selects_study({**study, "PatientID": ""}, "SCANNER1")
    assert [p.slug for p in loaded.for_study(study, "SCANNER1")] == ["acc", "everything", "lung-ct"]
    assert [p.slug for p in loaded.for_study({"Modality": "MR"}, None)] == ["everything"]


def test_series_filters(projects):
    lung = load_projects(projects).projects["lung-ct"]
    assert lung.keeps_series("T1 axial", 3)
    assert not lung.keeps_series("T1 axial", 2)
    assert not lung.keeps_series("3-plane LOCALIZER", 30)
    assert not lung.keeps_series("Scout 1", 30)
    assert lung.keeps_series("post-scout", 30)
    assert lung.keeps_series(None, 30)


def test_secret_by_reference(projects, monkeypatch):
    loaded = load_projects(projects)
    assert loaded.projects["everything"].secret() == SECRET.encode()
    assert loaded.projects["lung-ct"].secret({"LUNG_SECRET": SECRET}) == SECRET.encode()
    with pytest.raises(SecretError, match="LUNG_SECRET is not set"):
        loaded.projects["lung-ct"].secret({})
    with pytest.raises(SecretError, match="shorter than 16"):
        loaded.projects["lung-ct"].secret({"LUNG_SECRET": "short"})
    (projects / "everything.key").unlink()
    with pytest.raises(SecretError, match="everything.key"):
        loaded.projects["everything"].secret()


@pytest.mark.parametrize(("body", "field", "message"), [
    ("slug: bad\nstudies: {all: true}\nsecret: hunter2hunter2hunter2\n", "secret", "must not be written"),
    ("slug: bad\nstudies: {all: true}\nsecret: {value: x}\n", "secret.value", "Extra inputs"),
    ("slug: bad\nstudies: {all: true}\nsecret: {env: A, file: b}\n", "secret", "exactly one"),
    ("slug: bad\nstudies: {}\nsecret: {env: A}\n", "studies", "say which studies"),
    ("slug: bad\nstudies: {all: true, modalities: [CT]}\nsecret: {env: A}\n", "studies", "no other criteria"),
    ("slug: bad\nstudies: {modalitis: [CT]}\nsecret: {env: A}\n", "studies.modalitis", "Extra inputs"),
    ("slug: bad\nstudies: {all: true}\nseries: {minInstances: 0}\nsecret: {env: A}\n",
     "series.minInstances", "greater than or equal to 1"),
    ("slug: bad\nstudies: {all: true}\nseries: {dropDescriptions: ['(']}\nsecret: {env: A}\n",
     "series.dropDescriptions", "not a regular expression"),
    ("slug: bad\nstudies: {all: true}\ndeid: {overrides: {PatientID: scramble}}\nsecret: {env: A}\n",
     "deid.overrides", "unknown action 'scramble'"),
    ("slug: bad\nstudies: {cohort: {file: c.xlsx}}\nsecret: {env: A}\n", "studies.cohort.file", ".csv or .parquet"),
    ("slug: bad\nstudies: {cohort: {file: missing.csv}}\nsecret: {env: A}\n", "studies.cohort.file", "does not exist"),
    ("slug: bad\nstudies: {cohort: {file: ../projects/cohort.csv, column: AccessionNumber}}\nsecret: {env: A}\n",
     None, None),
    ("slug: other\nstudies: {all: true}\nsecret: {env: A}\n", "slug", "differs from the file name"),
    ("slug: Bad Slug\nstudies: {all: true}\nsecret: {env: A}\n", "slug", "lower-case"),
    ("slug: bad\nstudies: [all\n", None, "not valid YAML"),
    ("- a list\n", None, "is a mapping"),
])
def test_a_broken_project_is_refused_and_the_others_load(projects, body, field, message):
    (projects / "bad.yaml").write_text(body)
    loaded = load_projects(projects)
    assert {"acc", "everything", "lung-ct"} <= set(loaded.projects)
    if message is None:                       # the control case: a good file loads
        assert "bad" in loaded.projects and loaded.problems == []
        return
    assert "bad" not in loaded.projects
    [problem] = loaded.problems
    assert problem.source == str(projects / "bad.yaml")
    assert problem.field == field
    assert message in str(problem) and str(projects / "bad.yaml") in str(problem)


def test_a_missing_cohort_column_names_the_field(projects):
    path = write(projects, "bad.yaml", "slug: bad\nstudies: {cohort: {file: cohort.parquet}}\nsecret: {env: A}\n")
    with pytest.raises(ProjectError, match="has no column PatientID") as info:
        load_project(path)
    assert info.value.field == "studies.cohort.column"


def test_the_projects_folder_setting(tmp_path):
    settings = settings_from_config(ExtractSettings, {"DICOMFLOW_PROJECTS_DIR": str(tmp_path)}, "extracts")
    assert settings.projects_dir == tmp_path
    assert load_projects(tmp_path / "absent").projects == {}


def test_the_docs_project_examples_load(tmp_path):
    """docs/extracts.md's project file and docs/exports.md's destinations block validate as written."""
    import re

    import yaml

    from dicomflow.extracts.project import Destinations
    from tests.conftest import REPO

    extracts = (REPO / "docs" / "extracts.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", extracts[extracts.index("## Projects"):], re.S).group(1)
    (tmp_path / "lung-ct.yaml").write_text(example)
    (tmp_path / "cohort.csv").write_text("PatientID\nP1\n")
    project = load_project(tmp_path / "lung-ct.yaml")
    assert project.model.destinations.dicom == ("research-pacs",)
    exports = (REPO / "docs" / "exports.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", exports[exports.index("## Destinations in the project file"):],
                      re.S).group(1)
    destinations = Destinations.model_validate(yaml.safe_load(block)["destinations"])
    assert set(destinations.endpoints) == {"research-pacs", "research-ftps"}
