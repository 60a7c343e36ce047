"""Reading and normalising DICOM tag values the way every built-in service needs them.

The rules (shared by the ChRIS store and the pypx repack, see docs): a value is read as a
string, NUL bytes removed, surrounding whitespace trimmed; a tag that is absent, empty or
multi-valued counts as missing. Path components are sanitised by replacing each run of
characters outside ``[A-Za-z0-9.-]`` with one ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import seahash

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9.\-]+")


def clean_value(raw: object) -> str | None:
    """One tag value as a clean string, or None when missing, empty or multi-valued.

    Accepts what the readers produce: a str (DICOM multi-values joined by a backslash,
    as in Orthanc's JSON and the raw bytes), bytes, a number, or a list/tuple/MultiValue.
    """
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("latin-1")
    if isinstance(raw, (list, tuple)) or (hasattr(raw, "__len__") and hasattr(raw, "__getitem__")
                                          and not isinstance(raw, str)):
        if len(raw) != 1:
            return None
        raw = raw[0]
    text = str(raw).replace("\x00", "").strip()
    if not text or "\\" in text:
        return None
    return text


def read_tag(headers: Mapping[str, object], keyword: str) -> str | None:
    """`clean_value` of `headers[keyword]` (None when absent)."""
    return clean_value(headers.get(keyword))


def sanitize(component: str) -> str:
    """Replace each run of characters outside ``[A-Za-z0-9.-]`` with one ``_`` (NULs dropped)."""
    return _UNSAFE_RUN.sub("_", component.replace("\x00", ""))


def hash7(series_instance_uid: str) -> str:
    """First 7 hex digits of the SeaHash of the UID's bytes, not zero-padded (as oxidicom)."""
    return format(seahash.hash(series_instance_uid.encode()), "x")[:7]


def pad_number(value: str, width: int, parse: bool = True) -> str:
    """Left-pad with zeros to `width`; with `parse`, an unsigned integer is re-read first ("05" -> "5")."""
    if parse and value.isdigit():
        value = str(int(value))
    return value.rjust(width, "0")
