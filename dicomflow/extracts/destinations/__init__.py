"""Export destinations: send a de-identified study (DICOMweb STOW-RS, or FTPS as a zip) or a Parquet
extract (FTPS) to where a project's researchers are, at the rate the destination accepts.

The worker calls `send_study` for each DICOM destination a project names and records the
result: `SendResult.ok` (every file confirmed by the server) or a partial result naming each
file that failed and why (retryable). `DestinationError` when nothing can be sent at all.

Rate limits: one token bucket per destination name (dicomflow.ratelimit), shared by every
worker; one token per instance (FTPS zip: per instance in it; Parquet: per file). A send that
gets no token within DICOMFLOW_EXPORT_RATE_MAX_WAIT stops instead of holding its worker: it
raises `DestinationBusyError` if nothing was sent yet, else returns a partial result whose
unsent files carry that reason. Either way the export is retried later; nothing is requeued.
"""

from __future__ import annotations

import ftplib
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import redis

from dicomflow.extracts.destinations.errors import (
    DestinationAuthError,
    DestinationBusyError,
    DestinationConfigError,
    DestinationError,
    DestinationUnavailableError,
    UnknownDestinationError,
)
from dicomflow.extracts.destinations.result import SendResult
from dicomflow.extracts.destinations.secrets import Credentials, read_credentials
from dicomflow.extracts.destinations.settings import DestinationSettings
from dicomflow.extracts.project import Endpoint, Project
from dicomflow.ratelimit import BucketKeys, RateLimitTimeout, TokenBucket

#: A pseudonymised study id becomes a remote file name: no path separators, no leading dot.
STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def endpoint_of(project: Project, destination: str) -> Endpoint:
    """The project's entry for `destination`.

    Raises:
        UnknownDestinationError: the project does not define it under destinations.endpoints.
    """
    endpoint = project.model.destinations.endpoints.get(destination)
    if endpoint is None:
        raise UnknownDestinationError(destination, f"project {project.slug} does not define it "
                                                   f"(destinations.endpoints in {project.source})")
    return endpoint


def _settings(settings: DestinationSettings | Mapping[str, str]) -> DestinationSettings:
    """The settings given, or built from the configuration mapping given (the job's `config`)."""
    if isinstance(settings, DestinationSettings):
        return settings
    if isinstance(settings, Mapping):
        return DestinationSettings.from_config(settings)
    raise TypeError(f"settings: DestinationSettings or a configuration mapping, not {type(settings).__name__}")


def _token_taker(connection: redis.Redis, destination: str, endpoint: Endpoint,
                 settings: DestinationSettings) -> Callable[[int], None]:
    bucket = TokenBucket(connection, BucketKeys.named(destination), endpoint.rate, endpoint.burst)

    def take(count: int) -> None:
        try:
            for _ in range(count):
                bucket.acquire(settings.rate_max_wait)
        except RateLimitTimeout as exc:
            raise DestinationBusyError(destination, str(exc)) from exc
    return take


def _prepare(project: Project, destination: str, settings: DestinationSettings | Mapping[str, str],
             connection: redis.Redis
             ) -> tuple[Endpoint, Credentials, DestinationSettings, Callable[[int], None]]:
    settings = _settings(settings)
    endpoint = endpoint_of(project, destination)
    credentials = read_credentials(project, destination, endpoint)
    return endpoint, credentials, settings, _token_taker(connection, destination, endpoint, settings)


def _stopped(destination: str, names: list[str], sent: list[str], failed: dict[str, str],
             exc: DestinationError) -> SendResult:
    """A send that stopped part-way: nothing sent re-raises; else the unsent files fail with the reason."""
    if not sent:
        raise exc
    rest = {name: f"not sent: {exc}" for name in names if name not in failed and name not in sent}
    return SendResult(destination, tuple(sent), {**failed, **rest})


