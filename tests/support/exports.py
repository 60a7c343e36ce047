"""Research-export test helpers: a project file with destinations, and a de-identified study made
with the real engine (dicomflow.extracts.deid), laid out as the deid service writes it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
import yaml

from dicomflow.extracts.deid import Deidentifier
from dicomflow.extracts.project import Project, load_project

#: The pseudonym secret of the test projects (set in the environment by the tests).
SECRET_ENV = "DFTEST_EXPORT_SECRET"


def write_project(folder: Path, endpoints: dict, *, slug: str = "lung-ct", dicom: Iterable[str] = (),
                  parquet: Iterable[str] = ()) -> Project:
    """Write ``<folder>/<slug>.yaml`` (all studies, the given destinations) and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}.yaml"
    path.write_text(yaml.safe_dump({
        "slug": slug, "studies": {"all": True},
        "destinations": {"dicom": list(dicom), "parquet": list(parquet), "endpoints": endpoints},
        "secret": {"env": SECRET_ENV},
    }))
    return load_project(path)


def deidentify(project: Project, sources: Iterable[Path], output: Path) -> tuple[Path, str]:
    """De-identify `sources` into ``<output>/<study>/<series>/<sop>.dcm``; return the study folder and
    its (pseudonymised) StudyInstanceUID."""
    deid = Deidentifier.for_project(project)
    study = None
    for source in sources:
        ds = deid.dataset(pydicom.dcmread(source))
        study = str(ds.StudyInstanceUID)
        target = output / study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    assert study is not None, "no source files"
    return output / study, study
