"""Repacking a whole folder tree in one process, with a progress bar on a terminal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TextIO

from dicomflow.errors import DicomflowError
from dicomflow.repack.repacker import RepackResult, repack_file


def files_under(root: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Every regular file under `root`, sorted, leaving out the folders in `skip` (e.g. the output)."""
    skip_abs = {os.path.abspath(s) for s in skip}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(folder, d)) not in skip_abs)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


class ProgressBar:
    """``\\r 42% [#####.......] 80/192`` on `stream`, only when it is a terminal."""

    def __init__(self, total: int, stream: TextIO, width: int = 40):
        self.total = total
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty() and total > 0

    def update(self, done: int, failed: int) -> None:
        """Redraw for `done` files processed, `failed` of them failed."""
        if not self.enabled:
            return
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        errors = f", {failed} failed" if failed else ""
        self.stream.write(f"\r{100 * done // self.total:3d}% [{bar}] {done}/{self.total}{errors}")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def repack_tree(root: str, datadir: str, logdir: str | None, move: bool,
                report: Callable[[str, RepackResult | None, DicomflowError | None], None],
                progress: TextIO | None = None) -> tuple[int, int]:
    """Repack every file under `root`; call `report(src, result, error)` for each. Returns (done, failed).

    A file that fails (not DICOM, missing tag, unreadable) is reported and skipped; the
    others go on. The data and log folders are skipped when they lie inside `root`.
    """
    skip = (datadir,) if logdir is None else (datadir, logdir)
    paths = list(files_under(root, skip))
    bar = ProgressBar(len(paths), progress) if progress is not None else None
    failed = 0
    for done, path in enumerate(paths, 1):
        try:
            result = repack_file(path, datadir, logdir, move)
        except DicomflowError as exc:
            failed += 1
            report(path, None, exc)
        else:
            report(path, result, None)
        if bar is not None:
            bar.update(done, failed)
    if bar is not None:
        bar.close()
    return len(paths), failed
