"""The repack service's worker: copy one instance into the pypx layout and write pypx's log JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping

from dicomflow.errors import MissingTagError
from dicomflow.repack import progress
from dicomflow.repack.errors import RepackError
from dicomflow.repack.repacker import repack_file
from dicomflow.repack.settings import RepackSettings


def worker(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
           dcmpath: str, event: Mapping, config: Mapping[str, str], connection=None, **kwargs) -> dict:
    """Repack the instance at `dcmpath` (a copy: the cached file belongs to the runtime).

    Returns:
        ``{"dst": output file, "size": bytes, "missing": [{"tag", "name", "error"}, ...]}``.

    Raises:
        ConfigError: REPACK_DATADIR is not set.
        RepackError, MissingTagError: the file cannot be repacked (the message names it and why).
    """
    settings = RepackSettings.from_config(config)
    series_uid = str(headers.get("SeriesInstanceUID") or "").strip()
    try:
        result = repack_file(str(dcmpath), settings.datadir, settings.logdir, move=False)
    except (RepackError, MissingTagError) as exc:
        if connection is not None and series_uid:
            progress.record(connection, series_uid, error=str(exc))  # for the status page; then the job fails
        raise
    if connection is not None:
        progress.record(connection, result.series_uid or series_uid, folder=os.path.dirname(result.dst))
    return {"dst": result.dst, "size": result.size, "missing": result.missing}
