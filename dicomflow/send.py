"""`dicomflow-send`: send DICOM files and folders to the stack's Orthanc over one C-STORE association."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicomflow.config import load_config
from dicomflow.errors import ConfigError
from dicomflow.orthanc_config import OrthancSettings

#: Exit codes (also in --help).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ASSOCIATION = 0, 1, 2, 3
#: A-ASSOCIATE-RQ carries at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255).
MAX_CONTEXTS = 128
#: The calling AE title when none is given.
DEFAULT_CALLING_AET = "DICOMFLOWSEND"

EPILOG = f"""\b
The defaults come from the stack's configuration: --config, else $DICOMFLOW_CONFIG, else
$DICOMFLOW_HOME/dicomflow.env, else ./state/dicomflow.env (what run.sh writes), with
ORTHANC_* environment variables on top: the port is ORTHANC_DICOM_PORT, the called AE
title ORTHANC_AET.

\b
Files that are not DICOM (no DICM preamble: a README.md, a thumbnail) are skipped and
listed; a DICOM file that cannot be read, or that the peer refuses, is a failure, listed
with its reason or its DIMSE status (e.g. 0xA700 Refused: Out of Resources).

\b
Exit status:
  {EXIT_OK}  every DICOM file was stored (files that are not DICOM were skipped)
  {EXIT_FAILED}  at least one DICOM file failed, or none was found
  {EXIT_USAGE}  usage error (unknown option, a path that does not exist, bad configuration)
  {EXIT_NO_ASSOCIATION}  no association: the peer rejected it, is not listening, or accepted no context
"""


@dataclass(frozen=True)
class Instance:
    """A DICOM file to send: what its presentation context needs."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class Report:
    """What happened to every input file."""

    stored: list[Path] = field(default_factory=list)
    #: Stored with a warning status (e.g. 0xB000 coercion): (path, status text).
    warnings: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed or not (self.stored or self.warnings) else EXIT_OK


class AssociationError(Exception):
    """The association could not be established (rejected, unreachable, no context accepted)."""


