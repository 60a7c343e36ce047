"""The errors of export destinations: what stops a send before (or instead of) a per-file result."""

from __future__ import annotations

from dicomflow.errors import DicomflowError


class DestinationError(DicomflowError):
    """A destination cannot be sent to at all; nothing was recorded as sent. Retryable unless
    the cause is configuration (then retrying after the fix works).

    Attributes:
        destination: the destination's name.
    """

    def __init__(self, destination: str, message: str):
        self.destination = destination
        super().__init__(f"destination {destination}: {message}")


class UnknownDestinationError(DestinationError):
    """The project names a destination it does not define under `destinations.endpoints`."""


class DestinationConfigError(DestinationError):
    """Its secrets are missing or malformed (unset variable, no URL, a CA file that is not there)."""


class DestinationAuthError(DestinationError):
    """The server refused the credentials (HTTP 401/403, FTP 530)."""


class DestinationUnavailableError(DestinationError):
    """The server did not answer, or answered with a server error, through every attempt."""


class DestinationBusyError(DestinationError):
    """No rate-limit token within the bounded wait: the worker gives its slot back; retry later."""
