"""The deid service's callback (scheduler side): which projects a completed study push belongs to."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dicomflow.config import settings_from_config
from dicomflow.extracts.project import ExtractSettings, load_projects

log = logging.getLogger(__name__)


def callback(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
             event: Mapping, config: Mapping[str, str], **kwargs):
    """Schedule the study when a project may want it; `added_params["deid"]["projects"]` names them.

    The projects are read at every study event (a changed or added file counts at once). A broken
    project file is logged and listed under `problems`; the others go on. Modalities are checked
    by the worker, on every file of the push (the event's headers are one instance's).
    """
    settings = settings_from_config(ExtractSettings, config, "extracts")
    loaded = load_projects(settings.projects_dir)
    for problem in loaded.problems:
        log.warning("deid: project refused: %s", problem)
    projects = loaded.for_study(headers, event.get("remoteAet"), modalities=False)
    if not projects:
        return False
    return True, {"projects": [p.slug for p in projects], "problems": [str(p) for p in loaded.problems]}
