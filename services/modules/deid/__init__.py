"""The deid service's worker: de-identify a completed study push for each of its projects."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pydicom

from dicomflow.config import settings_from_config
from dicomflow.errors import DicomflowError
from dicomflow.extracts.deid import Deidentifier
from dicomflow.extracts.project import ExtractSettings, Project, load_projects

log = logging.getLogger(__name__)


class ExtractFailed(DicomflowError):
    """One or more projects of a study could not be de-identified (the others were)."""


def worker(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
           dcmpath: str | None = None, event: Mapping | None = None, config: Mapping[str, str] | None = None,
           **kwargs) -> dict:
    """Write the push's instances, de-identified, to ``<extracts dir>/<project>/<study>/<series>/<sop>.dcm``.

    Idempotent (jobs run at least once): paths and bytes depend only on the input and the
    project, and each file is written to a temporary name and renamed. A project that fails is
    reported at the end, after the others are done, and fails the job (re-run: same output).
    """
    event = event or {}
    settings = settings_from_config(ExtractSettings, config or {}, "extracts")
    wanted = (added_params.get(jobName) or {}).get("projects") or []
    loaded = load_projects(settings.projects_dir)
    files = sorted(Path(dcmpath).glob("*.dcm")) if dcmpath else []
    series = _series(files)
    modalities = "\\".join(sorted({s["Modality"] for s in series.values() if s["Modality"]}))
    study_headers = {**headers, "ModalitiesInStudy": modalities}
    result: dict = {"instances": len(files), "projects": {}}
    failed = []
    for slug in wanted:
        project = loaded.projects.get(slug)
        if project is None:
            result["projects"][slug] = {"status": "gone", "note": "no longer a valid project"}
            continue
        if not project.selects_study(study_headers, event.get("remoteAet")):
            result["projects"][slug] = {"status": "not-selected", "modalities": modalities}
            continue
        try:
            result["projects"][slug] = _extract(project, series, settings.output_dir / slug)
        except (DicomflowError, OSError, pydicom.errors.InvalidDicomError) as exc:
            log.exception("deid: project %s failed", slug)
            result["projects"][slug] = {"status": "failed", "error": str(exc)}
            failed.append(f"{slug}: {exc}")
    if failed:
        raise ExtractFailed("; ".join(failed))
    return result


def _series(files: list[Path]) -> dict[str, dict]:
    """The push's files by SeriesInstanceUID, with the headers the series filters read."""
    series: dict[str, dict] = defaultdict(lambda: {"files": [], "SeriesDescription": "", "Modality": ""})
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "SeriesDescription", "Modality"])
        entry = series[str(ds.get("SeriesInstanceUID", ""))]
        entry["files"].append(path)
        entry["SeriesDescription"] = str(ds.get("SeriesDescription", "") or "")
        entry["Modality"] = str(ds.get("Modality", "") or "").strip().upper()
    return series


def _extract(project: Project, series: dict[str, dict], output: Path) -> dict:
    deid = Deidentifier.for_project(project)
    written, dropped = 0, []
    for uid, entry in series.items():
        if not project.keeps_series(entry["SeriesDescription"], len(entry["files"])):
            dropped.append({"series": deid.uid(uid), "instances": len(entry["files"])})
            continue
        for path in entry["files"]:
            ds = deid.dataset(pydicom.dcmread(path))
            target = output / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".part")
            os.close(fd)
            try:
                ds.save_as(tmp, enforce_file_format=True)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            written += 1
    return {"status": "done", "written": written, "droppedSeries": dropped}
