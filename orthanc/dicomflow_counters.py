"""The plugin's counters and its last error and delivery, shown by its status route."""

from __future__ import annotations

import threading

#: Every counter of the status route (scheduler/metrics.py exports them).
NAMES = (
    "received", "delivered", "spooled", "rejected", "failed", "overflow", "batches", "callbackErrors",
    "unresolved", "idLookups", "replayed", "builtInPlugin", "builderFailures", "stableFromLua", "changesRead",
)


class Counters:
    """Counts of what the plugin did, bumped from Orthanc's threads and the sender thread."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(NAMES, 0)
        self._lock = threading.Lock()
        #: The last thing that went wrong (shown, never raised), and when the scheduler last took a batch.
        self.last_error: str | None = None
        self.last_delivery: float | None = None

    def bump(self, name: str, amount: int = 1) -> None:
        with self._lock:  # Orthanc runs one callback thread per association
            self.values[name] += amount
