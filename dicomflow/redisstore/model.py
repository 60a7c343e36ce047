"""The stored document of one instance: which fields it has, which are indexed, and how tags are read.

The document is a Redis hash. DICOM keywords (CamelCase) hold the tags as Orthanc's
simplified JSON gives them (a string; a sequence or a null as JSON text); our own fields are
lower_snake_case, so they never collide with a keyword.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from dicomflow import dicomheader
from dicomflow.redisstore.errors import InvalidInputError

#: Equality indexes (a set per value) and value counts (`count --by`).
INDEXED = ("PatientID", "Modality", "ProtocolName", "StudyInstanceUID", "SeriesInstanceUID", "PatientSex",
           "SOPClassUID", "StudyDate", "file_name")
#: Range indexes (a sorted set scored YYYYMMDD).
RANGED = ("StudyDate", "PatientBirthDate")

#: Our own fields of the document.
OWN_FIELDS = ("file_name", "size", "sha256", "transfer_syntax", "chunk_size", "chunks", "version", "stored_at",
              "orthanc_instance", "orthanc_series", "orthanc_study", "orthanc_patient")
#: Fields that differ between two stores of the same content (ignored when deciding "unchanged").
VOLATILE = ("version", "stored_at")

_BY_TAG = {tag: keyword for keyword, (tag, _) in dicomheader.KEYWORDS.items()}
_LAST_TAG = max(_BY_TAG)


@dataclass(frozen=True)
class FileHeader:
    """What the store reads from a DICOM file itself."""

    transfer_syntax: str
    tags: dict[str, object]


def tag_value(value: object) -> str:
    """One tag as the document keeps it: a string as is, anything else (a sequence, null) as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def read_header(path: str) -> FileHeader:
    """The selected tags of a Part 10 file, as Orthanc's simplified JSON has them.

    Uses the standard-library reader (a few hundred µs); encodings it leaves out go to pydicom.

    Raises:
        InvalidInputError: not DICOM, or unreadable.
    """
    vrs: dict[int, bytes] = {}
    try:
        with open(path, "rb") as file:
            syntax, found = dicomheader.read_elements(file, _BY_TAG, _LAST_TAG, vrs)
        return FileHeader(syntax, dicomheader.orthanc_values(found, vrs, 0, _BY_TAG))
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except dicomheader.HeaderError as exc:
        # Odd files (no preamble or meta group, big endian, a broken VR): pydicom reads them
        # leniently. A file it cannot make a SOPInstanceUID of is refused with our reader's reason.
        return _read_with_pydicom(path, exc.reason)


def _read_with_pydicom(path: str, reason: str) -> FileHeader:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "SOPInstanceUID" not in ds:
            raise InvalidDicomError("no SOPInstanceUID")
    except Exception as exc:  # noqa: BLE001 - pydicom raises anything on garbage; the file is refused
        raise InvalidInputError(f"{path}: not a readable DICOM file ({reason})") from exc
    tags: dict[str, object] = {}
    for keyword in dicomheader.KEYWORDS:
        if keyword in ds:
            value = ds[keyword].value
            if value is None:
                tags[keyword] = ""
            elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                tags[keyword] = "\\".join(str(v) for v in value)
            else:
                tags[keyword] = str(value)
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    return FileHeader(syntax, tags)


def sha256_file(path: str, block: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(block):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def build_document(tags: Mapping[str, object], *, file_name: str, size: int, sha256: str, transfer_syntax: str,
                   chunk_size: int, version: str, stored_at: float,
                   orthanc: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hash fields of one instance.

    Raises:
        InvalidInputError: the tags lack a SOPInstanceUID.
    """
    sop = tags.get("SOPInstanceUID")
    if not isinstance(sop, str) or not sop.strip():
        raise InvalidInputError(f"{file_name}: no SOPInstanceUID (0008,0018): cannot be stored")
    doc = {str(k): tag_value(v) for k, v in tags.items() if isinstance(k, str) and k[:1].isupper()}
    doc["SOPInstanceUID"] = sop.strip()
    chunks = (size + chunk_size - 1) // chunk_size
    doc.update(file_name=file_name, size=str(size), sha256=sha256, transfer_syntax=transfer_syntax or "",
               chunk_size=str(chunk_size), chunks=str(chunks), version=version, stored_at=f"{stored_at:.3f}")
    for level in ("instance", "series", "study", "patient"):
        value = (orthanc or {}).get(level)
        if isinstance(value, str) and value:
            doc[f"orthanc_{level}"] = value
    return doc


def same_content(old: Mapping[str, str], new: Mapping[str, str]) -> bool:
    """Whether two documents describe the same stored instance (bytes and tags), times and versions aside."""
    def strip(doc: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in doc.items() if k not in VOLATILE}
    return bool(old) and strip(old) == strip(new)


@dataclass(frozen=True)
class FileEntry:
    """One file of a batch (`RedisStore.store_files`); `tags`/`transfer_syntax` None: read from the file."""

    path: str
    tags: Mapping[str, object] | None = None
    file_name: str | None = None
    transfer_syntax: str | None = None
    orthanc: Mapping[str, str] | None = None


@dataclass(frozen=True)
class StoreResult:
    """What `store` did: ``stored`` (new), ``replaced``, ``unchanged`` (identical, skipped)."""

    sop: str
    status: str
    size: int
    chunks: int
    version: str


@dataclass
class StoredInstance:
    """One instance read back: its document and, when asked for, its bytes (bytes-like: the chunk reader's
    `bytearray` for one instance, a `memoryview` slice of one buffer for several; `bytes(data)` copies)."""

    sop: str
    doc: dict[str, str]
    data: bytes | bytearray | memoryview | None = None
    extra: dict = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return self.doc.get("file_name", "")
