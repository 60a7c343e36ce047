"""`dicomflow-redis load DIR`: bulk, parallel, resumable (what is stored and identical is skipped)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import redis

from dicomflow.redisstore import RedisStore
from dicomflow.redisstore.cli.options import Failure, cli
from dicomflow.redisstore.errors import InvalidInputError, RedisStoreError, StoreFullError
from dicomflow.redisstore.model import read_header, sha256_file


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_one(store: RedisStore, path: Path) -> str:
    """Store one file unless it is stored with the same bytes; returns the status."""
    header = read_header(str(path))
    digest, size = sha256_file(str(path))
    sop = header.tags.get("SOPInstanceUID")
    if isinstance(sop, str) and store.exists_identical(sop.strip(), digest, size):
        return "skipped"
    return store.store_file(str(path), header.tags, transfer_syntax=header.transfer_syntax, sha256=digest).status


@cli.command("load")
@click.argument("folder", type=click.Path(exists=True, file_okay=True, dir_okay=True, path_type=Path))
@click.option("-j", "--jobs", default=min(8, (os.cpu_count() or 2) * 2), show_default=True,
              help="files stored at once (threads, one connection each)")
@click.option("--progress/--no-progress", default=None, help="a progress bar on stderr [when it is a terminal]")
@click.pass_obj
def load(ctx, folder: Path, jobs: int, progress: bool | None) -> None:
    """Store every DICOM file under FOLDER (or the one file FOLDER).

    A second run skips what is stored with the same bytes; a run killed halfway leaves no
    partial instance, and the next run completes it. Files that are not DICOM (or have no
    SOPInstanceUID) are listed and left out. Exit status 1 if a DICOM file could not be stored.
    """
    store = ctx.store()
    files = [folder] if folder.is_file() else _files(folder)
    counts = {"stored": 0, "replaced": 0, "unchanged": 0, "skipped": 0, "not DICOM": 0, "failed": 0}
    failures: list[str] = []
    start = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress

    def work(path: Path) -> tuple[Path, str, str | None]:
        try:
            return path, load_one(store, path), None
        except StoreFullError as exc:
            return path, "full", str(exc)
        except InvalidInputError as exc:
            return path, "not DICOM", str(exc)
        except (RedisStoreError, OSError) as exc:
            return path, "failed", str(exc)

    total_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            click.progressbar(length=len(files), label="loading", file=sys.stderr if show else open(os.devnull, "w"),
                              show_pos=True) as bar:
        try:
            for path, status, error in pool.map(work, files):
                bar.update(1)
                if status == "full":
                    pool.shutdown(cancel_futures=True)
                    raise Failure(f"{error}\nstopped: the store is full; files stored so far stay, a later run "
                                  "resumes")
                if error:
                    failures.append(error)
                    counts[status] += 1
                else:
                    counts[status] += 1
                    total_bytes += path.stat().st_size
        except redis.RedisError as exc:
            raise Failure(f"the store's Redis failed: {exc}") from exc
    seconds = time.perf_counter() - start
    for message in failures:
        click.echo(f"dicomflow-redis load: {message}", err=True)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    click.echo(f"{len(files)} files in {seconds:.1f} s ({len(files) / seconds if seconds else 0:.0f} files/s): "
               f"{summary or 'nothing'}")
    if counts["failed"]:
        raise Failure(f"{counts['failed']} file(s) could not be stored (listed above)")
