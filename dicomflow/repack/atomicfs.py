"""Concurrency-safe file writes for the repack: atomic replace, write-once, locked read-update-write.

Design (several repack processes may work on files of the same patient at once):

* Every file is written under a temporary name in its final folder and then renamed into
  place (``os.replace``; atomic on POSIX within one file system). A reader — pypx's own
  tools read these files without taking any lock — sees the old file or the new one,
  never a torn one, and a crash leaves at most a hidden ``.*.tmp`` file.
* Write-once files (the study/series meta and pack files) are published with ``os.link``
  from the temporary file, which fails when the name exists: the first writer wins, no
  later one rewrites it, and all of them finish. (On a file system without hard links the
  rename is used: the content is the same for every instance of a series.)
* The read-update-write of ``patientData/{PatientID}.json`` is serialised with an
  exclusive ``fcntl.flock`` on a sidecar lock file (``.{name}.lock``, left in place:
  deleting a lock file races with a process about to lock it). The lock cannot be on the
  JSON file itself, because the rename replaces that inode. Atomic replace alone would
  not do here: two processes reading the same old StudyList and both renaming would lose
  one study. flock is advisory, so only writers that take it are serialised — every
  dicomflow repack does; px-repack never wrote this file safely anyway.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
from collections.abc import Callable

# next() on an itertools.count is atomic under the GIL: unique names across threads too.
_serial = itertools.count()
#: The most bytes of a target's name that a temporary or lock file name repeats, so that
#: ``.{name}.{pid}.{serial}.tmp`` stays under NAME_MAX (255) for a target name of 255 bytes.
_STEM_MAX = 200


def _stem(name: str) -> str:
    """`name`, cut to `_STEM_MAX` bytes (never inside a character)."""
    data = name.encode()
    return name if len(data) <= _STEM_MAX else data[:_STEM_MAX].decode("utf-8", "ignore")


def _temp_name(path: str) -> str:
    """A name beside `path`, unique per process and thread, hidden from ``*.json``/``*.dcm`` globs."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{_stem(name)}.{os.getpid()}.{next(_serial)}.tmp")


def _write_temp(path: str, data: bytes) -> str:
    """Write `data` to a fresh temporary file beside `path`; return its name."""
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb", closefd=True) as file:
            file.write(data)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def dump_json(doc: object) -> bytes:
    """`doc` pretty-printed as px-repack writes it (4-space indent, ASCII)."""
    return json.dumps(doc, indent=4).encode()


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically (readers see the old or the new file, whole)."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_once(path: str, data: bytes) -> bool:
    """Create `path` with `data` unless it exists; True when this call created it."""
    if os.path.exists(path):
        return False
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(tmp, path)  # no hard links here: every writer's content is the same
        return True
    finally:
        _unlink_quietly(tmp)


def update_json_locked(path: str, update: Callable[[object], object]) -> object:
    """Read `path` (None if absent or not JSON), apply `update`, write the result back atomically.

    The whole read-update-write holds an exclusive lock on ``.{name}.lock`` beside `path`, so
    concurrent callers never lose each other's updates. (A name over 200 bytes is cut to
    200 there: two long names with the same start then share a lock, which only
    serialises them more.) The file is rewritten only when the
    result differs. Returns the result.
    """
    folder, name = os.path.split(path)
    lock_fd = os.open(os.path.join(folder, f".{_stem(name)}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as file:
                current = json.loads(file.read())
        except FileNotFoundError:
            current = None
        except ValueError:
            current = None  # not JSON (not written by us): start afresh, as rx-repack does
        result = update(current)
        if result != current:
            write_atomic(path, dump_json(result))
        return result
    finally:
        os.close(lock_fd)  # closing releases the flock


def place_file(src: str, dst: str, move: bool) -> None:
    """Copy (or with `move`, rename) `src` to `dst`; `dst` appears complete or not at all.

    A move is a rename when `src` and `dst` share a file system, else a copy to a temporary
    name, a rename into place and the removal of `src`.
    """
    if move:
        try:
            os.rename(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    tmp = _temp_name(dst)
    try:
        copy_file(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if move:
        os.unlink(src)


def copy_file(src: str, dst: str) -> None:
    """Copy the bytes of `src` to a new file `dst` (in the kernel with sendfile(2) where it can).

    Not shutil.copyfile: importing shutil (bz2, lzma) costs the per-file command ~2 ms.
    """
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            offset = 0
            try:
                while offset < size:
                    sent = os.sendfile(fout.fileno(), fin.fileno(), offset, size - offset)
                    if sent == 0:
                        break
                    offset += sent
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                    raise
            if offset < size:  # no sendfile for this pair of files, or the source grew: plain copy
                fin.seek(offset)
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
