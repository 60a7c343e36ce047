"""The errors of research extracts: a project file that cannot load, a profile that cannot apply."""

from __future__ import annotations

from dicomflow.errors import DicomflowError


class ProjectError(DicomflowError):
    """A project file is broken (bad YAML, a field of the wrong form, an inline secret...).

    Attributes:
        source: the project file.
        field: the field at fault (dotted path, e.g. ``studies.cohort.file``), or None.
    """

    def __init__(self, message: str, source: str = "", field: str | None = None):
        self.source = source
        self.field = field
        where = source + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}" if where else message)


class SecretError(ProjectError):
    """A project's pseudonym secret cannot be read (unset variable, missing or empty file)."""


class ProfileError(DicomflowError):
    """A de-identification profile is broken (unknown tag, unknown action, bad YAML)."""


class RecordsError(DicomflowError):
    """The export records cannot be read or written (database unreachable, a migration failed)."""
