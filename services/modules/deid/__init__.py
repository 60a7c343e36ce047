"""The deid service's worker: export a completed study push, de-identified, once per project it belongs to."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
from rq import get_current_job

from dicomflow.config import settings_from_config
from dicomflow.errors import DicomflowError
from dicomflow.extracts.deid import Deidentifier
from dicomflow.extracts.destinations import DestinationSettings, send_study
# LOCAL: the destination recorded when the export is the local folder (no DICOM destination)
from dicomflow.extracts.project import LOCAL, ExtractSettings, Project, load_projects
from dicomflow.extracts.records import ExportStatus, Records, open_records, study_key, utcnow

log = logging.getLogger(__name__)

#: Study-level headers read from the files when the event does not carry them.
STUDY_TAGS = ("StudyInstanceUID", "PatientID", "AccessionNumber")


class ExtractFailed(DicomflowError):
    """One or more projects of a study could not be exported (the others were)."""


def worker(jobName: str, headers: Mapping[str, str], params: Mapping, added_params: Mapping,
           dcmpath: str | None = None, event: Mapping | None = None, config: Mapping[str, str] | None = None,
           connection=None, **kwargs) -> dict:
    """Export the push's instances, de-identified, for each project named by the callback.

    A project exports a study once: the job claims (project, study) in the export records
    first. Already exported (done) → `already-exported`; another job exporting it now →
    `busy`; else it is de-identified and sent to the project's DICOM destinations (through a
    per-job working folder, removed once the result is recorded) or, without any, written to
    ``<extracts dir>/<project>/<study>/<series>/<sop>.dcm`` (that folder is the export and stays).
    A project that fails (or ends partial) is recorded so, reported after the others, and fails
    the job: RQ's retry (and a re-run of any kind) redoes only the projects not recorded done.
    The destinations' settings (``DICOMFLOW_EXPORT_*``) come from the job's `config`, built once.
    """
    event = event or {}
    settings = settings_from_config(ExtractSettings, config or {}, "extracts")
    # the destinations' settings, from the job's configuration (not the worker process's), once
    sending = DestinationSettings.from_config(config or {})
    wanted = (added_params.get(jobName) or {}).get("projects") or []
    loaded = load_projects(settings.projects_dir)
    files = sorted(Path(dcmpath).glob("*.dcm")) if dcmpath else []
    series = _series(files)
    modalities = "\\".join(sorted({s["Modality"] for s in series.values() if s["Modality"]}))
    first = next(iter(series.values()), {})
    # the event's headers, else the files' (a re-run from the records carries no headers)
    study_headers = {**{k: first.get(k, "") for k in STUDY_TAGS}, **{k: v for k, v in headers.items() if v},
                     "ModalitiesInStudy": modalities}
    study_uid = str(study_headers.get("StudyInstanceUID") or "")
    job_id, job_record = _job(jobName, params, event)
    result: dict = {"instances": len(files), "projects": {}}
    failed = []
    records: Records | None = None
    try:
        for slug in wanted:
            project = loaded.projects.get(slug)
            if project is None:
                result["projects"][slug] = {"status": "gone", "note": "no longer a valid project"}
                continue
            if not project.selects_study(study_headers, event.get("remoteAet")):
                result["projects"][slug] = {"status": "not-selected", "modalities": modalities}
                continue
            try:
                if records is None:
                    records = open_records(settings.records_url)
                outcome = _export(project, series, study_uid, settings, records, job_id, job_record,
                                  sending, connection)
            except (DicomflowError, OSError, pydicom.errors.InvalidDicomError) as exc:
                log.exception("deid: project %s failed", slug)
                outcome = {"status": "failed", "error": str(exc)}
            result["projects"][slug] = outcome
            if outcome["status"] in ("failed", "partial"):
                failed.append(f"{slug}: {outcome.get('error') or 'partial: ' + str(outcome.get('failedFiles'))}")
    finally:
        if records is not None:
            records.dispose()
    if failed:
        raise ExtractFailed("; ".join(failed))
    return result


def _job(jobName: str, params: Mapping, event: Mapping) -> tuple[str, dict[str, Any]]:
    """This job's id, and what re-running it for one project takes (`dicomflow-export retry`).

    The records keep no header (no UID or name in clear): the re-run's worker reads them from
    the files, which it fetches again from Orthanc by their instance ids.
    """
    job = get_current_job()
    orthanc = event.get("orthanc") or {}
    instances = list(orthanc.get("instances") or [])
    rerun = {"event": {"level": event.get("level", "study"), "orthanc": {"instances": instances},
                       "remoteAet": event.get("remoteAet"), "calledAet": event.get("calledAet"),
                       "push": event.get("push")},
             "jobName": jobName, "params": dict(params)}
    if job is None:   # called outside RQ (tests, a shell): an id of its own
        return f"{jobName}-{uuid.uuid4().hex}", {**rerun, "worker": f"{jobName}.worker"}
    return job.id, {**rerun, "worker": job.kwargs.get("worker", f"{jobName}.worker"), "queue": job.origin,
                    "timeout": job.timeout, "retryIntervals": list(job.retry_intervals or [])}


def _series(files: list[Path]) -> dict[str, dict]:
    """The push's files by SeriesInstanceUID, with the headers the series filters read."""
    series: dict[str, dict] = defaultdict(lambda: {"files": [], "SeriesDescription": "", "Modality": ""})
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "SeriesDescription", "Modality", *STUDY_TAGS])
        entry = series[str(ds.get("SeriesInstanceUID", ""))]
        entry["files"].append(path)
        entry["SeriesDescription"] = str(ds.get("SeriesDescription", "") or "")
        entry["Modality"] = str(ds.get("Modality", "") or "").strip().upper()
        for keyword in STUDY_TAGS:
            entry[keyword] = str(ds.get(keyword, "") or "").strip()
    return series


