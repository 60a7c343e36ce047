"""Reading the few header values a repack needs, fast: `dicomflow.dicomheader`, pydicom as fallback.

Why not pydicom for everything: ``import pydicom`` alone costs 150-300 ms here (it pulls in
numpy when installed, and ``requests`` through ``pydicom.data``), which the per-file
``storescp -xcr`` command cannot afford (target ~40 ms per file, process start included).
The shared standard-library reader handles Explicit and Implicit VR Little Endian (nearly
every file); anything else — Explicit VR Big Endian, deflated data sets, a character set
with code extensions — goes to pydicom, which is imported only then.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from dicomflow import dicomheader
from dicomflow.dicomtags import clean_value
from dicomflow.repack.errors import (
    MalformedDicomError,
    NotDicomError,
    UnreadableFileError,
    UnsupportedEncodingError,
)

#: Every tag the repack reads: tag -> (keyword, whether its VR is decoded with the character set).
_KEYWORDS = ("SpecificCharacterSet", "SOPInstanceUID", "StudyDate", "SeriesDate", "AccessionNumber", "Modality",
             "StudyDescription", "SeriesDescription", "PatientName", "PatientID", "PatientBirthDate",
             "PatientSex", "PatientAge", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
             "InstanceNumber", "PerformedStationAETitle")
TAGS: dict[int, tuple[str, bool]] = {dicomheader.KEYWORDS[k][0]: (k, dicomheader.KEYWORDS[k][1]) for k in _KEYWORDS}
TAG_OF: dict[str, int] = {keyword: tag for tag, (keyword, _) in TAGS.items()}
_LAST_TAG = max(TAGS)

_TEXT_TAGS = frozenset(tag for tag, (_, text) in TAGS.items() if text)
#: Person Name tags, whose empty trailing component groups are dropped (see `Header.get`).
_PERSON_NAMES = frozenset({"PatientName"})
_ERRORS = {"not-dicom": NotDicomError, "malformed": MalformedDicomError, "unsupported": UnsupportedEncodingError}


class Header:
    """The values of `TAGS` found in one file, as decoded strings (padding and NULs kept)."""

    __slots__ = ("path", "reader", "values")

    def __init__(self, path: str, values: Mapping[str, str], reader: str):
        self.path = path
        self.values = dict(values)
        #: "fast" or "pydicom": which reader produced the values.
        self.reader = reader

    def get(self, keyword: str) -> str | None:
        """The clean value (NULs removed, trimmed), or None when absent, empty or multi-valued.

        A person name loses its empty trailing component groups (``Doe^Jane=`` is ``Doe^Jane``),
        as pydicom reads it, and so px-repack, in the path and in the logs, and as our pydicom
        fallback reader already gave it: the value no longer depends on the transfer syntax.
        """
        value = clean_value(self.values.get(keyword))
        if value is not None and keyword in _PERSON_NAMES and value.endswith("="):
            groups = value.split("=")
            while groups and not groups[-1]:
                groups.pop()
            value = "=".join(groups).strip() or None
        return value

    def log_value(self, keyword: str) -> str:
        """The clean value, or ``"Not defined"`` (the pypx log files' word for a missing value)."""
        value = self.get(keyword)
        return "Not defined" if value is None else value

    def missing_reason(self, keyword: str) -> str | None:
        """Why `keyword` counts as missing ("no such element", "empty value", "multiple values"), or None."""
        raw = self.values.get(keyword)
        if raw is None:
            return "no such element"
        if self.get(keyword) is not None:
            return None
        return "multiple values" if "\\" in raw.replace("\x00", "").strip() else "empty value"

    def __repr__(self) -> str:
        return f"Header({self.path!r}, {self.values!r}, reader={self.reader!r})"


def read_header(path: str) -> Header:
    """Read `TAGS` from the DICOM file at `path`: the fast reader, else pydicom.

    Raises:
        UnreadableFileError: the file cannot be opened or read.
        NotDicomError: no ``DICM`` marker after a 128-byte preamble.
        MalformedDicomError: the header is truncated or inconsistent.
    """
    try:
        return read_header_fast(path)
    except UnsupportedEncodingError:
        return read_header_pydicom(path)


def read_header_fast(path: str) -> Header:
    """Read `TAGS` with the built-in reader (Explicit/Implicit VR Little Endian only).

    Raises:
        UnsupportedEncodingError: the file needs pydicom (see the module docstring).
        UnreadableFileError, NotDicomError, MalformedDicomError: as `read_header`.
    """
    try:
        with open(path, "rb") as file:
            _, found = dicomheader.read_elements(file, TAGS, _LAST_TAG)
        values = dicomheader.decode(found, _TEXT_TAGS)
    except dicomheader.HeaderError as exc:
        raise _ERRORS[exc.kind](path, exc.reason) from exc
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc}") from exc
    return Header(path, {TAGS[tag][0]: value for tag, value in values.items()}, "fast")


def read_header_pydicom(path: str) -> Header:
    """Read `TAGS` with pydicom (any transfer syntax and character set pydicom supports).

    Raises:
        UnreadableFileError, NotDicomError, MalformedDicomError: as `read_header`.
    """
    import zlib

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAG_OF.values()))
        values = {}
        for tag, (keyword, _) in TAGS.items():
            if tag in ds:
                values[keyword] = _pydicom_text(ds[tag].value)
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    except InvalidDicomError as exc:
        raise NotDicomError(path, f"not a DICOM file ({exc})") from exc
    except (OSError, EOFError, ValueError, LookupError, struct.error, zlib.error, NotImplementedError,
            TypeError, AttributeError) as exc:
        # pydicom reports a bad file through any of these; all mean "cannot parse this header".
        raise MalformedDicomError(path, f"cannot parse the DICOM header: {exc}") from exc
    return Header(path, values, "pydicom")


def _pydicom_text(value: object) -> str:
    """A pydicom value as the string the fast reader would give (multi-values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin_1")
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)  # str, PersonName, IS, DSfloat, ...: the value as written
