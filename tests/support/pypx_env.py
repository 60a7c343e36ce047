"""px-repack (pypx 3.10.16) in its own virtualenv, created on first use, for the parity tests and the benchmark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-pypx"
#: The version rx-repack's parity test uses; it needs pydicom 2 (it calls pydicom.read_file).
REQUIREMENTS = ("pypx==3.10.16", "pydicom<3")


class PypxUnavailable(RuntimeError):
    """The px-repack virtualenv could not be created."""


def venv_path() -> Path:
    """Where the px-repack virtualenv lives: $DICOMFLOW_PYPX_VENV, else .venv-pypx in the repo."""
    return Path(os.environ.get("DICOMFLOW_PYPX_VENV") or DEFAULT_VENV)


def px_repack() -> Path:
    """The px-repack console script, creating its virtualenv when absent (``python3 -m venv`` + pip).

    Raises:
        PypxUnavailable: venv creation or the pip install failed (the message has pip's output).
    """
    venv = venv_path()
    script = venv / "bin" / "px-repack"
    if script.exists():
        return script
    python3 = shutil.which("python3")
    if python3 is None:
        raise PypxUnavailable("python3 is not on PATH")
    steps = ([python3, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", *REQUIREMENTS])
    for step in steps:
        proc = subprocess.run(step, check=False, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise PypxUnavailable(f"{' '.join(step)} failed:\n{proc.stdout}\n{proc.stderr}")
    if not script.exists():
        raise PypxUnavailable(f"pypx installed but {script} is missing")
    return script


#: Run in px-repack's virtualenv: print, for each file named in argv, the ``{keyword: value}``
#: map px-repack stores as the series-meta ``DICOM`` (its ``d_dicomSimple``), as one JSON list.
_DUMP_SCRIPT = """
import json, sys
from pypx.repack import Process
out = []
for path in sys.argv[1:]:
    read = Process.DICOMfile_read(file=path)
    assert read["status"], (path, read)
    out.append(read["d_DICOM"]["d_dicomSimple"])
print(json.dumps(out))
"""


def px_dicom_dumps(paths: list[str]) -> list[dict[str, str]]:
    """px-repack's own series-meta ``DICOM`` values (``{keyword: str}``) for each of `paths`, in one process.

    Raises:
        PypxUnavailable: as `px_repack`.
    """
    python = px_repack().parent / "python"
    proc = subprocess.run([str(python), "-c", _DUMP_SCRIPT, *paths], check=True, capture_output=True,
                          text=True, timeout=600)
    return json.loads(proc.stdout)
