"""The errors of the Redis DICOM store: each says what and why."""

from __future__ import annotations

from dicomflow.errors import ConfigError, DicomflowError


class RedisStoreError(DicomflowError):
    """Base class of the store's errors."""


class StoreFullError(RedisStoreError):
    """The store's Redis refused a write (maxmemory reached): nothing of the instance was switched in."""


class NotFoundError(RedisStoreError):
    """No stored instance matches (SOPInstanceUID or file name)."""


class AmbiguousError(RedisStoreError):
    """A file name that several stored instances share: give the SOPInstanceUID instead."""


class InvalidInputError(RedisStoreError):
    """A file that is not DICOM, or lacks what the store needs (a SOPInstanceUID)."""


class IntegrityError(RedisStoreError):
    """The bytes read back do not match the stored SHA-256 or size."""


class QueueDatabaseError(ConfigError):
    """REDIS_STORE_URL points at the job queue's own Redis database."""
