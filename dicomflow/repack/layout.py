"""Where a repacked instance goes: the pypx folder layout (rx-repack's rules, see docs/repack.md).

``{PatientID}-{PatientName}-{PatientBirthDate}/{StudyDescription}-{AccessionNumber}-{StudyDate}/
{SeriesNumber:0>5}-{SeriesDescription}-{hash7}/{InstanceNumber:0>4}-{SOPInstanceUID}.dcm``

A name longer than the file system allows (`NAME_MAX` bytes; px-repack and rx-repack fail
with "File name too long") is shortened by `fit_name`.
"""

from __future__ import annotations

from dicomflow.dicomtags import hash7, pad_number, sanitize
from dicomflow.errors import MissingTagError
from dicomflow.repack.header import Header

#: Linux's NAME_MAX: the most bytes one file or folder name may have (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255
#: The most bytes of the file name: its log file (kind 5) is named ``{file name}.json``.
FILE_NAME_MAX = NAME_MAX - len(".json")
#: Hex digits of the SHA-256 that a shortened name carries.
HASH_DIGITS = 16

#: Tags without which nothing is written.
REQUIRED = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID")
#: Optional tags of the path; a missing one is replaced by its own name.
PATH_OPTIONAL = ("PatientName", "PatientBirthDate", "StudyDescription", "AccessionNumber", "StudyDate",
                 "SeriesNumber", "SeriesDescription", "InstanceNumber")


class PackPath:
    """The four sanitised components of an instance's place under the data folder."""

    __slots__ = ("filename", "patient", "series", "study")

    def __init__(self, patient: str, study: str, series: str, filename: str):
        self.patient = patient
        self.study = study
        self.series = series
        self.filename = filename

    @property
    def series_dir(self) -> str:
        """The series folder relative to the data folder."""
        return f"{self.patient}/{self.study}/{self.series}"

    @property
    def relpath(self) -> str:
        """The file relative to the data folder."""
        return f"{self.patient}/{self.study}/{self.series}/{self.filename}"

    def __repr__(self) -> str:
        return f"PackPath({self.relpath!r})"


def fit_name(name: str, keep: str = "", limit: int = NAME_MAX) -> str:
    """`name` when it fits in `limit` bytes of UTF-8, else a shortened name of at most `limit` bytes.

    The shortened name is ``{prefix}_{digest}{keep}``: `digest` is the first `HASH_DIGITS`
    hex digits of the SHA-256 of the whole `name` (UTF-8), `keep` its ending that must
    survive (``.dcm``, the series folder's ``-{hash7}``, a log file's ``-meta.json``), and
    `prefix` the longest start of the rest that fits (never a character cut in two). So
    the same name always gives the same result, in any process or worker, names that fit
    are never changed, and two long names that differ anywhere, even only at the very end,
    get different digests.

    Args:
        name: the full name; it must end with `keep`.
        keep: the ending to keep (a few ASCII characters).
        limit: the most bytes the result may have.
    """
    data = name.encode()
    if len(data) <= limit:
        return name
    import hashlib  # only here: the per-file command's imports are kept to the minimum

    digest = hashlib.sha256(data).hexdigest()[:HASH_DIGITS]
    tail = keep.encode()
    room = limit - 1 - HASH_DIGITS - len(tail)
    prefix = data[:len(data) - len(tail)][:room].decode("utf-8", "ignore")
    return f"{prefix}_{digest}{keep}"


def required_values(header: Header) -> dict[str, str]:
    """The clean values of `REQUIRED`.

    Raises:
        MissingTagError: one is absent, empty or multi-valued (the first such, in `REQUIRED` order).
    """
    values = {}
    for keyword in REQUIRED:
        value = header.get(keyword)
        if value is None:
            raise MissingTagError(keyword, header.path)
        values[keyword] = value
    return values


def series_number(value: str | None) -> str:
    """SeriesNumber padded to 5: an unsigned integer is re-read first ("05" -> "00005"), else kept."""
    if value is None:
        return "SeriesNumber"
    # isascii: str.isdigit() also accepts e.g. "²", which int() rejects.
    return pad_number(value, 5, parse=value.isascii())


def instance_number(value: str | None) -> str:
    """InstanceNumber: the trimmed raw string padded to 4 (not re-parsed, as rx-repack)."""
    return "InstanceNumber" if value is None else pad_number(value, 4, parse=False)


def pack_path(header: Header) -> PackPath:
    """The place of the instance described by `header`.

    Raises:
        MissingTagError: a `REQUIRED` tag is missing.
    """
    req = required_values(header)

    def opt(keyword: str) -> str:
        value = header.get(keyword)
        return keyword if value is None else value

    series_hash = f"-{hash7(req['SeriesInstanceUID'])}"
    return PackPath(
        fit_name(sanitize(f"{req['PatientID']}-{opt('PatientName')}-{opt('PatientBirthDate')}")),
        fit_name(sanitize(f"{opt('StudyDescription')}-{opt('AccessionNumber')}-{opt('StudyDate')}")),
        fit_name(sanitize(f"{series_number(header.get('SeriesNumber'))}-{opt('SeriesDescription')}")
                 + series_hash, keep=series_hash),
        fit_name(sanitize(f"{instance_number(header.get('InstanceNumber'))}-{req['SOPInstanceUID']}.dcm"),
                 keep=".dcm", limit=FILE_NAME_MAX),
    )
