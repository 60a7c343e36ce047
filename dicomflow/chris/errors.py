"""The errors of the ChRIS (CUBE) store and registration: one class per kind of failure."""

from __future__ import annotations

from dicomflow.errors import DicomflowError


class ChrisError(DicomflowError):
    """Base class of the errors storing into or registering with ChRIS."""


class InvalidTagError(ChrisError):
    """A DICOM tag ChRIS needs has a value CUBE cannot accept (e.g. StudyDate not a date).

    Attributes:
        keyword: the DICOM keyword at fault.
    """

    def __init__(self, keyword: str, value: str, reason: str):
        self.keyword = keyword
        super().__init__(f"DICOM tag {keyword}={value!r} {reason}")


class StorageWriteError(ChrisError):
    """An instance could not be written under CHRIS_FILES_ROOT."""


class ChrisRequestError(ChrisError):
    """CUBE answered a request with an error that retrying does not fix (400, 401, 403, 404).

    Attributes:
        status: the HTTP status code.
        body: CUBE's answer (parsed JSON when it was JSON, else text).
    """

    def __init__(self, method: str, url: str, status: int, body: object):
        self.status = status
        self.body = body
        super().__init__(f"{method} {url} -> HTTP {status}: {body}")


class ChrisUnavailableError(ChrisError):
    """CUBE did not answer successfully within CHRIS_HTTP_RETRIES attempts (network error or 5xx).

    Attributes:
        attempts: how many requests were made.
        last: a description of the last failure.
    """

    def __init__(self, method: str, url: str, attempts: int, last: str):
        self.attempts = attempts
        self.last = last
        super().__init__(f"{method} {url} failed after {attempts} attempt(s); last: {last}")


class RegistrationBusyError(ChrisError):
    """Another worker holds the lock of the same registration for too long."""


class SeriesIncompleteError(ChrisError):
    """A series job gave up waiting for the store jobs of its series."""


class PathTooLongError(ChrisError):
    """A storage path longer than CUBE's column (512 characters) cannot be registered."""


class BatchItemsError(ChrisError):
    """Some instances of a batched job failed; the others were stored (and registered)."""

    def __init__(self, failures: dict[str, str], done: list[str]):
        self.failures, self.done = failures, done
        shown = "; ".join(f"{key}: {message}" for key, message in list(failures.items())[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} of {len(failures) + len(done)} instance(s) failed: {shown}{more}")
