"""The redisstore service's callback (scheduler side): every received instance is stored."""

from __future__ import annotations

from collections.abc import Mapping


def callback(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
             event: Mapping, config: Mapping[str, str], **kwargs) -> bool:
    """Run for every instance event; the scheduler keeps the service off until REDIS_STORE_URL is set."""
    return True
