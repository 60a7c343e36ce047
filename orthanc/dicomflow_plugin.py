"""dicomflow's Orthanc plugin: hands every stored instance and stable series/study to the scheduler.

Orthanc loads this one script (``PythonScript``); it puts its own folder on ``sys.path`` and
wires up the modules beside it. Runs in Orthanc's embedded CPython (Debian's 3.11,
orthanc-python 4.0 or newer): standard library only. The parts, each in its own module:

- ``dicomflow_settings.py``: the ``"Dicomflow"`` section of Orthanc's configuration, validated;
- ``dicomflow_capture.py``: the on-stored callback captures the instance's bytes and context
  onto a numbered in-memory queue and returns (nothing slow on Orthanc's ingest path);
- ``dicomflow_eventmaker.py``: turns queued items into events, in a builder process
  (``dicomflow_builder.py``, ``dicomflow_events.py``) or with Orthanc's API;
- ``dicomflow_sender.py``: one thread delivers them in batches (``POST {"events": [...]}``
  with a bearer token, ``dicomflow_delivery.py``), the spool's first;
- ``dicomflow_spool.py``: the durable SQLite spool of what it could not deliver, re-sent in
  reception order, and the dead letters;
- ``dicomflow_catchup.py``: the checkpoint in Orthanc's change log, the read-back after a crash,
  and the stable series/studies read from the log (``"StableEvents": "changes"``);
- ``dicomflow_routes.py``: ``/dicomflow/{status,spool/retry,spool/dead,stable/...}`` (the last
  called by ``dicomflow_stable.lua``) and the Orthanc Explorer button;
- ``dicomflow_relay.py``: puts them together; ``dicomflow_disk.py``: the disk guard and retention.

Settings and internals: docs/plugin.md.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import orthanc

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import dicomflow_disk  # noqa: E402 - beside this script, found through the path set above
import dicomflow_routes  # noqa: E402
from dicomflow_relay import Relay  # noqa: E402
from dicomflow_settings import STABLE_SOURCES, PluginSettings  # noqa: E402


def install() -> Relay | None:
    """Read the settings, open the spool and register the callbacks with Orthanc."""
    try:
        configuration = json.loads(orthanc.GetConfiguration())
        settings = PluginSettings.from_configuration(configuration)
    except (ValueError, TypeError, OSError) as exc:
        orthanc.LogError(f"dicomflow: plugin disabled, bad configuration: {exc}")
        return None
    if settings.gil_switch_interval is not None:
        sys.setswitchinterval(settings.gil_switch_interval)
    relay = Relay(settings)
    guard, retention = dicomflow_disk.install(orthanc, settings, relay.capture.queued_ids)
    orthanc.RegisterOnStoredInstanceCallback(relay.capture.on_stored)
    # The scheduler's status page (Dicomflow.StatusPageUrl; default: the scheduler's address).
    dicomflow_routes.register(relay, guard, retention, str(configuration["Dicomflow"].get("StatusPageUrl") or ""))
    orthanc.LogWarning(
        f"dicomflow: delivering to {settings.scheduler_url}; spool {settings.spool_path} holds "
        f"{relay.spool.length} events, {relay.spool.dead_length} dead letters; stable series/studies: "
        f"{STABLE_SOURCES[settings.stable_events]}"
    )
    if not settings.server:
        orthanc.LogWarning(f"dicomflow: Orthanc's Name {configuration.get('Name')!r} cannot name it in events "
                           "(letters, digits, '.', '_', '-'): events carry no orthanc.server, so workers fetch "
                           "their files from their ORTHANC_URL")
    relay.start()
    # Orthanc's plugin 4.0 finalises the interpreter when Orthanc stops: the queue goes to the spool then.
    atexit.register(relay.stop)
    for part in (guard, retention):  # run before relay.stop (atexit is last in, first out)
        if part is not None:
            atexit.register(part.stop)
    return relay


RELAY = install()
