"""The plugin's settings: the "Dicomflow" section of Orthanc's configuration, validated once at start.

Standard library only (Orthanc's embedded Python); no `orthanc` import, so tests read it too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

#: Tags every built-in service reads; the "Tags" setting replaces this list.
DEFAULT_TAGS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientAge", "PatientSex",
    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "InstitutionName", "StationName", "Manufacturer",
    "Modality", "ProtocolName", "BodyPartExamined", "PerformedStationAETitle",
    "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "SeriesDate", "SeriesTime", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
    "AcquisitionNumber", "ImageType", "NumberOfSeriesRelatedInstances",
    "NumberOfStudyRelatedInstances", "NumberOfFrames", "Rows", "Columns",
)

#: How the callback captures an instance's headers: the file's bytes, or Orthanc's JSON.
RAW, JSON = "raw", "json"
#: The Lua script (beside this one) that hands Orthanc's stable series/studies to the plugin.
STABLE_SCRIPT = "dicomflow_stable.lua"
#: Where stable series/studies come from: that script (`LUA`), or the change log read every
#: ChangePollInterval (`CHANGES`, when Orthanc's "LuaScripts" does not list the script).
LUA, CHANGES = "lua", "changes"
#: No stable series/studies from Orthanc (the default): the scheduler completes pushes itself
#: (scheduler/pushes.py), since Orthanc forgets unstable resources at shutdown and stays
#: silent for instances it already holds.
OFF = "off"
STABLE_SOURCES = {LUA: "the Lua script", CHANGES: "the change log",
                  OFF: "none from Orthanc (the scheduler completes pushes)"}
#: What an event may name its Orthanc by (`orthanc.server`; the scheduler checks the same form).
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PluginSettings:
    """The "Dicomflow" section of Orthanc's configuration, validated once at start."""

    scheduler_url: str
    token: str
    spool_path: str
    tags: tuple[str, ...] = DEFAULT_TAGS
    #: Fewer, larger batches cost Orthanc's ingest less: every batch wakes the sender, the
    #: builder process, the scheduler and Redis. 0.5 s measured ~4 % more small-instance ingest
    #: than 0.05 s, for ~0.35 s more stored -> enqueued latency (README).
    batch_size: int = 1000
    max_batch_delay: float = 0.5
    queue_size: int = 20000
    connect_timeout: float = 3.0
    request_timeout: float = 30.0
    retry_min_delay: float = 0.5
    retry_max_delay: float = 30.0
    max_string_length: int = 256
    #: Python's GIL switch interval in Orthanc's interpreter (None: Python's 5 ms). It bounds how
    #: long an on-stored callback (Orthanc's ingest thread) may wait for the GIL while the sender
    #: thread builds a batch. 0.2 and 1 ms measured within this machine's noise of 5 ms (README).
    gil_switch_interval: float | None = None
    #: How often the sender records how far Orthanc's change log has been handed over (s):
    #: after a crash, about this much plus CallbackGrace is read back from Orthanc.
    checkpoint_interval: float = 5.0
    #: How long after noting a change every on-stored callback up to it has surely queued its
    #: item (s): they run right after Orthanc's commit, in the same thread; the margin is for a
    #: machine under load.
    callback_grace: float = 10.0
    #: How often the sender reads Orthanc's change log for stable series and studies (s),
    #: when they do not come from the Lua script (``stable_events``).
    change_poll_interval: float = 1.0
    #: "lua": Orthanc's Lua engine calls STABLE_SCRIPT once per stable series/study, which
    #: queues its event through the plugin's REST route; nothing is read per instance (reading
    #: every change of the log cost ~6 µs of Orthanc's time per instance; an on-change callback
    #: in Python ~6 % of small-instance ingest, README). "changes": the change log is read.
    #: "off" (the default, "StableEvents"): none; the scheduler owns series/study completion.
    stable_events: str = OFF
    #: With "lua": how long after a change its Lua callback has surely queued its event (s).
    #: The catch-up after a crash reads stable series/studies back from this far before the
    #: checkpoint (Orthanc's Lua engine runs its events in a queue of its own, after the commit).
    stable_grace: float = 120.0
    #: "raw": take the file's bytes in the callback and read the tags in the sender thread
    #: (Orthanc's JSON conversion is the callback's main cost); "json": Orthanc's JSON.
    header_reader: str = RAW
    #: Build events in a child process (``BuilderPython``), not in Orthanc's interpreter: the
    #: sender thread then barely holds the GIL that Orthanc's ingest threads wait for.
    builder_process: bool = True
    #: The builder process also POSTs the batches it builds (false: it hands the events back
    #: and the sender thread POSTs them, as before; kept to measure the difference side by side).
    builder_delivers: bool = True
    #: How much lower the builder process's CPU priority is than Orthanc's (added to its nice
    #: value, 0-19). Its bursts (~70 ms per 1000-instance batch) then wait for Orthanc's ingest
    #: threads on a machine with few cores instead of taking one from them (README).
    builder_nice: int = 10
    builder_python: str = "python3"
    events_path: str = "/api/v1/events"
    #: Orthanc's "StorageDirectory" and "IndexDirectory" (absolute): where the disk guard measures.
    storage_paths: tuple[str, ...] = ()
    #: The disk guard's watermark (MB): with less free space than this on Orthanc's storage, new
    #: instances are refused (C-STORE: 0xA700 Out of Resources; REST uploads: 403). 0: no guard.
    #: 1 GB: a few large studies of headroom for the index, the spool and the sampling delay.
    min_free_space_mb: float = 1024.0
    #: How often the disk guard measures the free space (s); between two measures it subtracts
    #: the size of each accepted instance (no disk access per instance).
    disk_check_interval: float = 1.0
    #: Retention (opt-in): delete studies from Orthanc this many days (fractions allowed) after
    #: their last update, once none of their events waits in the spool or queue. 0: keep all.
    retention_days: float = 0.0
    #: Seconds between two retention passes.
    retention_interval: float = 3600.0
    #: Retention deletes a study only once the scheduler says every job of its events finished.
    retention_wait_for_jobs: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: Orthanc's `Name`, which every event carries as `orthanc.server` (workers fetch from the
    #: Orthanc of that name: several receivers, docs/scaling.md); "" when the Name cannot be one.
    server: str = ""

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> PluginSettings:
        """Build the settings from Orthanc's whole configuration.

        Raises:
            ValueError: a setting is missing or has the wrong form.
        """
        section = configuration.get("Dicomflow")
        if not isinstance(section, dict):
            raise TypeError('the configuration has no "Dicomflow" section (an object)')
        token = str(section.get("Token") or "")
        token_file = section.get("TokenFile")
        if not token and token_file:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        url = str(section.get("SchedulerUrl") or "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Dicomflow.SchedulerUrl must be an http(s) URL, got {url!r}")
        spool = str(section.get("SpoolPath") or "")
        if not spool:
            raise ValueError("Dicomflow.SpoolPath is required")
        tags = section.get("Tags") or DEFAULT_TAGS
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(",") if t.strip()]
        numbers = {
            "batch_size": ("BatchSize", int), "max_batch_delay": ("MaxBatchDelay", float),
            "queue_size": ("QueueSize", int), "connect_timeout": ("ConnectTimeout", float),
            "request_timeout": ("RequestTimeout", float),
            "retry_min_delay": ("RetryMinDelay", float), "retry_max_delay": ("RetryMaxDelay", float),
            "max_string_length": ("MaxStringLength", int),
            "gil_switch_interval": ("GilSwitchInterval", float),
            "checkpoint_interval": ("CheckpointInterval", float),
            "callback_grace": ("CallbackGrace", float),
            "change_poll_interval": ("ChangePollInterval", float),
            "stable_grace": ("StableGrace", float),
        }
        values: dict[str, Any] = {}
        for attr, (key, kind) in numbers.items():
            if key in section:
                values[attr] = kind(section[key])
                if values[attr] <= 0:
                    raise ValueError(f"Dicomflow.{key} must be positive")
        for key, attr in (("BuilderProcess", "builder_process"), ("BuilderDelivers", "builder_delivers")):
            if key in section:
                if not isinstance(section[key], bool):
                    raise ValueError(f"Dicomflow.{key} must be true or false, got {section[key]!r}")
                values[attr] = section[key]
        if "BuilderNice" in section:
            nice = section["BuilderNice"]
            if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
                raise ValueError(f"Dicomflow.BuilderNice must be a whole number 0-19, got {nice!r}")
            values["builder_nice"] = nice
        if "BuilderPython" in section:
            values["builder_python"] = str(section["BuilderPython"])
        if "EventsPath" in section:
            values["events_path"] = str(section["EventsPath"])
        if "HeaderReader" in section:
            values["header_reader"] = str(section["HeaderReader"]).lower()
            if values["header_reader"] not in (RAW, JSON):
                raise ValueError(f'Dicomflow.HeaderReader must be "raw" or "json", got {section["HeaderReader"]!r}')
        scripts = configuration.get("LuaScripts") or []
        if isinstance(scripts, str):
            scripts = [scripts]
        if any(os.path.basename(str(script)) == STABLE_SCRIPT for script in scripts):
            values["stable_events"] = LUA
        if "StableEvents" in section:
            mode = str(section["StableEvents"]).lower()
            if mode not in (OFF, LUA, CHANGES):
                raise ValueError(f'Dicomflow.StableEvents must be "off", "lua" or "changes", '
                                 f'got {section["StableEvents"]!r}')
            if mode == LUA and values.get("stable_events") != LUA:
                raise ValueError(f'Dicomflow.StableEvents "lua" needs {STABLE_SCRIPT} in "LuaScripts"')
            values["stable_events"] = mode
        # The disk guard and retention (dicomflow_disk.py): 0 turns MinFreeSpaceMB or RetentionDays off.
        for key, attr, zero_is_off in (("MinFreeSpaceMB", "min_free_space_mb", True),
                                       ("DiskCheckInterval", "disk_check_interval", False),
                                       ("RetentionDays", "retention_days", True),
                                       ("RetentionInterval", "retention_interval", False)):
            if key not in section:
                continue
            given = section[key]
            try:
                if isinstance(given, bool):
                    raise TypeError(given)
                values[attr] = float(given)
            except (TypeError, ValueError):
                raise ValueError(f"Dicomflow.{key} must be a number, got {given!r}") from None
            if not 0.0 <= values[attr] < float("inf") or (values[attr] == 0.0 and not zero_is_off):
                raise ValueError(f"Dicomflow.{key} must be {'0 (off) or ' if zero_is_off else ''}positive, "
                                 f"got {given!r}")
        if "RetentionWaitForJobs" in section:
            if not isinstance(section["RetentionWaitForJobs"], bool):
                raise ValueError(f"Dicomflow.RetentionWaitForJobs must be true or false, "
                                 f"got {section['RetentionWaitForJobs']!r}")
            values["retention_wait_for_jobs"] = section["RetentionWaitForJobs"]
        from dicomflow_disk import storage_paths  # beside this script
        values["storage_paths"] = storage_paths(configuration)
        name = str(configuration.get("Name") or "")
        values["server"] = name if SERVER_NAME.fullmatch(name) else ""
        return cls(scheduler_url=url, token=token, spool_path=spool, tags=tuple(tags), **values)