def send_study(project: Project, destination: str, study_dir: Path, *, study_id: str, extract_time: datetime,
               settings: DestinationSettings | Mapping[str, str], connection: redis.Redis) -> SendResult:
    """Send every ``*.dcm`` under `study_dir` (one de-identified study) to a destination of `project`.

    Args:
        project: the project (its destinations.endpoints say what `destination` is).
        destination: the destination's name.
        study_dir: the study's de-identified files (in sub-folders or not).
        study_id: the pseudonymised study id (the FTPS zip's name).
        extract_time: when the extract was made (unused for DICOM; kept for one signature).
        settings: `DestinationSettings` (the caller builds them once, from its configuration:
            `DestinationSettings.from_config(config)`), or the configuration mapping itself.
        connection: the pipeline's Redis (the destinations' shared rate limits).

    Returns:
        per file (relative to `study_dir`): confirmed, or failed with the reason.

    Raises:
        DestinationError: nothing could be sent: unknown destination, secrets missing, login
            refused, server unreachable through every attempt, no rate-limit token in time.
    """
    endpoint, credentials, settings, take = _prepare(project, destination, settings, connection)
    study_dir = Path(study_dir)
    files = sorted(p for p in study_dir.rglob("*.dcm") if p.is_file())
    names = [p.relative_to(study_dir).as_posix() for p in files]
    if endpoint.type == "dicomweb":
        from dicomflow.extracts.destinations.dicomweb import StowSender

        sender = StowSender(destination, endpoint, credentials, settings, take)
        try:
            sender.send(study_dir, files)
        except (DestinationUnavailableError, DestinationBusyError) as exc:
            return _stopped(destination, names, sender.sent, sender.failed, exc)
        return SendResult(destination, tuple(sender.sent), sender.failed)
    return _send_study_zip(project, destination, credentials, settings, take, study_dir, files, names, study_id)


def _send_study_zip(project: Project, destination: str, credentials: Credentials, settings: DestinationSettings,
                    take: Callable[[int], None], study_dir: Path, files: list[Path], names: list[str],
                    study_id: str) -> SendResult:
    from dicomflow.extracts.destinations.ftps import FtpsUploader, write_zip

    if not STUDY_ID.match(study_id or ""):
        raise DestinationError(destination, f"{study_id!r} cannot be a file name (letters, digits, '.', '_', '-')")
    if not files:
        return SendResult(destination)
    uploader = FtpsUploader(destination, credentials, settings, take)
    try:
        # beside the study's files (the same disk as the extract), not in a small /tmp
        with tempfile.TemporaryDirectory(prefix=".zip-", dir=study_dir.parent) as scratch:
            archive = Path(scratch) / f"{study_id}.zip"
            write_zip(files, study_dir, archive)
            try:
                uploader.upload(archive, uploader.remote(project.slug, f"{study_id}.zip"), len(files))
            except ftplib.error_perm as exc:
                return SendResult(destination, (), {name: f"FTP {exc}" for name in names})
    finally:
        uploader.close()
    return SendResult(destination, tuple(names), {})


def send_parquet(project: Project, destination: str, extract_dir: Path, *, extract_time: datetime,
                 settings: DestinationSettings | Mapping[str, str], connection: redis.Redis) -> SendResult:
    """Upload one local Parquet extract folder (its files, e.g. ``radiology/radiology.parquet``,
    ``omop/public/*.parquet``) to ``<project>/<extract-datetime>/parquet/...`` of an FTPS destination.

    Returns and raises as `send_study` (names relative to `extract_dir`); a DICOMweb destination
    takes no Parquet (DestinationConfigError).
    """
    endpoint, credentials, settings, take = _prepare(project, destination, settings, connection)
    if endpoint.type != "ftps":
        raise DestinationConfigError(destination, f"a {endpoint.type} destination takes no Parquet files")
    from dicomflow.extracts.destinations.ftps import FtpsUploader, extract_slug

    extract_dir = Path(extract_dir)
    files = sorted(p for p in extract_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(extract_dir).parts))
    names = [p.relative_to(extract_dir).as_posix() for p in files]
    uploader = FtpsUploader(destination, credentials, settings, take)
    sent: list[str] = []
    failed: dict[str, str] = {}
    try:
        for path, name in zip(files, names):
            try:
                uploader.upload(path, uploader.remote(project.slug, extract_slug(extract_time), "parquet", name), 1)
            except ftplib.error_perm as exc:
                failed[name] = f"FTP {exc}"
                continue
            sent.append(name)
    except (DestinationUnavailableError, DestinationBusyError) as exc:
        return _stopped(destination, names, sent, failed, exc)
    finally:
        uploader.close()
    return SendResult(destination, tuple(sent), failed)


__all__ = [
    "DestinationAuthError", "DestinationBusyError", "DestinationConfigError", "DestinationError",
    "DestinationSettings", "DestinationUnavailableError", "SendResult", "UnknownDestinationError",
    "endpoint_of", "send_parquet", "send_study",
]
