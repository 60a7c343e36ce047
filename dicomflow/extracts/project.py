"""Research projects: one YAML file each, validated on load, and which studies belong to them.

A project file (``projects/<slug>.yaml``; the folder is ``DICOMFLOW_PROJECTS_DIR``)::

    slug: lung-ct
    description: CT of the lung cohort
    studies:                      # all of the given criteria must hold; or `all: true`
      modalities: [CT]
      callingAeTitles: [CT_SCANNER_1]
      cohort: {file: cohort.csv, column: PatientID}    # or .parquet; or AccessionNumber
    series:
      dropDescriptions: ["localizer", "scout"]         # regular expressions, case-insensitive
      minInstances: 5
    deid:
      profile: basic              # a profile of dicomflow/extracts/profiles, or a path
      dateShift: true
      overrides: {SeriesDescription: keep, InstitutionName: {replace: HOSPITAL}}
    destinations:
      dicom: [research-pacs]
      parquet: [research-ftps]
      endpoints:                  # each name above but `local` (docs/exports.md)
        research-pacs: {type: dicomweb, secrets: {envPrefix: LUNG_CT_PACS}, rate: 5}
        research-ftps: {type: ftps, secrets: {file: secrets/ftps.env}, caFile: certs/ca.pem}
    secret: {env: LUNG_CT_SECRET}  # or {file: secrets/lung-ct.key}; never the secret itself

Relative paths (cohort, secret file, profile) are relative to the project file's folder.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from dicomflow.extracts.errors import ProjectError, SecretError
from dicomflow.settings import REPO_ROOT

#: Largest project file read (like a service's settings.json).
MAX_PROJECT_BYTES = 1 << 20
#: Shortest pseudonym secret accepted: a short key makes keyed pseudonyms guessable.
MIN_SECRET_BYTES = 16
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The destination name of the local extract folder (a Parquet destination without an endpoint).
LOCAL = "local"
#: The actions a project may set for a tag (see dicomflow.extracts.deid).
ACTIONS = ("keep", "remove", "empty", "replace", "hash", "uid", "shift")


class _Model(BaseModel):
    """camelCase in the YAML (as in settings.json), unknown fields refused (a typo is an error)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


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


class SecretRef(_Model):
    """Where the pseudonym secret is: an environment variable or a file, never the YAML."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(
                "the secret must not be written in the project file: give {env: VARIABLE} or {file: PATH}"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        if self.env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.env):
            raise ValueError(f"{self.env!r} is not an environment variable name")
        return self


class Cohort(_Model):
    """A list of patients (or accession numbers) from a CSV or Parquet file."""

    file: Path
    column: Literal["PatientID", "AccessionNumber"] = "PatientID"

    @field_validator("file")
    @classmethod
    def _known_format(cls, value: Path) -> Path:
        if value.suffix.lower() not in (".csv", ".parquet"):
            raise ValueError("a cohort file is .csv or .parquet")
        return value


class StudySelection(_Model):
    """Which studies belong: every criterion given must hold, or `all: true`."""

    all: bool = False
    modalities: tuple[str, ...] = ()
    calling_ae_titles: tuple[str, ...] = ()
    cohort: Cohort | None = None

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.strip().upper() for m in value)

    @field_validator("calling_ae_titles")
    @classmethod
    def _stripped(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a.strip() for a in value)

    @model_validator(mode="after")
    def _says_which(self) -> StudySelection:
        criteria = bool(self.modalities or self.calling_ae_titles or self.cohort)
        if self.all and criteria:
            raise ValueError("all: true takes no other criteria")
        if not self.all and not criteria:
            raise ValueError("say which studies belong: all: true, or modalities, callingAeTitles, cohort")
        return self


class SeriesFilter(_Model):
    """Series left out of an extract."""

    drop_descriptions: tuple[str, ...] = ()
    min_instances: int = Field(default=1, ge=1)

    @field_validator("drop_descriptions")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return value


class DeidSettings(_Model):
    """The de-identification profile and this project's changes to it."""

    profile: str = "basic"
    date_shift: bool | None = None
    keep_private: tuple[str, ...] = ()
    overrides: dict[str, str | dict[str, str]] = {}

    @field_validator("overrides")
    @classmethod
    def _actions(cls, value: dict[str, str | dict[str, str]]) -> dict[str, str | dict[str, str]]:
        for tag, action in value.items():
            if isinstance(action, dict):
                if list(action) != ["replace"]:
                    raise ValueError(f"{tag}: an action is one of {', '.join(ACTIONS)} or {{replace: VALUE}}")
            elif action not in ACTIONS:
                raise ValueError(f"{tag}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        return value


#: A destination's name: in Redis keys (its rate limit) and on the command line.
DESTINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Connection details that belong in the project's secrets, never in its YAML.
_SECRET_KEYS = ("url", "username", "user", "password", "token", "host")


class CredentialsRef(_Model):
    """Where a destination's URL and credentials are: environment variables or a file, never the YAML.

    ``{envPrefix: P}`` reads ``P_URL``, ``P_USERNAME``, ``P_PASSWORD``, ``P_TOKEN``;
    ``{file: F}`` reads ``URL=``, ``USERNAME=``, ``PASSWORD=``, ``TOKEN=`` lines (.env style).
    """

    env_prefix: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError("give {envPrefix: PREFIX} or {file: PATH}: the connection details live in the "
                             "project's secrets, not in the project file")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialsRef:
        if (self.env_prefix is None) == (self.file is None):
            raise ValueError("give exactly one of envPrefix or file")
        if self.env_prefix is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.env_prefix):
            raise ValueError(f"{self.env_prefix!r} is not an environment variable prefix")
        return self


