"""The repack service's callback (scheduler side): every received instance is repacked."""

from __future__ import annotations

from collections.abc import Mapping


def callback(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
             event: Mapping, config: Mapping[str, str], **kwargs) -> bool:
    """Run for every instance event.

    The scheduler keeps the service inactive until REPACK_DATADIR is set
    (``requiresConfig``), and an instance missing a required tag is not filtered out
    here: the worker fails on it, visibly, naming the tag (nothing dropped silently).
    """
    return True
