"""Parquet extracts of a project, in PIXL's local layout::

    <exports dir>/<project>/all_extracts/<extract-datetime>/radiology/radiology.parquet
                                                           /omop/public/*.parquet   (the cohort's, if any)
    <exports dir>/<project>/latest -> all_extracts/<extract-datetime>

An extract lists every study the records hold as exported (done) for the project, one row per
study. It is built in a hidden temporary folder and renamed into place when complete, and
`latest` is switched by renaming a new symlink over it, so a reader sees the previous extract
or the new one, never half of one.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dicomflow.errors import DicomflowError
from dicomflow.extracts.destinations.settings import DestinationSettings
from dicomflow.extracts.errors import ProjectError
from dicomflow.extracts.project import LOCAL, ExtractSettings, Project   # LOCAL: no upload, the local layout
from dicomflow.extracts.records import Records

#: radiology.parquet: one row per exported study (every identifier pseudonymised).
RADIOLOGY_SCHEMA = pa.schema([
    pa.field("project", pa.string(), nullable=False),
    pa.field("extract_datetime", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("patient_id", pa.string()),                 # the keyed pseudonym (PatientID as exported)
    pa.field("accession_number", pa.string()),           # as exported (pseudonymised, or empty)
    pa.field("study_instance_uid", pa.string(), nullable=False),   # the pseudonymised StudyInstanceUID
    pa.field("study_date", pa.date32()),                 # as exported: date-shifted (or the profile's dummy)
    pa.field("modalities", pa.list_(pa.string())),
    pa.field("series_descriptions", pa.list_(pa.string())),
    pa.field("series_count", pa.int32()),
    pa.field("instance_count", pa.int32()),
    pa.field("exported_at", pa.timestamp("us", tz="UTC")),
    pa.field("destinations", pa.list_(pa.string())),
])


@dataclass
class ExtractResult:
    """One Parquet extract written (and uploaded where the project says)."""

    project: str
    extract_time: dt.datetime
    path: Path
    studies: int
    destinations: dict[str, Any] = field(default_factory=dict)
    record_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"project": self.project, "extractTime": self.extract_time.isoformat(), "path": str(self.path),
                "studies": self.studies, "destinations": self.destinations, "id": self.record_id}


def extract_name(when: dt.datetime) -> str:
    """The extract's folder name: its UTC time, PIXL-like (``2026-12-02t16-55-03``)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dt%H-%M-%S")


def radiology_table(project: str, extract_time: dt.datetime, studies: list[dict[str, Any]]) -> pa.Table:
    """radiology.parquet's table from the records' exported studies (`Records.exported`)."""
    rows = []
    for study in studies:
        series = study.get("series") or []
        rows.append({
            "project": project, "extract_datetime": extract_time,
            "patient_id": study.get("patientId"), "accession_number": study.get("accessionNumber"),
            "study_instance_uid": study["studyId"], "study_date": _date(study.get("studyDate")),
            "modalities": sorted({s.get("Modality") or "" for s in series} - {""}),
            "series_descriptions": [s.get("SeriesDescription") or "" for s in series],
            "series_count": len(series), "instance_count": study.get("instances") or 0,
            "exported_at": dt.datetime.fromisoformat(study["exportedAt"]) if study.get("exportedAt") else None,
            "destinations": list(study.get("destinations") or []),
        })
    return pa.Table.from_pylist(rows, schema=RADIOLOGY_SCHEMA)


def _date(value: str | None) -> dt.date | None:
    """A DICOM DA (YYYYMMDD) as a date; empty or malformed → null (the records keep the text)."""
    try:
        return dt.datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:
        return None


def write_extract(project: Project, records: Records, settings: ExtractSettings, *,
                  config: Mapping[str, str] | None = None, connection=None,
                  now: dt.datetime | None = None) -> ExtractResult:
    """Write a Parquet extract of every study exported for `project`, switch `latest` to it,
    upload it to the project's Parquet destinations other than "local", and record it.

    `config` is the caller's configuration mapping: the uploads' `DestinationSettings` are built
    from it (``DICOMFLOW_EXPORT_*``), once, before anything is written; `connection` is the
    pipeline's Redis (the destinations' rate limits).

    Raises:
        ConfigError: a ``DICOMFLOW_EXPORT_*`` value of `config` has the wrong form (nothing written).
        ProjectError: the project's omopExtract has no ``public/`` folder.
        RecordsError: the records cannot be read or written.
        OSError: the exports folder cannot be written (nothing half-written is left).
    """
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    uploads = [name for name in project.model.destinations.parquet if name != LOCAL]
    # the destinations' settings from the caller's configuration, checked before anything is written
    sending = DestinationSettings.from_config(config or {}) if uploads else None
    studies = records.exported(project.slug)
    omop = _omop_public(project)
    base = settings.parquet_dir / project.slug
    all_extracts = base / "all_extracts"
    all_extracts.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=all_extracts, prefix=f".{extract_name(when)}.", suffix=".part"))
    try:
        (work / "radiology").mkdir()
        pq.write_table(radiology_table(project.slug, when, studies), work / "radiology" / "radiology.parquet")
        if omop is not None:
            shutil.copytree(omop, work / "omop" / "public")
        work.chmod(0o755)
        final = _free_name(all_extracts, extract_name(when))
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _point_latest(base, final)
    result = ExtractResult(project.slug, when, final, len(studies))
    result.destinations = {LOCAL: {"path": str(final)}}
    if sending is not None:
        result.destinations.update(_upload(project, uploads, final, when, sending, connection))
    result.record_id = records.record_extract(project.slug, when, final, len(studies), result.destinations)
    return result


def _omop_public(project: Project) -> Path | None:
    if project.model.omop_extract is None:
        return None
    public = project.path(project.model.omop_extract) / "public"
    if not public.is_dir():
        raise ProjectError(f"the OMOP extract has no public/ folder: {public}", str(project.source), "omopExtract")
    return public


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `name-2`, `name-3`... when an extract of the same second exists."""
    candidate, n = folder / name, 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{name}-{n}"
    return candidate


def _point_latest(base: Path, target: Path) -> None:
    """Switch ``base/latest`` to `target` atomically: a new symlink renamed over the old one."""
    link = base / f".latest.{os.getpid()}.{target.name}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(target, base), link)
    os.replace(link, base / "latest")


def _upload(project: Project, names: list[str], extract_dir: Path, when: dt.datetime,
            sending: DestinationSettings, connection) -> dict[str, Any]:
    """Send the extract to each Parquet destination (dicomflow.extracts.destinations, docs/exports.md)."""
    from dicomflow.extracts.destinations import send_parquet

    results: dict[str, Any] = {}
    for name in names:
        try:
            answer = send_parquet(project, name, extract_dir, extract_time=when, settings=sending,
                                  connection=connection)
        except DicomflowError as exc:
            results[name] = {"sent": 0, "failed": {}, "error": str(exc)}
            continue
        results[name] = {"sent": len(answer.sent), "failed": dict(answer.failed)}
    return results
