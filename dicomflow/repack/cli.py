"""The repack command: rx-repack's interface (one file, e.g. as storescp's -xcr hook) or a whole tree.

Options are parsed with the standard library's `getopt`, not click or argparse: the
per-file command must start in a few milliseconds, and argparse alone (with the gettext,
locale and shutil imports it triggers) costs ~6 ms of it, click more (measured with
``python -X importtime``).
"""

from __future__ import annotations

import getopt
import json
import os
import sys
from collections.abc import Sequence

from dicomflow.errors import DicomflowError
from dicomflow.repack.errors import UsageError
from dicomflow.repack.repacker import RepackResult, repack_file

PROG = "python -m dicomflow.repack"
USAGE = f"""usage: {PROG} --xcrdir DIR [--xcrfile NAME] --datadir DATA [--logdir LOG]
                                 [--cleanup] [--verbosity N] [-l|--log-ndjson]

Repack DICOM files into the pypx layout, with rx-repack's interface.

  --xcrdir DIR      folder of the received file; without --xcrfile, the tree to repack
  --xcrfile NAME    the file inside DIR (one file: storescp's -xcr hook,
                    e.g. storescp -xcr '{PROG} --xcrdir "#p" --xcrfile "#f" --datadir DATA')
                    omit it to repack every file under DIR in one process
  --datadir DATA    output folder of the pypx layout
  --logdir LOG      output folder of pypx's log JSON files (patientData, studyData, seriesData)
  --cleanup         move the file instead of copying it
  --verbosity N     accepted and ignored (as rx-repack)
  -l, --log-ndjson  print one JSON line per file to stdout
  -h, --help        show this help

Exit status: 0 when every file was repacked, 1 when one failed, 2 on a usage error."""

_LONG = ["xcrdir=", "xcrfile=", "datadir=", "logdir=", "cleanup", "verbosity=", "log-ndjson", "help"]


class Options:
    """The parsed command line."""

    __slots__ = ("cleanup", "datadir", "log_ndjson", "logdir", "xcrdir", "xcrfile")

    def __init__(self) -> None:
        self.xcrdir: str | None = None
        self.xcrfile: str | None = None
        self.datadir: str | None = None
        self.logdir: str | None = None
        self.cleanup = False
        self.log_ndjson = False


def parse_args(argv: Sequence[str]) -> Options | None:
    """Parse `argv`; None when help was asked for.

    Raises:
        UsageError: the command line is wrong.
    """
    try:
        pairs, rest = getopt.gnu_getopt(list(argv), "lh", _LONG)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from exc
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    opts = Options()
    for name, value in pairs:
        if name in ("-h", "--help"):
            return None
        if name in ("-l", "--log-ndjson"):
            opts.log_ndjson = True
        elif name == "--cleanup":
            opts.cleanup = True
        elif name == "--verbosity":
            if not value.isdigit():
                raise UsageError(f"--verbosity needs a number, not {value!r}")
        else:
            setattr(opts, name[2:], value)
    for name in ("xcrdir", "datadir"):
        if not getattr(opts, name):
            raise UsageError(f"--{name} is required")
    return opts


def _report(ndjson: bool, src: str, result: RepackResult | None, error: DicomflowError | None) -> None:
    """Print the outcome of one file: an error on stderr, and the ndjson line with `ndjson`."""
    if error is not None:
        print(f"{PROG}: failed to repack {error}", file=sys.stderr)
        if ndjson:
            print(json.dumps({"src": src, "dst": None, "error": str(error)}), flush=True)
    elif ndjson:
        print(json.dumps(result.as_json()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit status (0 when every file was repacked, 1 if not, 2 on usage)."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{USAGE}\n\n{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if opts is None:
        print(USAGE)
        return 0
    if opts.xcrfile is None:
        from dicomflow.repack.tree import repack_tree

        if not os.path.isdir(opts.xcrdir):
            print(f"{PROG}: {opts.xcrdir}: not a folder (give --xcrfile to repack one file)", file=sys.stderr)
            return 1

        _, failed = repack_tree(opts.xcrdir, opts.datadir, opts.logdir, opts.cleanup,
                                lambda src, result, error: _report(opts.log_ndjson, src, result, error),
                                progress=sys.stderr)
        return 1 if failed else 0
    src = os.path.abspath(os.path.join(opts.xcrdir, opts.xcrfile))
    try:
        result = repack_file(src, opts.datadir, opts.logdir, opts.cleanup)
    except DicomflowError as exc:
        _report(opts.log_ndjson, src, None, exc)
        return 1
    _report(opts.log_ndjson, src, result, None)
    return 0
