"""The redisstore service's worker: store one received instance in the DICOM store's Redis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from dicomflow.redisstore import FileEntry, InvalidInputError, RedisStore, StoreSettings
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
           batch: list[dict[str, Any]] | None = None, **kwargs) -> dict:
    """Store the instance at `dcmpath` with the tags the plugin read (`headers`), under ``<SOPInstanceUID>.dcm``;
    with `batch` (settings.json's ``batchSize``), every instance of it in one atomic step.

    Idempotent: a re-run stores the same instances again (or leaves them, when identical).

    Returns:
        ``{"sop", "status" (stored | replaced | unchanged), "size", "chunks"}``; for a batch,
        ``{"instances": n, "stored": k, "results": {sop: status}}``.

    Raises:
        ConfigError: REDIS_STORE_URL is missing or malformed.
        QueueDatabaseError: it is the job queue's own database (and REDIS_STORE_ALLOW_QUEUE_DB is not 1).
        StoreFullError: the store's Redis is out of memory; nothing of the job was stored, it is retried.
        InvalidInputError: no SOPInstanceUID (in a batch: the others are stored, the job fails naming it).
    """
    store = _store_for(StoreSettings.from_config(config), connection)
    items = batch if batch is not None else [{"headers": headers, "event": event, "dcmpath": dcmpath}]
    results = store.store_files([_entry(item) for item in items])
    if batch is None:
        result = results[0]
        return {"sop": result.sop, "status": result.status, "size": result.size, "chunks": result.chunks}
    return {"instances": len(results), "stored": sum(r.status != "unchanged" for r in results),
            "results": {r.sop: r.status for r in results}}


def _entry(item: Mapping[str, Any]) -> FileEntry:
    """One instance to store: the plugin's tags, with the file's own header when they lack a SOPInstanceUID."""
    event = item.get("event") or {}
    path = str(item["dcmpath"])
    orthanc = event.get("orthanc") if isinstance(event.get("orthanc"), Mapping) else {}
    tags, syntax = dict(item.get("headers") or {}), event.get("transferSyntax") or ""
    if not tags.get("SOPInstanceUID"):  # the plugin's tag list left it out: read the file's own header
        try:
            header = read_header(path)
        except InvalidInputError:  # the store refuses it again, naming it, after storing the others
            return FileEntry(path, None, None, None, orthanc)
        tags, syntax = {**header.tags, **tags}, syntax or header.transfer_syntax
    return FileEntry(path, tags, f"{tags.get('SOPInstanceUID')}.dcm", syntax, orthanc)
