"""The relay: puts the plugin's parts together (capture, event maker, catch-up, sender, spool) and
answers for them as one (start, stop, status)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from dicomflow_capture import Capture
from dicomflow_catchup import CatchUp
from dicomflow_counters import Counters
from dicomflow_eventmaker import EventMaker
from dicomflow_sender import Sender
from dicomflow_settings import JSON, RAW, PluginSettings
from dicomflow_spool import Spool


class Relay:
    """Everything between Orthanc's callbacks and the scheduler, built from the settings."""

    def __init__(self, settings: PluginSettings):
        self.settings = settings
        self.spool = Spool(settings.spool_path)
        self.counters = Counters()
        self._stopping = threading.Event()
        self.maker = EventMaker(settings, self.counters, self.spool, self._stopping)
        self.capture = Capture(settings, self.counters, self.spool.last_seq() + 1, raw=self.maker.reader is not None,
                               overflow=self.maker.spool_items)
        self.catch_up = CatchUp(settings, self.counters, self.capture, self.maker, self.spool, self._stopping)
        self.sender = Sender(settings, self.counters, self.capture, self.maker, self.catch_up, self.spool,
                             self._stopping)

    def start(self) -> None:
        """Start the sender thread (it waits for Orthanc to finish starting)."""
        self.sender.start()

    def stop(self) -> None:
        """Stop the sender; events still in memory are spooled for the next start."""
        self._stopping.set()
        self.sender.stop()
        self.spool.close()

    def status(self) -> dict[str, Any]:
        """Counters and state for the status route."""
        builder = self.maker.builder
        return {
            **self.counters.values,
            "queueLength": len(self.capture.queue),
            "spoolLength": self.spool.length,
            "deadLetters": self.spool.dead_length,
            "lastError": self.counters.last_error,
            "lastDelivery": self.counters.last_delivery,
            "sender": "running" if self.sender.thread.is_alive() else "stopped",
            "schedulerUrl": self.settings.scheduler_url,
            "headerReader": RAW if self.maker.reader is not None else JSON,
            "builder": self.maker.builder_state,
            "builderPid": None if builder is None else builder.pid,
            "checkpoint": self.catch_up.checkpoint,
            "stableEvents": self.settings.stable_events,
            "stableCheckpoint": self.catch_up.stable_checkpoint,
            "caughtUp": self.catch_up.caught_up,
            "gilSwitchInterval": sys.getswitchinterval(),
            "senderCpuSeconds": round(self.sender.cpu, 4),
        }
