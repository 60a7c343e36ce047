"""Where a repacked instance goes: the pypx folder layout (rx-repack's rules, see docs/readme/repack.md).

``{PatientID}-{PatientName}-{PatientBirthDate}/{StudyDescription}-{AccessionNumber}-{StudyDate}/
{SeriesNumber:0>5}-{SeriesDescription}-{hash7}/{InstanceNumber:0>4}-{SOPInstanceUID}.dcm``
"""

from __future__ import annotations

from dicomflow.dicomtags import hash7, pad_number, sanitize
from dicomflow.errors import MissingTagError
from dicomflow.repack.header import Header

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

    return PackPath(
        sanitize(f"{req['PatientID']}-{opt('PatientName')}-{opt('PatientBirthDate')}"),
        sanitize(f"{opt('StudyDescription')}-{opt('AccessionNumber')}-{opt('StudyDate')}"),
        sanitize(f"{series_number(header.get('SeriesNumber'))}-{opt('SeriesDescription')}-"
                 f"{hash7(req['SeriesInstanceUID'])}"),
        sanitize(f"{instance_number(header.get('InstanceNumber'))}-{req['SOPInstanceUID']}.dcm"),
    )
