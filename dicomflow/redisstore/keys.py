"""Every Redis key of the DICOM store, under one configurable prefix (default ``dicom:``), defined here only.

Field names of indexes are DICOM keywords (letters and digits only), so the first ``:`` after
the field ends it and a value may hold anything (``:``, ``*``, spaces, non-ASCII, nothing).
"""

from __future__ import annotations

DEFAULT_PREFIX = "dicom:"


class StoreKeys:
    """The key names for one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix

    def doc(self, sop: str) -> str:
        """Hash: the metadata document of one instance."""
        return f"{self.prefix}doc:{sop}"

    def chunk(self, sop: str, version: str, index: int) -> str:
        """String: chunk `index` of version `version` of an instance's bytes."""
        return f"{self.prefix}chunk:{sop}:{version}:{index}"

    def index(self, field: str, value: str) -> str:
        """Set: the SOPInstanceUIDs whose `field` equals `value`."""
        return f"{self.prefix}idx:{field}:{value}"

    def values(self, field: str) -> str:
        """Sorted set: each value of `field` -> how many instances have it (the counts)."""
        return f"{self.prefix}vals:{field}"

    def range(self, field: str) -> str:
        """Sorted set: SOPInstanceUID -> the date `field` as YYYYMMDD."""
        return f"{self.prefix}range:{field}"

    @property
    def all(self) -> str:
        """Set: every stored SOPInstanceUID."""
        return f"{self.prefix}all"

    @property
    def stats(self) -> str:
        """Hash: ``bytes`` (total size of the stored files)."""
        return f"{self.prefix}stats"
