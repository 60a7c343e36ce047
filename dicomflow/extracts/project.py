"""Research projects: one YAML file each, validated on load, and which studies belong to them.

The file's format and its validation are dicomflow.extracts.projectfile (``projects/<slug>.yaml``,
the folder ``DICOMFLOW_PROJECTS_DIR``); its names are importable from here too. Relative paths
(cohort, secret file, profile) are relative to the project file's folder.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dicomflow.extracts.errors import ProjectError, SecretError
from dicomflow.extracts.projectfile import (
    ACTIONS,
    DESTINATION_NAME,
    LOCAL,
    SLUG,
    Cohort,
    CredentialsRef,
    DeidSettings,
    Destinations,
    Endpoint,
    ProjectModel,
    SecretRef,
    SeriesFilter,
    StudySelection,
)
from dicomflow.settings import REPO_ROOT

#: Largest project file read (like a service's settings.json).
MAX_PROJECT_BYTES = 1 << 20
#: Shortest pseudonym secret accepted: a short key makes keyed pseudonyms guessable.
MIN_SECRET_BYTES = 16

__all__ = [
    "ACTIONS", "DESTINATION_NAME", "LOCAL", "MAX_PROJECT_BYTES", "MIN_SECRET_BYTES", "SLUG", "Cohort",
    "CredentialsRef", "DeidSettings", "Destinations", "Endpoint", "ExtractSettings", "Project", "ProjectModel",
    "ProjectSet", "SecretRef", "SeriesFilter", "StudySelection", "load_project", "load_projects",
]


class ExtractSettings(BaseModel):
    """The configuration keys research extracts read."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    projects_dir: Path = Field(default=REPO_ROOT / "projects", alias="DICOMFLOW_PROJECTS_DIR")
    home: Path = Field(default=REPO_ROOT / "state", alias="DICOMFLOW_HOME")
    extracts_dir: Path | None = Field(default=None, alias="DICOMFLOW_EXTRACTS_DIR")
    #: The export records (dicomflow/extracts/records.py); default SQLite in the state folder.
    db_url: str | None = Field(default=None, alias="DICOMFLOW_DB_URL")
    #: PIXL's local layout of Parquet extracts: <exports dir>/<project>/all_extracts/<time>/.
    exports_dir: Path | None = Field(default=None, alias="DICOMFLOW_EXPORTS_DIR")

    @property
    def output_dir(self) -> Path:
        """Where de-identified files are written: DICOMFLOW_EXTRACTS_DIR, else <home>/extracts."""
        return self.extracts_dir or self.home / "extracts"

    @property
    def records_url(self) -> str:
        """The export records' database: DICOMFLOW_DB_URL, else ``sqlite:///<home>/exports.db``."""
        return self.db_url or f"sqlite:///{self.home / 'exports.db'}"

    @property
    def parquet_dir(self) -> Path:
        """Where Parquet extracts are written: DICOMFLOW_EXPORTS_DIR, else <home>/exports."""
        return self.exports_dir or self.home / "exports"

    @property
    def work_dir(self) -> Path:
        """Per-job working folders of exports that go to DICOM destinations: <home>/extracts-work."""
        return self.home / "extracts-work"


@dataclass(frozen=True)
class Project:
    """A loaded project: its settings, its cohort, and where its file is.

    Attributes:
        model: the validated project file.
        source: the project file.
        cohort: the PatientIDs (or AccessionNumbers) of its cohort file, or None without one.
    """

    model: ProjectModel
    source: Path
    cohort: frozenset[str] | None = field(default=None, repr=False)

    @property
    def slug(self) -> str:
        return self.model.slug

    def path(self, value: Path | str) -> Path:
        """A path of the project file, relative to the file's folder."""
        value = Path(value)
        return value if value.is_absolute() else self.source.parent / value

    def selects_study(self, headers: Mapping[str, Any], calling_ae: str | None, *, modalities: bool = True) -> bool:
        """Whether a study belongs to this project.

        Args:
            headers: DICOM keyword -> value of one of the study's instances (Modality,
                ModalitiesInStudy, PatientID, AccessionNumber are read).
            calling_ae: the AE title the study was sent from.
            modalities: check the modalities; False when `headers` are one instance's and the
                study's other modalities are not known yet (the check is made on the files).
        """
        sel = self.model.studies
        if sel.all:
            return True
        if sel.modalities and modalities:
            present = {m.strip().upper() for key in ("ModalitiesInStudy", "Modality")
                       for m in str(headers.get(key) or "").split("\\") if m.strip()}
            if not present & set(sel.modalities):
                return False
        if sel.calling_ae_titles and (calling_ae or "").strip() not in sel.calling_ae_titles:
            return False
        if sel.cohort is not None:
            value = str(headers.get(sel.cohort.column) or "").strip()
            if not value or value not in (self.cohort or ()):
                return False
        return True

    def keeps_series(self, description: str | None, instances: int) -> bool:
        """Whether a series goes into the extract (not a dropped description, enough instances)."""
        flt = self.model.series
        if instances < flt.min_instances:
            return False
        return not any(re.search(p, description or "", re.IGNORECASE) for p in flt.drop_descriptions)

    def secret(self, environ: Mapping[str, str] | None = None) -> bytes:
        """The project's pseudonym secret.

        Raises:
            SecretError: the variable is unset, the file missing or unreadable, or the secret
                shorter than MIN_SECRET_BYTES.
        """
        ref = self.model.secret
        if ref.env is not None:
            environ = os.environ if environ is None else environ
            value = (environ.get(ref.env) or "").strip().encode()
            where = f"environment variable {ref.env}"
        else:
            path = self.path(ref.file)
            try:
                value = path.read_bytes().strip()
            except OSError as exc:
                raise SecretError(f"cannot read the secret file {path}: {exc.strerror}",
                                  str(self.source), "secret.file") from exc
            where = f"secret file {path}"
        if len(value) < MIN_SECRET_BYTES:
            problem = "is not set" if not value else f"is shorter than {MIN_SECRET_BYTES} bytes"
            raise SecretError(f"the {where} {problem}", str(self.source), "secret")
        return value


