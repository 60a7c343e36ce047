"""DICOM kept in a Redis of its own: a metadata hash per instance, its bytes in chunks, plain-Redis indexes."""

from dicomflow.redisstore.errors import (InvalidInputError, NotFoundError, QueueDatabaseError, RedisStoreError,
                                         StoreFullError)
from dicomflow.redisstore.model import FileEntry, StoredInstance, StoreResult
from dicomflow.redisstore.settings import StoreSettings
from dicomflow.redisstore.store import RedisStore

__all__ = ["FileEntry", "InvalidInputError", "NotFoundError", "QueueDatabaseError", "RedisStore", "RedisStoreError",
           "StoreFullError", "StoreResult", "StoreSettings", "StoredInstance"]