def _export(project: Project, series: dict[str, dict], study_uid: str, settings: ExtractSettings,
            records: Records, job_id: str, job_record: dict, sending: DestinationSettings, connection) -> dict:
    """Claim, de-identify, send and record one project's export of the study; its job-result entry."""
    deid = Deidentifier.for_project(project)
    kept = {uid: entry for uid, entry in series.items()
            if project.keeps_series(entry["SeriesDescription"], len(entry["files"]))}
    dropped = [{"series": deid.uid(uid), "instances": len(entry["files"])}
               for uid, entry in series.items() if uid not in kept]
    if not study_uid:
        raise ExtractFailed("the study has no StudyInstanceUID (neither the event nor its files)")
    study_id = deid.uid(study_uid)
    if not kept:   # nothing of the study goes to this project: nothing to record either
        return {"status": "empty", "study": study_id, "droppedSeries": dropped}
    job = {**job_record, "added_params": {job_record["jobName"]: {"projects": [project.slug]}}}
    claim = records.claim(project.slug, study_key(deid, study_uid), study_id, job_id, job)
    if not claim.claimed:
        return {"status": claim.outcome, "study": study_id, "exportedAt": claim.row.get("exportedAt"),
                "claim": claim.row.get("claim")}
    started = utcnow()
    destinations = project.model.destinations.dicom
    local = not destinations
    folder = settings.output_dir / project.slug if local else settings.work_dir / _safe_name(job_id) / project.slug
    try:
        try:
            written, study = _write(deid, kept, folder)
        except (DicomflowError, OSError, pydicom.errors.InvalidDicomError) as exc:
            records.finish(claim.export_id, job_id, ExportStatus.FAILED, started_at=started,
                           reason=f"de-identification failed: {exc}")
            raise
        if local:
            sent = {LOCAL: {"sent": written, "failed": {}, "path": str(folder / study_id)}}
        else:
            sent = _send(project, destinations, folder / study_id, study_id, sending, connection)
        status, instances, failed_files, reason = _outcome(sent, written)
        records.finish(claim.export_id, job_id, status, started_at=started, destinations=sent,
                       instances=instances, failed_files=failed_files, reason=reason, study=study)
    finally:
        if not local:   # the per-job working folder goes once the result is recorded (or failed)
            shutil.rmtree(settings.work_dir / _safe_name(job_id), ignore_errors=True)
    entry = {"status": status.value, "study": study_id, "written": written, "destinations": sorted(sent),
             "droppedSeries": dropped}
    if failed_files:
        entry["failedFiles"] = failed_files
    if reason:
        entry["error"] = reason
    return entry


def _write(deid: Deidentifier, series: dict[str, dict], output: Path) -> tuple[int, dict[str, Any]]:
    """De-identify the series into ``output/<study>/<series>/<sop>.dcm``; the count and what the
    records keep of the study (pseudonymised ids, study date as exported, series)."""
    written = 0
    study: dict[str, Any] = {"series": []}
    for entry in series.values():
        described: dict[str, Any] = {"instances": 0}
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
            described["instances"] += 1
            if described["instances"] == 1:
                described.update(SeriesInstanceUID=str(ds.SeriesInstanceUID),
                                 SeriesDescription=str(ds.get("SeriesDescription", "") or ""),
                                 Modality=str(ds.get("Modality", "") or ""))
                study.update(patient_id=str(ds.get("PatientID", "") or "") or None,
                             accession_number=str(ds.get("AccessionNumber", "") or "") or None,
                             study_date=str(ds.get("StudyDate", "") or "") or None)
        study["series"].append(described)
    return written, study


def _send(project: Project, destinations: tuple[str, ...], study_dir: Path, study_id: str,
          sending: DestinationSettings, connection) -> dict[str, dict]:
    """Send the study folder to each DICOM destination (dicomflow.extracts.destinations, docs/exports.md)."""
    when = dt.datetime.now(dt.UTC)
    sent: dict[str, dict] = {}
    for name in destinations:
        try:
            answer = send_study(project, name, study_dir, study_id=study_id, extract_time=when,
                                settings=sending, connection=connection)
        except DicomflowError as exc:   # DestinationError: cannot even start (secrets, unreachable, busy...)
            sent[name] = {"sent": 0, "failed": {}, "error": str(exc)}
            continue
        sent[name] = {"sent": len(answer.sent), "failed": dict(answer.failed)}
    return sent


def _outcome(sent: Mapping[str, dict], written: int) -> tuple[ExportStatus, int, dict[str, str], str | None]:
    """DONE when every destination confirmed every file; PARTIAL when some went; else FAILED."""
    failed_files = {f"{name}:{file}": why for name, r in sent.items() for file, why in r["failed"].items()}
    errors = [f"{name}: {r['error']}" for name, r in sent.items() if r.get("error")]
    short = [f"{name}: {r['sent']} of {written} confirmed" for name, r in sent.items()
             if not r.get("error") and r["sent"] < written and not r["failed"]]
    instances = min((r["sent"] for r in sent.values()), default=0)
    if not failed_files and not errors and not short:
        return ExportStatus.DONE, instances, {}, None
    reason = "; ".join(errors + short) or None
    if any(r["sent"] for r in sent.values()):
        return ExportStatus.PARTIAL, instances, failed_files, reason
    return ExportStatus.FAILED, 0, failed_files, reason or "no file was confirmed"


def _safe_name(job_id: str) -> str:
    """A job id as one folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
