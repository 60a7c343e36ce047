"""A real Orthanc for tests and benchmarks: start/stop, send with dcmtk's storescu, REST, an event sink.

`OrthancServer` runs `/usr/sbin/Orthanc` on free ports in a folder of its own, with the
dicomflow plugin (or none, or another script), configured by
`dicomflow.orthanc_config.render_orthanc_config`. `EventSink` is a minimal, real HTTP
peer for the plugin's delivery contract (`POST /api/v1/events`, bearer token, answers
200/401/503) that records every batch; tests use it where the scheduler is not needed.
`write_series` generates synthetic DICOM series with pydicom.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from dicomflow.orthanc_config import OrthancSettings, render_orthanc_config, write_config
from tests.support.procs import free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"
#: dcmtk's storescu (the virtualenv has pynetdicom's storescu of the same name on PATH).
STORESCU = shutil.which("storescu", path="/usr/bin:/usr/local/bin:/bin") or "/usr/bin/storescu"
#: Both dcmtk peers disable Nagle only with this in their environment (50x otherwise).
NODELAY_ENV = {"TCP_NODELAY": "1"}


class OrthancServer:
    """One Orthanc process with its own storage, ports and configuration.

    Args:
        folder: where storage, configuration, spool and log go (kept across restarts).
        plugin: True = the dicomflow plugin, False = no Python plugin, a path = that script.
        scheduler_url: where the plugin delivers (an `EventSink.url` or the scheduler).
        token: the bearer token the plugin sends.
        stable_age: Orthanc's StableAge (seconds).
        plugin_options: extra keys merged into the "Dicomflow" section (e.g. RetryMaxDelay).
        extra: extra top-level Orthanc options.
        db_url: Orthanc's index in this PostgreSQL database (`ORTHANC_DB_URL`); by default a
            throwaway database when TEST_ORTHANC_INDEX=postgresql (tests/support/orthanc_index.py),
            else SQLite in the folder.
    """

    def __init__(self, folder: Path, *, plugin: bool | str | os.PathLike = True,
                 scheduler_url: str = "http://127.0.0.1:9", token: str = "test-token",
                 stable_age: int = 60, aet: str = "DICOMFLOW",
                 plugin_options: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 db_url: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = aet
        self.username = "dicomflow"
        self.password = "test-" + os.urandom(8).hex()
        self.settings = OrthancSettings(
            home=self.folder, http_port=self.http_port, dicom_port=self.dicom_port, aet=aet,
            username=self.username, password=self.password, stable_age=stable_age,
            db_url=db_url if db_url is not None else _test_index_url(),
        )
        config = render_orthanc_config(self.settings, scheduler_url=scheduler_url, token=token,
                                       spool_path=self.folder / "spool.sqlite", plugin=plugin)
        if "Dicomflow" in config:
            config["Dicomflow"].update(plugin_options or {})
        config.update(extra or {})
        self.config = config
        self.config_path = write_config(config, self.folder / "orthanc.json")
        self.settings.effective_storage_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        #: Every PID this object started (to check none outlives a test).
        self.pids: set[int] = set()
        self.session = requests.Session()
        self.session.auth = (self.username, self.password)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def spool_path(self) -> Path:
        return Path(self.config["Dicomflow"]["SpoolPath"])

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Start Orthanc and wait until `/system` answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this Orthanc is already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, **NODELAY_ENV},
                                         cwd=self.folder)
        self.pids.add(self.proc.pid)
        wait_for(self._answers, timeout=timeout, what=f"Orthanc on port {self.http_port} (log {self.log_path})")
        return self

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited early; its log:\n{self.log_tail()}")
        try:
            return self.session.get(self.url + "/system", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self, timeout: float = 20.0) -> int | None:
        """Graceful stop (SIGTERM, ~3.5 s); SIGKILL if it does not exit in `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code, self.proc = self.proc.returncode, None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would (no shutdown code runs)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Orthanc's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # ---- REST ---------------------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET a REST path (authenticated) and decode its JSON."""
        answer = self.session.get(self.url + path, timeout=30, **kwargs)
        answer.raise_for_status()
        return answer.json()

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        """POST to a REST path (authenticated); bytes are sent as-is, anything else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {})
        answer = self.session.post(self.url + path, data=data, timeout=30, **kwargs)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def status(self) -> dict[str, Any]:
        """The plugin's counters (`/dicomflow/status`)."""
        return self.get("/dicomflow/status")

    # ---- DICOM --------------------------------------------------------------------------

    def store(self, paths: Iterable[str | os.PathLike], *, aet: str = "STORESCU", pattern: str | None = None,
              timeout: float = 600.0) -> subprocess.CompletedProcess:
        """Send files and/or folders with dcmtk's storescu over one association (Nagle off).

        `pattern` restricts the files taken from folders (e.g. "*.dcm" beside a README).

        Raises:
            RuntimeError: storescu failed (with its output).
        """
        items = [str(p) for p in paths]
        command = [STORESCU, "-aet", aet, "-aec", self.aet, "--scan-directories", "--recurse",
                   *(["--scan-pattern", pattern] if pattern else []), "127.0.0.1", str(self.dicom_port), *items]
        done = subprocess.run(command, env={**os.environ, **NODELAY_ENV}, timeout=timeout, check=False,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-500:]}")
        return done


def _test_index_url() -> str:
    """A throwaway PostgreSQL database when TEST_ORTHANC_INDEX=postgresql, else "" (SQLite)."""
    from tests.support.orthanc_index import create_database, wanted_index

    return create_database() if wanted_index() == "postgresql" else ""


# ---- the event sink --------------------------------------------------------------------------


@dataclass
class Batch:
    """One POST the sink received."""

    arrived: float
    authorization: str
    status: int
    events: list[dict[str, Any]]


@dataclass
class EventSink:
    """A real HTTP server standing in for the scheduler's intake (`POST /api/v1/events`).

    `status` is what it answers (200, or 503/500 to simulate an outage); a request with a
    token other than `token` gets 401, as the scheduler does. Only batches answered 200
    count as `delivered`.
    """

    token: str = "test-token"
    status: int = 200
    #: Seconds the sink takes before it answers (a slow scheduler); the batch counts only once answered.
    delay: float = 0.0
    port: int = field(default_factory=free_port)
    batches: list[Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EventSink:
        """Listen on `port` (the same one across restarts)."""
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the plugin expects
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with sink._lock:
                    sink._sockets.add(self.connection)

            def finish(self) -> None:
                with sink._lock:
                    sink._sockets.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived = time.time()
                if sink.delay:
                    time.sleep(sink.delay)
                auth = self.headers.get("Authorization", "")
                status = sink.status if auth == f"Bearer {sink.token}" else 401
                if self.path != "/api/v1/events":
                    status = 404
                events: list[dict[str, Any]] = []
                try:
                    events = json.loads(body)["events"]
                except (ValueError, KeyError, TypeError):
                    status = 400
                with sink._lock:
                    sink.batches.append(Batch(arrived, auth, status, events))
                payload = json.dumps({"results": [{"ok": True}] * len(events)} if status == 200
                                     else {"error": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="event-sink", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open keep-alive connection (the plugin sees the outage)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None

    def delivered(self) -> list[dict[str, Any]]:
        """Every event of the batches answered 200, in arrival order."""
        with self._lock:
            return [event for batch in self.batches if batch.status == 200 for event in batch.events]

    def delivered_batches(self) -> list[Batch]:
        with self._lock:
            return [batch for batch in self.batches if batch.status == 200]

    def wait_for_events(self, count: int, timeout: float = 30.0, level: str | None = None
                        ) -> list[dict[str, Any]]:
        """Wait until at least `count` events (of `level`, if given) were delivered; return them."""
        def enough() -> list[dict[str, Any]] | None:
            events = [e for e in self.delivered() if level is None or e.get("level") == level]
            return events if len(events) >= count else None

        return wait_for(enough, timeout=timeout, what=f"{count} {level or ''} events at the sink")


# ---- synthetic DICOM ---------------------------------------------------------------------------


def write_series(folder: Path, count: int, *, rows: int = 64, columns: int = 64,
                 patient_id: str = "DFTEST", modality: str = "CT", study_uid: str | None = None,
                 series_uid: str | None = None, start: int = 1) -> list[Path]:
    """Write `count` instances of one synthetic series (16-bit, Explicit VR Little Endian).

    Returns the files in instance order. UIDs are fresh unless given (pass the same
    `series_uid` to add late instances to a series).
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    pixels = (np.arange(rows * columns, dtype=np.uint16) % 4096).reshape(rows, columns).tobytes()
    files = []
    for number in range(start, start + count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = "Test^Dicomflow"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientAge = "055Y"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyDate = ds.SeriesDate = "20240102"
        ds.StudyTime = "101010"
        ds.StudyDescription = "dicomflow synthetic"
        ds.AccessionNumber = "ACC" + patient_id[-8:]
        ds.StudyID = "1"
        ds.SeriesDescription = f"synthetic {rows}x{columns}"
        ds.ProtocolName = "SYNTH"
        ds.BodyPartExamined = "HEAD"
        ds.Modality = modality
        ds.SeriesNumber = 7
        ds.InstanceNumber = number
        ds.NumberOfSeriesRelatedInstances = count
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def orthanc_pids() -> set[int]:
    """PIDs of every running Orthanc process (other people's included)."""
    found = subprocess.run(["pgrep", "-x", "Orthanc"], check=False, capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()}


def leftovers(servers: Sequence[OrthancServer]) -> set[int]:
    """PIDs started by these servers that still run as Orthanc (should be empty after a test)."""
    started = set().union(*(server.pids for server in servers)) if servers else set()
    return started & orthanc_pids()


def stop_all(servers: Sequence[OrthancServer]) -> None:
    """Stop each server, killing it if the graceful stop fails."""
    for server in servers:
        try:
            server.stop()
        finally:
            server.kill()