class Endpoint(_Model):
    """One destination of a project: its kind, where its secrets are, how fast it may be sent to."""

    type: Literal["dicomweb", "ftps"]
    secrets: CredentialsRef
    #: Instances (FTPS: instances in the zip, or Parquet files) per second, all workers together; 0: no limit.
    rate: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    #: Seconds of the rate a rested destination takes at once.
    burst: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    #: The CA certificate(s) (PEM) the server's certificate must chain to; default: the system's.
    ca_file: Path | None = None
    #: STOW-RS: instances and megabytes per request at most (one larger instance goes alone).
    max_batch_instances: int = Field(default=20, ge=1, le=1000)
    max_batch_mb: float = Field(default=16.0, gt=0, le=1024)
    #: STOW-RS: after the upload, ask the server (QIDO-RS) which instances of the study it holds,
    #: and count as sent only those (a server's filter may confirm an instance it then drops).
    verify: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            inline = sorted(k for k in value if str(k).lower() in _SECRET_KEYS)
            if inline:
                raise ValueError(f"{', '.join(inline)} must not be written in the project file: put them in the "
                                 "secrets it names ({envPrefix: PREFIX} or {file: PATH})")
        return value


class Destinations(_Model):
    """Where an extract goes: destination names for DICOM and for Parquet, and what the names are.

    Every name listed under `dicom` or `parquet` must be defined under `endpoints` (but `local`,
    in `parquet`: the local extract folder only); an undefined one refuses the project on load.
    """

    # endpoints first: the lists' validators read them
    endpoints: dict[str, Endpoint] = {}
    dicom: tuple[str, ...] = ()
    parquet: tuple[str, ...] = ()

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, value: dict[str, Endpoint]) -> dict[str, Endpoint]:
        for name in value:
            _check_name(name)
            if name == LOCAL:
                raise ValueError("local is the local extract folder, not a name an endpoint can take")
        return value

    @field_validator("dicom", "parquet")
    @classmethod
    def _defined(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for name in value:
            _check_name(name)
        if "endpoints" not in info.data:   # the endpoints are broken: that error is the one to read
            return value
        defined = info.data["endpoints"]
        for name in value:
            if name in defined or (name == LOCAL and info.field_name == "parquet"):
                continue
            if name == LOCAL:
                raise ValueError("local is for parquet only; a project without dicom destinations writes its "
                                 "studies to DICOMFLOW_EXTRACTS_DIR")
            known = ", ".join(sorted(defined)) or "none"
            raise ValueError(f"{name!r} is not defined under destinations.endpoints (defined: {known})")
        if info.field_name == "parquet":
            for name in value:
                if name != LOCAL and defined[name].type == "dicomweb":
                    raise ValueError(f"{name} is a DICOMweb destination: it takes DICOM, not Parquet")
        return value


def _check_name(name: str) -> None:
    if not DESTINATION_NAME.match(name):
        raise ValueError(f"{name!r} is not a destination name (letters, digits, '.', '_', '-'; at most 63)")


class ProjectModel(_Model):
    """The schema of a project file."""

    slug: str
    description: str = ""
    studies: StudySelection
    series: SeriesFilter = SeriesFilter()
    deid: DeidSettings = DeidSettings()
    destinations: Destinations = Destinations()
    secret: SecretRef
    #: The cohort's OMOP extract (a folder with ``public/``), whose public tables every Parquet
    #: extract of the project carries in ``omop/public/`` (as PIXL does). Relative to the file.
    omop_extract: Path | None = None

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG.match(value):
            raise ValueError("a slug is lower-case letters, digits, '-' and '_' (at most 63)")
        return value


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