def _read_cohort(path: Path, column: str, source: Path) -> frozenset[str]:
    """The values of `column` in a CSV (with a header row) or Parquet file."""
    where = "studies.cohort.file"
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow as pa  # only projects with a Parquet cohort need pyarrow
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except pa.ArrowException as exc:
                raise ProjectError(f"cannot read the cohort file {path}: {exc}", str(source), where) from exc
            if column not in table.column_names:
                raise ProjectError(f"{path} has no column {column} (it has {', '.join(table.column_names)})",
                                   str(source), "studies.cohort.column")
            values: Iterable[Any] = table.column(column).to_pylist()
        else:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if column not in (reader.fieldnames or ()):
                    raise ProjectError(f"{path} has no column {column} (header: {reader.fieldnames})",
                                       str(source), "studies.cohort.column")
                values = [row[column] for row in reader]
    except FileNotFoundError as exc:
        raise ProjectError(f"the cohort file {path} does not exist", str(source), where) from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ProjectError(f"cannot read the cohort file {path}: {exc}", str(source), where) from exc
    return frozenset(str(v).strip() for v in values if v is not None and str(v).strip())


def load_project(path: Path | str) -> Project:
    """Read and validate one project file.

    Raises:
        ProjectError: the file is unreadable, not YAML, or does not fit the schema; the
            message names the file and the field.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROJECT_BYTES:
            raise ProjectError(f"larger than {MAX_PROJECT_BYTES} bytes", str(path))
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProjectError(f"cannot read: {exc.strerror}", str(path)) from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ProjectError(f"not valid YAML: {exc}", str(path)) from exc
    if not isinstance(data, dict):
        raise ProjectError("a project file is a mapping (slug:, studies:, secret: ...)", str(path))
    try:
        model = ProjectModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ProjectError(err["msg"].removeprefix("Value error, ") + more, str(path), loc) from exc
    if model.slug != path.stem:
        raise ProjectError(f"the slug {model.slug!r} differs from the file name ({path.stem}.yaml)",
                           str(path), "slug")
    project = Project(model=model, source=path)
    cohort = model.studies.cohort
    if cohort is not None:
        project = Project(model=model, source=path,
                          cohort=_read_cohort(project.path(cohort.file), cohort.column, path))
    return project


@dataclass(frozen=True)
class ProjectSet:
    """The projects of a folder that loaded, and the problems of those that did not."""

    projects: dict[str, Project]
    problems: list[ProjectError]

    def for_study(self, headers: Mapping[str, Any], calling_ae: str | None, *, modalities: bool = True
                  ) -> list[Project]:
        """The projects a study belongs to, in slug order (`modalities` as in `Project.selects_study`)."""
        return [p for _, p in sorted(self.projects.items())
                if p.selects_study(headers, calling_ae, modalities=modalities)]


def load_projects(folder: Path | str) -> ProjectSet:
    """Load every ``*.yaml`` / ``*.yml`` in `folder`; a broken file is reported, the others load.

    A missing folder is no projects (and no problem).
    """
    folder = Path(folder)
    projects: dict[str, Project] = {}
    problems: list[ProjectError] = []
    if not folder.is_dir():
        return ProjectSet(projects, problems)
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            project = load_project(path)
        except ProjectError as exc:
            problems.append(exc)
            continue
        if project.slug in projects:
            problems.append(ProjectError(f"slug {project.slug!r} is also {projects[project.slug].source}",
                                         str(path), "slug"))
            continue
        projects[project.slug] = project
    return ProjectSet(projects, problems)
