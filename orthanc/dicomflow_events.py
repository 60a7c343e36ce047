"""Instance events from a stored file's bytes: the configured tags, Orthanc's ids, the event.

Pure and standard library only: the plugin uses it inside Orthanc's interpreter, the
builder process (``dicomflow_builder.py``) outside it. Whatever needs Orthanc itself (a
header this reader leaves to Orthanc, ids that differ from the computed ones) is reported
to the caller, which asks Orthanc's API.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def orthanc_id(*parts: str) -> str:
    """Orthanc's resource id: SHA-1 of the '|'-joined identifiers in five dash-separated groups."""
    digest = hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def computed_ids(instance_id: str, dataset: dict[str, Any]) -> dict[str, str] | None:
    """Orthanc's ids of the instance and its parents, computed as Orthanc does.

    None when the computation does not give `instance_id` (a character-set conversion this
    does not reproduce): the caller then asks Orthanc.
    """
    uids = [str(dataset.get(k) or "") for k in
            ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if orthanc_id(*uids) != instance_id:
        return None
    return {"instance": instance_id, "series": orthanc_id(*uids[:3]),
            "study": orthanc_id(*uids[:2]), "patient": orthanc_id(uids[0])}


def select_headers(tags: Iterable[str], dataset: dict[str, Any]) -> dict[str, Any]:
    """The event's headers: the `tags` present in `dataset`, in the order of `tags`."""
    return {tag: dataset[tag] for tag in tags if dataset.get(tag) is not None}


def instance_event(headers: dict[str, Any], ids: dict[str, str], aet: str | None, ip: str | None,
                   called: str | None, syntax: str | None, received: float, server: str = "") -> dict[str, Any]:
    """The event of one stored instance, as docs/CONTRACTS.md gives it; `server`: this Orthanc's name."""
    if server:
        ids = {**ids, "server": server}
    return {
        "level": "instance", "headers": headers, "orthanc": ids,
        "remoteAet": aet, "remoteIp": ip, "calledAet": called,
        "transferSyntax": syntax, "receivedAt": received,
    }


def to_json(event: dict[str, Any]) -> str:
    """The event as the plugin sends and spools it (compact JSON)."""
    return json.dumps(event, separators=(",", ":"))


class EventBuilder:
    """Reads the configured tags from a file's bytes with ``dicomflow.dicomheader``.

    Args:
        reader: the ``dicomflow.dicomheader`` module.
        tags: DICOM keywords of the event's headers (all in ``reader.KEYWORDS``).
        max_string_length: longer values (in UTF-8 bytes) are None, as Orthanc's JSON has them null.
        server: this Orthanc's name, put in each event's ids ("": none).
    """

    def __init__(self, reader: Any, tags: Iterable[str], max_string_length: int, server: str = ""):
        self.reader = reader
        self.server = server
        self.tags = tuple(tags)
        self.max_string_length = max_string_length
        self._by_tag = {reader.KEYWORDS[t][0]: t for t in self.tags}
        self._last = max(self._by_tag)

    @staticmethod
    def unknown_tags(reader: Any, tags: Iterable[str]) -> list[str]:
        """The keywords among `tags` this reader cannot read."""
        return [t for t in tags if t not in reader.KEYWORDS]

    def read(self, data: bytes, complete: bool = True) -> tuple[str, dict[str, str | None]]:
        """The file's transfer syntax and the configured tags from its bytes (or its start),
        as Orthanc's simplified JSON has them (``reader.orthanc_values``; None: null).

        Raises:
            reader.HeaderError: a header this reader leaves to Orthanc (a transfer syntax in
                ``reader.UNSUPPORTED_SYNTAXES``, a character set with code extensions, an
                unusual encoding, a file it cannot parse).
            reader.Incomplete: `data` is only the start of the file and the header goes on.
        """
        vrs: dict[int, bytes] = {}
        syntax, found = self.reader.read_start(data, complete, self._by_tag, self._last, vrs)
        return syntax, self.reader.orthanc_values(found, vrs, self.max_string_length, self._by_tag)

    def build(self, instance_id: str, data: bytes, complete: bool, aet: str | None, ip: str | None,
              called: str | None, syntax: str | None, received: float) -> str | None:
        """The instance's event as JSON text; None when it needs Orthanc (see `read`, `computed_ids`).

        `syntax` None: the transfer syntax is read from the file (the callback no longer asks
        Orthanc for it: ~6 µs of Orthanc's ingest thread per instance).

        Raises:
            reader.Incomplete: `data` is only the start of the file and the header goes on.
        """
        try:
            found_syntax, dataset = self.read(data, complete)
        except self.reader.HeaderError:
            return None
        ids = computed_ids(instance_id, dataset)
        if ids is None:
            return None
        return to_json(instance_event(select_headers(self.tags, dataset), ids, aet, ip, called,
                                      syntax or found_syntax, received, self.server))
