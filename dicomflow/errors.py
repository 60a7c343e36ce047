"""The error classes of dicomflow: one base class, one subclass per kind of failure."""


class DicomflowError(Exception):
    """Base class of every error dicomflow raises on purpose."""


class ConfigError(DicomflowError):
    """The configuration file or an environment variable is missing or malformed."""


class ServiceLoadError(DicomflowError):
    """A service's settings.json or callback cannot be loaded.

    Attributes:
        source: the file the problem is in (settings.json, usually).
        field: the field at fault, or None when the whole file is.
    """

    def __init__(self, message: str, source: str = "", field: str | None = None):
        self.source = source
        self.field = field
        where = source + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}" if where else message)


class ServiceNameError(DicomflowError):
    """A service name that is not a plain Python identifier (or would shadow a module)."""


class EventError(DicomflowError):
    """An event from the plugin is malformed (missing fields, wrong level)."""


class MissingTagError(DicomflowError):
    """A DICOM instance lacks a tag a service requires.

    Attributes:
        keyword: the DICOM keyword of the missing tag.
    """

    def __init__(self, keyword: str, context: str = ""):
        self.keyword = keyword
        msg = f"required DICOM tag {keyword} is missing or empty"
        super().__init__(f"{context}: {msg}" if context else msg)


class OrthancError(DicomflowError):
    """Orthanc's REST API could not be reached or refused a request."""


class OrthancUnavailableError(OrthancError):
    """Orthanc did not answer, or answered 5xx: likely to pass (a restart takes seconds)."""
