"""The schema of a research project file (``projects/<slug>.yaml``), validated by pydantic.

A project file (the folder is ``DICOMFLOW_PROJECTS_DIR``)::

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

Loading a file, its cohort and secret, and which studies a project selects: dicomflow.extracts.project.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The destination name of the local extract folder (a Parquet destination without an endpoint).
LOCAL = "local"
#: The actions a project may set for a tag (see dicomflow.extracts.deid).
ACTIONS = ("keep", "remove", "empty", "replace", "hash", "uid", "shift")


class _Model(BaseModel):
    """camelCase in the YAML (as in settings.json), unknown fields refused (a typo is an error)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


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
