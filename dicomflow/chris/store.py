"""Writing an instance into CUBE's storage atomically: a temporary name, then a rename."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from dicomflow.chris.errors import StorageWriteError

#: Temporary files live here, beside SERVICES/ on the same filesystem but outside any series
#: folder: CUBE registers every file under a series folder, a half-written one included.
TMP_DIR = ".dicomflow-tmp"


def storage_target(files_root: Path, relative: str) -> Path:
    """The absolute path of `relative` under `files_root`.

    Raises:
        StorageWriteError: the path would leave `files_root`.
    """
    root = files_root.resolve()
    target = (root / relative).resolve()
    if root not in target.parents:
        raise StorageWriteError(f"storage path {relative!r} leaves CHRIS_FILES_ROOT {root}")
    return target


def write_file(source: Path, files_root: Path, relative: str) -> Path:
    """Copy `source` to `files_root/relative` atomically; an existing file is replaced.

    Raises:
        StorageWriteError: the file cannot be read or written.
    """
    target = storage_target(files_root, relative)
    tmp_dir = files_root.resolve() / TMP_DIR
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageWriteError(f"cannot write {target}: {exc}") from exc
    return target


def write_empty(files_root: Path, relative: str) -> Path:
    """Create an empty marker file at `files_root/relative` (replaced when it exists).

    Raises:
        StorageWriteError: the file cannot be written.
    """
    target = storage_target(files_root, relative)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    except OSError as exc:
        raise StorageWriteError(f"cannot write {target}: {exc}") from exc
    return target


def count_dicom_files(folder: Path) -> int:
    """How many `.dcm` files are under `folder` (what CUBE's series API counts)."""
    if not folder.is_dir():
        return 0
    return sum(1 for _ in folder.rglob("*.dcm"))
