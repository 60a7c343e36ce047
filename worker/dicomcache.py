"""Local copies of Orthanc's DICOM files for the jobs of one host: fetched once, swept later."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path

import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

from dicomflow.errors import OrthancError, OrthancUnavailableError
from dicomflow.events import ORTHANC_ID
from dicomflow.settings import Settings

log = logging.getLogger(__name__)

SWEEP_EVERY = 60.0
#: Connecting to Orthanc, and waiting for its next bytes (s).
TIMEOUT = urllib3.Timeout(connect=5, read=120)
#: urllib3's errors that mean Orthanc is not (or no longer) answering: worth trying again.
UNAVAILABLE = (NewConnectionError, ConnectTimeoutError, ReadTimeoutError, ProtocolError)
#: Pauses between fetches while Orthanc is unavailable (s); the last one repeats.
BACK_OFF = (0.5, 1, 2, 4, 8, 15)


class DicomCache:
    """`<cache>/instances/<orthanc id>.dcm`, shared by every worker process of the host.

    A file is downloaded by one process while the others wait on its lock file; files not
    used for `cache_ttl` seconds are removed by a sweep that runs at most once a minute.
    Series folders are hard links into the instance cache, removed when their job ends.
    Folders are made 0700 and files 0600 (patient data), whatever the worker's umask: the
    workers keep a umask that lets services share their own outputs.
    """

    def __init__(self, settings: Settings):
        self.root = settings.effective_cache_dir
        self.instances = self.root / "instances"
        self.jobs = self.root / "jobs"
        for folder in (self.root, self.instances, self.jobs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.base_url = settings.orthanc_url.rstrip("/")
        default = _headers(settings.orthanc_username, settings.orthanc_password)
        #: Orthanc name -> (base URL, request headers with its credentials): the receivers whose
        #: instances this host fetches. An instance's Orthanc id is a hash of its UIDs, the same on
        #: every receiver, so one cached file serves whichever receiver an event names.
        self._default = (self.base_url, default)
        self.servers: dict[str, tuple[str, dict[str, str]]] = {settings.orthanc_name: self._default}
        for name, url in settings.orthanc_urls.items():
            parts = urllib.parse.urlsplit(url)
            headers = _headers(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")) \
                if parts.username else default
            netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
            self.servers[name] = (urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/"), headers)
        self.ttl = settings.cache_ttl
        # urllib3 itself rather than requests: half the CPU per 232 KB file (0.54 against 1.0 ms),
        # on every file a worker fetches (issue 23). Orthanc gzips every answer a client accepts
        # gzip for (HttpCompressionEnabled): 12-14 ms of its CPU per 232 KB file, against 0.6 ms
        # for the file as it is; DICOM pixel data barely compresses, and this is loopback or LAN.
        # Safe across threads (a batch's fetches, the prefetch): a pool of connections per host.
        self.http = urllib3.PoolManager(maxsize=8, retries=False, timeout=TIMEOUT)
        self._last_sweep = 0.0
        #: How long a fetch keeps trying while Orthanc is unavailable (s).
        self.unavailable_for = settings.orthanc_retry_seconds

    def instance(self, orthanc_id: str, server: str | None = None, patiently: bool = True) -> Path:
        """The local file of an Orthanc instance, downloading it if this host has none.

        `server`: the name of the Orthanc that holds it (the event's `orthanc.server`); None:
        the one at ORTHANC_URL. `patiently`: keep trying while Orthanc is unavailable, for up
        to DICOMFLOW_ORTHANC_RETRY_SECONDS (False: one attempt; a fetch ahead must not hold the
        file's lock through an outage while the job that needs it waits).

        Raises:
            OrthancError: `orthanc_id` is no Orthanc id, `server` is not configured, or Orthanc
                has no such instance, refused it or could not be reached; the message names the
                id and what Orthanc said.
        """
        if not isinstance(orthanc_id, str) or not ORTHANC_ID.fullmatch(orthanc_id):
            shown = repr(orthanc_id) if len(repr(orthanc_id)) <= 80 else repr(orthanc_id)[:77] + "..."
            raise OrthancError(f"invalid Orthanc instance id {shown} ({type(orthanc_id).__name__}): an Orthanc "
                               "id is 5 groups of 8 hex digits separated by dashes")
        if server is not None and server not in self.servers:
            raise OrthancError(f"instance {orthanc_id} is on the Orthanc named {server!r}, which this worker does "
                               f"not know: add {server}=http://host:port to ORTHANC_URLS (known: "
                               f"{', '.join(sorted(self.servers))})")
        base_url, headers = self.servers[server] if server is not None else self._default
        path = self.instances / f"{orthanc_id}.dcm"
        if path.exists():
            os.utime(path)
            return path
        with os.fdopen(os.open(self.instances / f"{orthanc_id}.lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists() and patiently:
                self._download_patiently(orthanc_id, path, base_url, headers)
            elif not path.exists():
                self._download(orthanc_id, path, base_url, headers)
        return path

    def has(self, orthanc_id: str) -> bool:
        """Whether this host's cache holds the instance already (a name that is no Orthanc id: False)."""
        return isinstance(orthanc_id, str) and bool(ORTHANC_ID.fullmatch(orthanc_id)) \
            and (self.instances / f"{orthanc_id}.dcm").exists()

    def _download_patiently(self, orthanc_id: str, path: Path, base_url: str, headers: dict[str, str]) -> None:
        """`_download`, tried again with back-off while Orthanc is unavailable (restarting,
        overloaded) for up to DICOMFLOW_ORTHANC_RETRY_SECONDS: a blip of Orthanc must not
        fail jobs for a person to requeue, whatever the service's own retries say."""
        deadline = time.monotonic() + self.unavailable_for
        for attempt in range(1, 1_000_000):
            try:
                self._download(orthanc_id, path, base_url, headers)
                return
            except OrthancUnavailableError as exc:
                pause = BACK_OFF[min(attempt, len(BACK_OFF)) - 1]
                if time.monotonic() + pause > deadline:
                    raise OrthancUnavailableError(f"{exc} (still unavailable after {attempt} attempts)") from exc
                log.warning("Orthanc unavailable (%s); fetching %s again in %.1f s", exc, orthanc_id, pause)
                time.sleep(pause)

    def folder(self, orthanc_ids: Sequence[str], job_id: str, server: str | None = None) -> Path:
        """A folder with every listed instance as `<id>.dcm` (hard links into the cache), from
        the Orthanc named `server` (None: ORTHANC_URL)."""
        if not isinstance(orthanc_ids, (list, tuple)):
            raise OrthancError(f"expected a list of Orthanc instance ids, not {type(orthanc_ids).__name__}")
        folder = self.jobs / f"{job_id}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(mode=0o700, parents=True)
        try:
            for orthanc_id in orthanc_ids:
                source = self.instance(orthanc_id, server)
                target = folder / source.name
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
                    os.chmod(target, 0o600)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def release(self, path: Path) -> None:
        """Remove a job's series folder (instance files stay cached for other jobs)."""
        if path.is_dir() and path.parent == self.jobs:
            shutil.rmtree(path, ignore_errors=True)

    def _download(self, orthanc_id: str, path: Path, base_url: str, headers: dict[str, str]) -> None:
        url = f"{base_url}/instances/{orthanc_id}/file"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        response, read = None, False
        try:
            response = self.http.request("GET", url, headers=headers, preload_content=False, redirect=False)
            if response.status == 404:
                raise OrthancError(f"Orthanc has no instance {orthanc_id} (GET {url} answered 404: "
                                   f"{_said(response)})")
            if response.status != 200:
                error = OrthancUnavailableError if response.status >= 500 else OrthancError
                raise error(f"Orthanc could not give instance {orthanc_id}: GET {url} answered "
                            f"{response.status}: {_said(response)}")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                for chunk in response.stream(1 << 20):
                    out.write(chunk)
            read = True
            os.replace(tmp, path)
        except UNAVAILABLE as exc:
            raise OrthancUnavailableError(f"cannot fetch instance {orthanc_id} from Orthanc at {base_url}: "
                                          f"{exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise OrthancError(f"cannot fetch instance {orthanc_id} from Orthanc at {base_url}: {exc}") from exc
        finally:
            if response is not None:
                _give_back(response, read or response.status != 200)
            tmp.unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> int:
        """Remove cached files unused for `ttl` seconds (at most once a minute); how many went."""
        now = time.time() if now is None else now
        if now - self._last_sweep < SWEEP_EVERY:
            return 0
        self._last_sweep = now
        removed = 0
        for entry in os.scandir(self.instances):
            try:
                if now - entry.stat().st_mtime > self.ttl:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        for entry in os.scandir(self.jobs):
            try:
                if now - entry.stat().st_mtime > max(self.ttl, 86400):
                    shutil.rmtree(entry.path, ignore_errors=True)
            except FileNotFoundError:
                continue
        return removed


def _said(response: urllib3.BaseHTTPResponse) -> str:
    """The start of an error answer, for a message."""
    try:
        text = response.read(512).decode("utf-8", "replace")[:200].strip()
    except urllib3.exceptions.HTTPError as exc:  # the body broke off
        return f"(no readable body: {exc})"
    return text or "(empty body)"


def _give_back(response: urllib3.BaseHTTPResponse, reusable: bool) -> None:
    """Return the response's connection to the pool when its body was read to the end or is an
    error answer's (short: the rest is read first); else (the file's write failed, the answer
    broke off) close it rather than read on."""
    if reusable:
        try:
            response.drain_conn()
        except urllib3.exceptions.HTTPError:
            reusable = False
    if reusable:
        response.release_conn()
    else:
        response.close()


def _headers(username: str = "", password: str = "") -> dict[str, str]:
    """A request's headers: the file as it is, and Orthanc's credentials (Basic) if any."""
    headers = {"Accept-Encoding": "identity"}
    if username:
        headers.update(urllib3.make_headers(basic_auth=f"{username}:{password}"))
    return headers
