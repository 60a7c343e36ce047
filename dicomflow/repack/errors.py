"""The errors a repack raises: each names the file and the reason."""

from __future__ import annotations

from dicomflow.errors import DicomflowError


class RepackError(DicomflowError):
    """A file could not be repacked.

    Attributes:
        path: the file at fault (the source, or the output that could not be written).
        reason: what went wrong, without the path.
    """

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnreadableFileError(RepackError):
    """The source file cannot be opened or read (missing, a folder, no permission)."""


class NotDicomError(RepackError):
    """The source is not a DICOM Part 10 file (no ``DICM`` marker after the preamble)."""


class MalformedDicomError(RepackError):
    """The source says it is DICOM but its header cannot be parsed (truncated, bad lengths)."""


class UnsupportedEncodingError(RepackError):
    """The fast header reader does not handle this encoding; the full parser must be used."""


class UnsafeValueError(RepackError):
    """A tag value that names a log file (PatientID, a UID) cannot be used as a file name."""


class OutputError(RepackError):
    """An output file or folder could not be written."""


class UsageError(DicomflowError):
    """The repack command line is wrong (unknown option, missing value, missing --xcrdir/--datadir)."""
