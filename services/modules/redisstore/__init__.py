"""The redisstore service's worker: store one received instance in the DICOM store's Redis."""

from __future__ import annotations

from collections.abc import Mapping

import redis

from dicomflow.redisstore import RedisStore, StoreSettings
from dicomflow.redisstore.model import read_header

#: One store (and its connection pool) per worker process and settings: a new connection per
#: job would cost more than the job itself. The queue check is done once per store.
_stores: dict[StoreSettings, RedisStore] = {}


def _store_for(settings: StoreSettings, queue: redis.Redis | None) -> RedisStore:
    store = _stores.get(settings)
    if store is None:
        store = RedisStore.from_settings(settings, health_check_interval=30)
        if queue is not None and not settings.allow_queue_db:
            store.check_not_queue(queue)
        _stores[settings] = store
    return store


def worker(jobName: str, headers: Mapping[str, object], params: Mapping, added_params: Mapping,
           dcmpath: str, event: Mapping, config: Mapping[str, str], connection: redis.Redis | None = None,
           **kwargs) -> dict:
    """Store the instance at `dcmpath` with the tags the plugin read (`headers`), under ``<SOPInstanceUID>.dcm``.

    Idempotent: a re-run stores the same instance again (or leaves it, when identical).

    Returns:
        ``{"sop", "status" (stored | replaced | unchanged), "size", "chunks"}``.

    Raises:
        ConfigError: REDIS_STORE_URL is missing or malformed.
        QueueDatabaseError: it is the job queue's own database (and REDIS_STORE_ALLOW_QUEUE_DB is not 1).
        StoreFullError: the store's Redis is out of memory; nothing was stored, the job is retried.
        InvalidInputError: no SOPInstanceUID.
    """
    settings = StoreSettings.from_config(config)
    store = _store_for(settings, connection)
    orthanc = event.get("orthanc") if isinstance(event.get("orthanc"), Mapping) else {}
    tags, syntax = dict(headers), event.get("transferSyntax") or ""
    if not tags.get("SOPInstanceUID"):  # the plugin's tag list left it out: read the file's own header
        header = read_header(str(dcmpath))
        tags, syntax = {**header.tags, **tags}, syntax or header.transfer_syntax
    result = store.store_file(str(dcmpath), tags, file_name=f"{tags.get('SOPInstanceUID')}.dcm",
                              transfer_syntax=syntax, orthanc=orthanc)
    return {"sop": result.sop, "status": result.status, "size": result.size, "chunks": result.chunks}
