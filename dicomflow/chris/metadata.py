"""The metadata fields CUBE registers with a file or series (cube.md section 2), CUBE-proof."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

from dicomflow.chris.errors import InvalidTagError
from dicomflow.chris.paths import required
from dicomflow.dicomtags import clean_value

#: CUBE's column limits of the optional text fields: a longer value is cut, not refused.
OPTIONAL_LIMITS = {
    "PatientName": 150,
    "AccessionNumber": 100,
    "Modality": 15,
    "ProtocolName": 64,
    "StudyDescription": 400,
    "SeriesDescription": 400,
}
#: CUBE's limits of the required fields: a longer value cannot be registered.
REQUIRED_LIMITS = {"PatientID": 100, "StudyInstanceUID": 100, "SeriesInstanceUID": 100}
PACS_NAME_LIMIT = 20
#: Days per unit of a DICOM Age String (AS), as CUBE and oxidicom count them.
AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 30.44, "Y": 365.24}
_AGE = re.compile(r"^(\d+)\s*([DWMY])$")
_DATE_FORMS = (re.compile(r"^(\d{4})(\d{2})(\d{2})$"), re.compile(r"^(\d{4})[-.](\d{2})[-.](\d{2})$"))
SEXES = ("M", "F", "O")


def round_half_away(value: float) -> int:
    """Round to the nearest integer, halves away from zero (2.5 -> 3, -2.5 -> -3)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def age_in_days(value: Any) -> int | None:
    """A DICOM AS value (`003Y`, `012M`, `005W`, `010D`) in days; None when missing or unparsable."""
    text = clean_value(value)
    if text is None:
        return None
    match = _AGE.match(text.upper())
    if not match:
        return None
    return round_half_away(int(match.group(1)) * AGE_UNIT_DAYS[match.group(2)])


def normalise_date(value: Any) -> str | None:
    """A DICOM DA value (`YYYYMMDD`, or `YYYY-MM-DD`/`YYYY.MM.DD`) as `YYYY-MM-DD`; None if not a date."""
    text = clean_value(value)
    if text is None:
        return None
    for form in _DATE_FORMS:
        match = form.match(text)
        if match:
            try:
                return dt.date(*(int(g) for g in match.groups())).isoformat()
            except ValueError:
                return None
    return None


def patient_sex(value: Any) -> str | None:
    """`M`, `F` or `O` (case-insensitive); anything else is None (omitted)."""
    text = clean_value(value)
    if text is None:
        return None
    text = text.upper()
    return text if text in SEXES else None


def check_pacs_name(pacs_name: str) -> str:
    """The PACS name as CUBE accepts it: 1-20 characters, no `/` or `,`.

    Raises:
        InvalidTagError: the name (usually the calling AE title) breaks a rule.
    """
    if not pacs_name or len(pacs_name) > PACS_NAME_LIMIT or "/" in pacs_name or "," in pacs_name:
        raise InvalidTagError("pacs_name", pacs_name, f"must be 1-{PACS_NAME_LIMIT} characters without / or ,")
    return pacs_name


def registration_fields(tags: Mapping[str, Any], pacs_name: str) -> dict[str, Any]:
    """The fields of a registration for one instance or its series (without `path`/`ndicom`).

    Optional fields that are missing or invalid are omitted (CUBE refuses `""` dates and
    `null` sex); long optional texts are cut to CUBE's limits.

    Raises:
        MissingTagError: a required tag is missing (names it).
        InvalidTagError: StudyDate is not a date, or a required value is too long.
    """
    fields: dict[str, Any] = {"pacs_name": check_pacs_name(pacs_name)}
    for keyword, limit in REQUIRED_LIMITS.items():
        value = required(tags, keyword)
        if len(value) > limit:
            raise InvalidTagError(keyword, value, f"is longer than CUBE's limit of {limit} characters")
        fields[keyword] = value
    raw_date = required(tags, "StudyDate")
    study_date = normalise_date(raw_date)
    if study_date is None:
        raise InvalidTagError("StudyDate", raw_date, "is not a date (YYYYMMDD)")
    fields["StudyDate"] = study_date
    for keyword, limit in OPTIONAL_LIMITS.items():
        value = clean_value(tags.get(keyword))
        if value is not None:
            fields[keyword] = value[:limit]
    birth = clean_value(tags.get("PatientBirthDate"))
    birth_date = normalise_date(birth)
    if birth is not None and birth_date is not None:
        # CUBE parses DICOM YYYYMMDD itself; cube.md's worked example sends it as is.
        fields["PatientBirthDate"] = birth if _DATE_FORMS[0].match(birth) else birth_date
    age = age_in_days(tags.get("PatientAge"))
    if age is not None:
        fields["PatientAge"] = age
    sex = patient_sex(tags.get("PatientSex"))
    if sex is not None:
        fields["PatientSex"] = sex
    return fields
