"""Repacking one DICOM instance: place it in the pypx layout and write its log files."""

from __future__ import annotations

import os

from dicomflow.repack import atomicfs, logs
from dicomflow.repack.errors import OutputError, UnreadableFileError
from dicomflow.repack.header import TAG_OF, Header, read_header
from dicomflow.repack.layout import PATH_OPTIONAL, pack_path, required_values
from dicomflow.repack.seriesmeta import series_meta_document


class RepackResult:
    """What one repack did: the output file, its size, the IDs and the optional tags found missing."""

    __slots__ = ("dst", "missing", "patient_id", "series_uid", "size", "src")

    def __init__(self, src: str, dst: str, size: int, patient_id: str, series_uid: str,
                 missing: list[dict[str, str]]):
        self.src = src
        self.dst = dst
        self.size = size
        self.patient_id = patient_id
        self.series_uid = series_uid
        #: ``[{"tag": "(0010,1010)", "name": "PatientAge", "error": "no such element"}, ...]``
        self.missing = missing

    def as_json(self) -> dict[str, object]:
        """rx-repack's ndjson success line (``missing`` left out when empty)."""
        doc: dict[str, object] = {"src": self.src, "dst": self.dst, "size": self.size,
                                  "PatientID": self.patient_id, "SeriesInstanceUID": self.series_uid}
        if self.missing:
            doc["missing"] = self.missing
        return doc


def missing_tags(header: Header, keywords: tuple[str, ...]) -> list[dict[str, str]]:
    """The entries of the ndjson ``missing`` list for those of `keywords` that are missing."""
    out = []
    for keyword in keywords:
        reason = header.missing_reason(keyword)
        if reason is not None:
            tag = TAG_OF[keyword]
            out.append({"tag": f"({tag >> 16:04X},{tag & 0xFFFF:04X})", "name": keyword, "error": reason})
    return out


def repack_file(src: str, datadir: str, logdir: str | None = None, move: bool = False) -> RepackResult:
    """Repack the DICOM file `src` under `datadir` (and its log files under `logdir`).

    With `move`, the source is renamed away instead of copied. Nothing is written unless
    the header is readable and has every required tag; each output file is complete or
    absent (see `atomicfs`).

    Raises:
        RepackError: a subclass naming `src` (or the output) and the reason.
        MissingTagError: a required tag (SOPInstanceUID, PatientID, StudyInstanceUID,
            SeriesInstanceUID) is missing; its message names `src`.
    """
    src = os.path.abspath(src)
    header = read_header(src)
    place = pack_path(header)
    ids = required_values(header)
    datadir = os.path.abspath(datadir)
    series_dir = os.path.join(datadir, place.series_dir)
    dst = os.path.join(series_dir, place.filename)
    paths = None
    if logdir is not None:
        names = {k: logs.checked_name(ids[k], k, src)
                 for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")}
        paths = logs.LogPaths(os.path.abspath(logdir), names["PatientID"], names["StudyInstanceUID"],
                              names["SeriesInstanceUID"], place.filename)
    try:
        os.makedirs(series_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(series_dir, f"cannot create the series folder: {exc.strerror or exc}") from exc
    try:
        atomicfs.place_file(src, dst, move)
    except FileNotFoundError as exc:
        if os.path.exists(src):
            raise OutputError(dst, f"cannot write it: {exc.strerror or exc}") from exc
        raise UnreadableFileError(src, "it disappeared while being repacked") from exc
    except OSError as exc:
        raise OutputError(dst, f"cannot write it: {exc.strerror or exc}") from exc
    missing = missing_tags(header, PATH_OPTIONAL)
    if paths is not None:
        _write_logs(paths, header, ids, place.filename, series_dir, dst)
        seen = set(PATH_OPTIONAL)
        missing += missing_tags(header, tuple(k for k in logs.LOG_OPTIONAL if k not in seen))
    return RepackResult(src, dst, os.stat(dst).st_size, ids["PatientID"], ids["SeriesInstanceUID"], missing)


def _write_logs(paths: logs.LogPaths, header: Header, ids: dict[str, str], filename: str,
                series_dir: str, dst: str) -> None:
    """Write the six log files of one instance (see ``/work/shared/docs/repack.md``)."""
    try:
        for folder in {os.path.dirname(p) for p in (paths.patient_data, paths.study_series_meta,
                                                    paths.series_meta, paths.instance)}:
            os.makedirs(folder, exist_ok=True)
        atomicfs.update_json_locked(paths.patient_data,
                                    lambda current: logs.update_patient_data(current, header, ids))
        if not os.path.exists(paths.study_series_meta):
            # The source may have been moved away already: the placed copy is the same bytes.
            doc = series_meta_document(dst, ids["StudyInstanceUID"], ids["SeriesInstanceUID"], series_dir)
            atomicfs.write_once(paths.study_series_meta, atomicfs.dump_json(doc))
        if not os.path.exists(paths.study_meta):
            atomicfs.write_once(paths.study_meta, atomicfs.dump_json(logs.study_meta(header, ids)))
        if not os.path.exists(paths.series_meta):
            atomicfs.write_once(paths.series_meta, atomicfs.dump_json(logs.series_meta(header, ids)))
        atomicfs.write_atomic(paths.instance,
                              atomicfs.dump_json(logs.instance_record(header, ids, filename, dst)))
        if not os.path.exists(paths.series_pack):
            atomicfs.write_once(paths.series_pack, atomicfs.dump_json(logs.SERIES_PACK))
    except OSError as exc:
        raise OutputError(exc.filename or paths.patient_data,
                          f"cannot write the log file: {exc.strerror or exc}") from exc
