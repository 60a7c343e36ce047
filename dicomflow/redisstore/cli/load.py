"""`dicomflow-redis load DIR`: bulk, parallel, resumable (what is stored and identical is skipped)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import redis

from dicomflow.redisstore import RedisStore
from dicomflow.redisstore.cli.options import Failure, cli
from dicomflow.redisstore.errors import InvalidInputError, RedisStoreError, StoreFullError


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_one(store: RedisStore, path: Path) -> str:
    """Store one file; ``skipped`` when it is stored with the same bytes (and so the same tags)."""
    status = store.store_file(str(path)).status
    return "skipped" if status == "unchanged" else status


#: The store of a load's worker process (one connection per process).
_process_store: RedisStore | None = None


def _start_process(url: str, prefix: str, chunk_size: int) -> None:
    global _process_store
    _process_store = RedisStore(redis.Redis.from_url(url), prefix, chunk_size)


def _work(path: Path) -> tuple[Path, str, str | None]:
    """One file in a worker process: (path, status, error message)."""
    try:
        return path, load_one(_process_store, path), None
    except StoreFullError as exc:
        return path, "full", str(exc)
    except InvalidInputError as exc:
        return path, "not DICOM", str(exc)
    except (RedisStoreError, OSError, redis.RedisError) as exc:
        return path, "failed", str(exc)


@cli.command("load")
@click.argument("folder", type=click.Path(exists=True, file_okay=True, dir_okay=True, path_type=Path))
@click.option("-j", "--jobs", default=os.cpu_count() or 2, show_default=True,
              help="processes storing files at once (reading and hashing are CPU work)")
@click.option("--progress/--no-progress", default=None, help="a progress bar on stderr [when it is a terminal]")
@click.pass_obj
def load(ctx, folder: Path, jobs: int, progress: bool | None) -> None:
    """Store every DICOM file under FOLDER (or the one file FOLDER).

    A second run skips what is stored with the same bytes; a run killed halfway leaves no
    partial instance, and the next run completes it. Files that are not DICOM (or have no
    SOPInstanceUID) are listed and left out. Exit status 1 if a DICOM file could not be stored.
    """
    ctx.store()  # reachable, and not the queue's database
    files = [folder] if folder.is_file() else _files(folder)
    counts = {"stored": 0, "replaced": 0, "unchanged": 0, "skipped": 0, "not DICOM": 0, "failed": 0}
    failures: list[str] = []
    start = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress

    settings = ctx.settings
    with ProcessPoolExecutor(max_workers=max(1, jobs), initializer=_start_process,
                             initargs=(settings.url, settings.prefix, settings.chunk_size)) as pool, \
            click.progressbar(length=len(files), label="loading", file=sys.stderr if show else open(os.devnull, "w"),
                              show_pos=True) as bar:
        try:
            for _path, status, error in pool.map(_work, files, chunksize=4):
                bar.update(1)
                if status == "full":
                    pool.shutdown(cancel_futures=True)
                    raise Failure(f"{error}\nstopped: the store is full; files stored so far stay, a later run "
                                  "resumes")
                counts[status] += 1
                if error:
                    failures.append(error)
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