def expand(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Every file of `paths`: files as given, folders recursively in name order (hidden entries skipped)."""
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


def status_text(code: int) -> str:
    """`0xA700 Refused: Out of Resources` for a DIMSE status code."""
    category, description = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} {description or category}".rstrip()


def classify(files: Iterable[Path], report: Report) -> list[Instance]:
    """Read each file's header: DICOM files to send; others go to `report.skipped` or `report.failed`."""
    instances = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if not (sop_class and syntax and ds.file_meta.get("MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID"))):
                raise ValueError("no SOP Class UID, SOP Instance UID or Transfer Syntax UID")
        except InvalidDicomError:
            report.skipped.append(path)
            continue
        except (OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
            # pydicom raises these on a truncated or corrupt header.
            report.failed.append((path, f"unreadable: {exc}"))
            continue
        instances.append(Instance(path, str(sop_class), str(syntax)))
    return instances


def send(instances: Sequence[Instance], report: Report, *, host: str, port: int, called_aet: str,
         calling_aet: str, progress: bool = True, timeout: float = 60.0) -> None:
    """Send `instances` over one association, recording each outcome in `report`.

    Raises:
        AssociationError: no association (the reason says why, with the peer's rejection reason).
    """
    contexts = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    proposed = set(contexts[:MAX_CONTEXTS])
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted(proposed):
        ae.add_requested_context(sop_class, syntax)
    answers: list[str] = []
    heard: list[object] = []  # the peer's A-ASSOCIATE answers

    def on_acse(event: evt.Event) -> None:
        primitive = event.primitive
        heard.append(primitive)
        if getattr(primitive, "result", None) in (0x01, 0x02):
            answers.append(f"{primitive.result_str}, source {primitive.source_str}: {primitive.reason_str}")

    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    where = f"{called_aet}@{host}:{port}"
    if not assoc.is_established:
        if assoc.is_rejected:
            raise AssociationError(f"{where} rejected the association ({'; '.join(answers) or 'no reason given'})")
        if heard:
            raise AssociationError(f"{where} accepted none of the {len(proposed)} presentation contexts "
                                   "(SOP class and transfer syntax pairs), or aborted")
        raise AssociationError(f"no association with {where} (not listening, or timed out)")
    # pynetdicom leaves Nagle's algorithm on: each C-STORE would wait ~40 ms for an ACK.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    try:
        with click.progressbar(instances, file=sys.stderr, label=f"C-STORE to {where}", show_pos=True,
                               hidden=not progress) as bar:
            for instance in bar:
                _store(assoc, instance, accepted, proposed, report)
    finally:
        if assoc.is_established:
            assoc.release()


def _store(assoc, instance: Instance, accepted: set[tuple[str, str]], proposed: set[tuple[str, str]],
           report: Report) -> None:
    key = (instance.sop_class_uid, instance.transfer_syntax_uid)
    if key not in proposed:
        report.failed.append((instance.path, f"not sent: more than {MAX_CONTEXTS} SOP class/transfer syntax pairs "
                                             "in one association"))
        return
    if key not in accepted:
        report.failed.append((instance.path, f"not sent: the peer refused the presentation context "
                                             f"{instance.sop_class_uid} / {instance.transfer_syntax_uid}"))
        return
    if not assoc.is_established:
        report.failed.append((instance.path, "not sent: the association was aborted"))
        return
    try:
        status = assoc.send_c_store(instance.path)
    except (ValueError, AttributeError, OSError, EOFError) as exc:
        # pynetdicom could not read or encode the file (e.g. truncated pixel data).
        report.failed.append((instance.path, f"not sent: {exc}"))
        return
    if "Status" not in status:
        report.failed.append((instance.path, "no answer: the peer aborted, timed out or answered invalidly"))
        return
    code = int(status.Status)
    text = status_text(code)
    comment = status.get("ErrorComment")
    if comment:
        text += f" ({comment})"
    category = code_to_category(code)
    if category == "Success":
        report.stored.append(instance.path)
    elif category == "Warning":
        report.warnings.append((instance.path, text))
    else:
        report.failed.append((instance.path, text))


def config_path(given: str | None, environ=os.environ) -> str | None:
    """The configuration file: `given`, $DICOMFLOW_CONFIG, $DICOMFLOW_HOME/dicomflow.env, ./state/dicomflow.env."""
    if given:
        return given
    if environ.get("DICOMFLOW_CONFIG"):
        return environ["DICOMFLOW_CONFIG"]
    candidate = Path(environ.get("DICOMFLOW_HOME") or "state") / "dicomflow.env"
    return str(candidate) if candidate.is_file() else None


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--config", "config_file", default=None, help="the .env-style configuration file")
@click.option("--host", default="127.0.0.1", show_default=True, help="Orthanc's host")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Orthanc's DICOM port [default: ORTHANC_DICOM_PORT]")
@click.option("--aec", "--called-aet", "called_aet", default=None,
              help="the called AE title [default: ORTHANC_AET]")
@click.option("--aet", "--calling-aet", "calling_aet", default=DEFAULT_CALLING_AET, show_default=True,
              help="this sender's (calling) AE title")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="seconds to wait for the peer (association, each C-STORE)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def main(paths: tuple[str, ...], config_file: str | None, host: str, port: int | None, called_aet: str | None,
         calling_aet: str, timeout: float, no_progress: bool) -> None:
    """Send DICOM files, and folders of them (recursively), to Orthanc over one association."""
    if not (called_aet and port):
        try:
            settings = OrthancSettings.from_config(load_config(config_path(config_file)))
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        called_aet, port = called_aet or settings.aet, port or settings.dicom_port
    for title, name in ((called_aet, "--aec"), (calling_aet, "--aet")):
        if not 0 < len(title.strip()) <= 16 or "\\" in title:
            raise click.BadParameter(f"{title!r}: an AE title has 1 to 16 characters, no backslash", param_hint=name)
    report = Report()
    instances = classify(expand(paths), report)
    if instances:
        try:
            send(instances, report, host=host, port=port, called_aet=called_aet, calling_aet=calling_aet,
                 progress=not no_progress, timeout=timeout)
        except AssociationError as exc:
            click.echo(f"error: {exc}; nothing sent", err=True)
            sys.exit(EXIT_NO_ASSOCIATION)
    for path in report.skipped:
        click.echo(f"skipped (not DICOM): {path}", err=True)
    for path, text in report.warnings:
        click.echo(f"stored with a warning: {path}: {text}", err=True)
    for path, text in report.failed:
        click.echo(f"failed: {path}: {text}", err=True)
    stored = len(report.stored) + len(report.warnings)
    click.echo(f"{stored} stored, {len(report.failed)} failed, {len(report.skipped)} skipped (not DICOM)", err=True)
    sys.exit(report.exit_code)


if __name__ == "__main__":
    main()
