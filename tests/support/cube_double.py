"""A test double for CUBE (the ChRIS backend), which cannot run here, faithful to cube.md.

It is a real HTTP server on a free loopback port (werkzeug, threaded, TCP_NODELAY; or, with
`nagle`, served as CUBE 5's Django runserver serves: wsgiref, keep-alive, Nagle on) that
answers the way ../shared/docs/cube.md sections 2 and 4 say real CUBE 5 / CUBE 7 answer:
auth-token/, Basic auth with an artificial password-hash cost, Token auth, 401 without
credentials, only user `chris` may register (403 else), field formats and limits, the
path-prefix rule, files that must exist under the storage root, duplicates (400 with
`path` for pacsfiles, a bare JSON list for series), concurrent duplicates (500), paths
over 512 characters (500), series `ndicom` polling, CUBE 5 mode (pacsfiles/) and CUBE 7
mode (no pacsfiles/, 404). Faults can be injected (the next N answers 503; down =
connection refused) and every request is recorded. e2e tests point CHRIS_URL at `url`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import socket
import socketserver
import threading
import wsgiref.simple_server
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wrappers import Request, Response

from tests.support.procs import free_port

OPTIONAL_LIMITS = {"PatientName": 150, "AccessionNumber": 100, "Modality": 15, "ProtocolName": 64,
                   "StudyDescription": 400, "SeriesDescription": 400}
REQUIRED_LIMITS = {"PatientID": 100, "StudyInstanceUID": 100, "SeriesInstanceUID": 100}


@dataclass
class Recorded:
    """One request as the double saw it."""

    method: str
    path: str
    auth: str  # "basic", "token" or "none"
    user: str | None
    body: Any
    status: int
    at: float
    #: The client's port: requests over one kept-alive connection share it.
    port: str = ""
    #: When the request came in (`at` is when it was answered).
    arrived: float = 0.0


@dataclass
class CubeState:
    """What the double's database holds."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> fields
    series: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (pacs, uid) -> body
    series_paths: dict[str, str] = field(default_factory=dict)  # folder -> SeriesInstanceUID
    in_flight: set[str] = field(default_factory=set)
    #: The most registrations that were being written at one time.
    most_in_flight: int = 0
    inserted: set[str] = field(default_factory=set)  # the unique index


class _NoDelayServer(ThreadedWSGIServer):
    """Threaded WSGI server whose connections send small answers at once (no Nagle delay)."""

    daemon_threads = True

    def get_request(self):  # type: ignore[override]
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


class _RunserverHandler(wsgiref.simple_server.WSGIRequestHandler):
    """What CUBE 5's `manage.py runserver` serves with (Django's handler over wsgiref): HTTP/1.1
    keep-alive, Nagle's algorithm on, an answer written in three sends (status line, headers,
    body). A keep-alive client that delays its ACKs waits ~40 ms for each answer's rest: the
    stall the issue measured against real CUBE (issue 23)."""

    protocol_version = "HTTP/1.1"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        return None

    def get_environ(self) -> dict[str, Any]:
        return {**super().get_environ(), "REMOTE_PORT": str(self.client_address[1])}

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        handler = wsgiref.simple_server.ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ())
        handler.request_handler = self
        handler.http_version = "1.1"
        handler.run(self.server.get_app())


class _RunserverServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _valid_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            dt.datetime.strptime(value, fmt)
            return True
        except ValueError:
            continue
    return False


def _burn(seconds: float) -> None:
    """Use `seconds` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class CubeDouble:
    """The double. `mode`: "cube5" (pacsfiles/ only), "cube7" (pacs/series/ only) or "cube6" (both)."""

    def __init__(self, files_root: Path, mode: str = "cube5", basic_cost: float = 0.11,
                 write_cost: float = 0.005, ndicom_timeout: float = 2.0, ndicom_poll: float = 0.2,
                 users: dict[str, str] | None = None, cpu_cost: float = 0.0, nagle: bool = False):
        self.files_root = Path(files_root)
        #: Serve as CUBE 5's runserver does, Nagle's algorithm on (benchmarks; tests: False).
        self.nagle = nagle
        self.mode = mode
        self.basic_cost = basic_cost
        self.write_cost = write_cost
        #: CPU seconds burnt per registration under one lock, as CUBE 5's single Django process
        #: spends ~16 ms of CPU per registration (issue 23; for benchmarks, 0 in tests).
        self.cpu_cost = cpu_cost
        self._process = threading.Lock()
        self.ndicom_timeout = ndicom_timeout
        self.ndicom_poll = ndicom_poll
        self.users = users or {"chris": "chris1234", "alice": "alice1234"}
        self.tokens: dict[str, str] = {}
        self.state = CubeState()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._faults: list[int] = []
        self._holds: dict[str, threading.Event] = {}
        self.port = free_port()
        self._server: _NoDelayServer | _RunserverServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle and faults ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The /api/v1/ root, as CHRIS_URL."""
        return f"http://127.0.0.1:{self.port}/api/v1/"

    def start(self) -> CubeDouble:
        if self.nagle:
            self._server = _RunserverServer(("127.0.0.1", self.port), _RunserverHandler)
            self._server.set_app(self._wsgi)
        else:
            self._server = _NoDelayServer("127.0.0.1", self.port, self._wsgi, handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self) -> None:
        """Stop listening: clients get "connection refused" until `up()`."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self.start()

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next `count` requests (any endpoint) are answered with `status`."""
        with self._lock:
            self._faults.extend([status] * count)

    def hold(self, text: str) -> threading.Event:
        """Registrations whose path contains `text` are not answered (nor processed) until the
        returned event is set: a CUBE slow on one request, for a test to act meanwhile."""
        gate = self._holds[text] = threading.Event()
        return gate

    def registrations(self, method: str = "POST") -> list[Recorded]:
        """Recorded registration requests (pacsfiles/ and pacs/series/ POSTs)."""
        return [r for r in self.requests if r.method == method
                and r.path.endswith(("/pacsfiles/", "/pacs/series/"))]

    # -- WSGI -------------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        arrived = time.time()
        request = Request(environ)
        body: Any = None
        auth_kind, user = "none", None
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            response = self._json({"detail": "injected fault"}, fault)
        else:
            body = self._parse_body(request)
            path = body.get("path", "") if isinstance(body, dict) else ""
            for text, gate in list(self._holds.items()):
                if text in str(path):
                    gate.wait(60)
            auth_kind, user, denied = self._authenticate(request)
            response = denied or self._route(request, user, body)
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, auth_kind, user, body,
                                          response.status_code, time.time(), str(environ.get("REMOTE_PORT", "")),
                                          arrived))
        return response(environ, start_response)

    @staticmethod
    def _json(data: Any, status: int) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json")

    @staticmethod
    def _parse_body(request: Request) -> Any:
        raw = request.get_data(as_text=True)
        if not raw:
            return dict(request.form) if request.form else None
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict) and "template" in data:  # Collection+JSON
            return {item["name"]: item["value"] for item in data["template"].get("data", [])}
        return data

    def _authenticate(self, request: Request) -> tuple[str, str | None, Response | None]:
        header = request.headers.get("Authorization", "")
        if request.path == "/api/v1/auth-token/":
            return "none", None, None
        if header.startswith("Basic "):
            time.sleep(self.basic_cost)  # Django hashes the password on every request
            try:
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                name, password = "", ""
            if self.users.get(name) != password:
                return "basic", None, self._json({"detail": "Invalid username/password."}, 401)
            return "basic", name, None
        if header.startswith("Token "):
            name = self.tokens.get(header[6:].strip())
            if name is None:
                return "token", None, self._json({"detail": "Invalid token."}, 401)
            return "token", name, None
        return "none", None, self._json({"detail": "Authentication credentials were not provided."}, 401)

    def _route(self, request: Request, user: str | None, body: Any) -> Response:
        path, method = request.path, request.method
        if path == "/api/v1/auth-token/" and method == "POST":
            return self._auth_token(body)
        pacsfiles = self.mode in ("cube5", "cube6")
        series = self.mode in ("cube6", "cube7")
        if path == "/api/v1/pacsfiles/" and pacsfiles:
            if method == "GET":
                return self._json({"count": len(self.state.files), "results": []}, 200)
            return self._forbidden() if user != "chris" else self._register_file(body)
        if path == "/api/v1/pacsfiles/search/" and pacsfiles and method == "GET":
            return self._search_files(request.args)
        if path == "/api/v1/pacs/series/" and series:
            if method == "GET":
                return self._json({"count": len(self.state.series), "results": []}, 200)
            return self._forbidden() if user != "chris" else self._register_series(body)
        return Response("<h1>Not Found</h1>", status=404, content_type="text/html")

    def _forbidden(self) -> Response:
        return self._json({"detail": "You do not have permission to perform this action."}, 403)

    def _auth_token(self, body: Any) -> Response:
        body = body if isinstance(body, dict) else {}
        name, password = body.get("username"), body.get("password")
        time.sleep(self.basic_cost)
        if not name or self.users.get(name) != password:
            return self._json({"non_field_errors": ["Unable to log in with provided credentials."]}, 400)
        token = next((t for t, n in self.tokens.items() if n == name), None) or secrets.token_hex(20)
        self.tokens[token] = name
        return self._json({"token": token}, 200)

    # -- validation (cube.md section 2 and 4) -----------------------------------------------

    def _validate_fields(self, body: dict[str, Any], errors: dict[str, list[str]]) -> None:
        required = ["pacs_name", "path", "PatientID", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID"]
        for name in required:
            value = body.get(name)
            if value is None:
                errors.setdefault(name, []).append("This field is required.")
            elif value == "":
                errors.setdefault(name, []).append("This field may not be blank.")
        pacs = body.get("pacs_name")
        if isinstance(pacs, str) and (len(pacs) > 20 or "/" in pacs or "," in pacs):
            errors.setdefault("pacs_name", []).append("Invalid PACS name.")
        for name, limit in REQUIRED_LIMITS.items():
            if isinstance(body.get(name), str) and len(body[name]) > limit:
                errors.setdefault(name, []).append(f"Ensure this field has no more than {limit} characters.")
        for name, limit in OPTIONAL_LIMITS.items():
            if name in body:
                if body[name] is None:
                    errors.setdefault(name, []).append("This field may not be null.")
                elif len(str(body[name])) > limit:
                    errors.setdefault(name, []).append(
                        f"Ensure this field has no more than {limit} characters.")
        if body.get("StudyDate") not in (None, "") and not _valid_date(body.get("StudyDate")):
            errors.setdefault("StudyDate", []).append("Date has wrong format. Use YYYY-MM-DD.")
        if "PatientBirthDate" in body and body["PatientBirthDate"] is not None \
                and not _valid_date(body["PatientBirthDate"]):
            errors.setdefault("PatientBirthDate", []).append("Date has wrong format. Use YYYY-MM-DD.")
        if "PatientSex" in body:
            if body["PatientSex"] is None:
                errors.setdefault("PatientSex", []).append("This field may not be null.")
            elif body["PatientSex"] not in ("M", "F", "O", ""):
                errors.setdefault("PatientSex", []).append(f'"{body["PatientSex"]}" is not a valid choice.')
        if "PatientAge" in body and body["PatientAge"] is not None:
            age = body["PatientAge"]
            if isinstance(age, bool) or not (isinstance(age, int) or (isinstance(age, str) and age.isdigit())):
                errors.setdefault("PatientAge", []).append("A valid integer is required.")

    def _prefix_ok(self, body: dict[str, Any]) -> bool:
        return str(body["path"]).startswith(f"SERVICES/PACS/{body['pacs_name']}/")

    def _register_file(self, body: Any) -> Response:
        if not isinstance(body, dict):
            return self._json({"non_field_errors": ["Invalid data."]}, 400)
        errors: dict[str, list[str]] = {}
        self._validate_fields(body, errors)
        path = body.get("path")
        if isinstance(path, str) and path:
            if path in self.state.files:
                errors.setdefault("path", []).append("File has already been registered.")
            elif not (self.files_root / path).is_file():
                errors.setdefault("path", []).append(f"Could not find this path: {path}.")
        if errors:
            return self._json(errors, 400)
        if not self._prefix_ok(body):
            return self._json({"non_field_errors": [
                f"File path must start with 'SERVICES/PACS/{body['pacs_name']}/'."]}, 400)
        if len(path) > 512:
            return self._json({"detail": "value too long for type character varying(512)"}, 500)
        return self._insert(f"file:{path}", lambda: self.state.files.__setitem__(path, dict(body)), body)

    def _insert(self, key: str, write: Any, body: dict[str, Any]) -> Response:
        """The database write; a concurrent insert of the same key fails like a unique index (500)."""
        with self._lock:
            if key in self.state.in_flight or key in self.state.inserted:
                return self._json({"detail": "duplicate key value violates unique constraint"}, 500)
            self.state.in_flight.add(key)
            self.state.most_in_flight = max(self.state.most_in_flight, len(self.state.in_flight))
        try:
            time.sleep(self.write_cost)
            if self.cpu_cost:
                with self._process:
                    _burn(self.cpu_cost)
            with self._lock:
                write()
                self.state.inserted.add(key)
        finally:
            with self._lock:
                self.state.in_flight.discard(key)
        return self._json({**body, "id": len(self.state.files) + len(self.state.series)}, 201)

    def _register_series(self, body: Any) -> Response:
        if not isinstance(body, dict):
            return self._json({"non_field_errors": ["Invalid data."]}, 400)
        errors: dict[str, list[str]] = {}
        self._validate_fields(body, errors)
        ndicom = body.get("ndicom")
        if isinstance(ndicom, bool) or not isinstance(ndicom, int) or ndicom < 1:
            errors.setdefault("ndicom", []).append("A valid integer is required.")
        path = body.get("path")
        if isinstance(path, str) and "," in path:
            errors.setdefault("path", []).append("Invalid path: commas are not allowed.")
        if errors:
            return self._json(errors, 400)
        key = (body["pacs_name"], body["SeriesInstanceUID"])
        if key in self.state.series:
            message = f"A DICOM series with SeriesInstanceUID={key[1]} already registered for pacs {key[0]}"
            return self._json([message], 400)
        if not self._prefix_ok(body):
            return self._json({"non_field_errors": ["Invalid path for this PACS."]}, 400)
        folder = self.files_root / path
        deadline = time.monotonic() + self.ndicom_timeout
        while True:  # CUBE polls its storage until the .dcm count matches ndicom
            count = sum(1 for _ in folder.rglob("*.dcm")) if folder.is_dir() else 0
            if count == ndicom:
                break
            if count > ndicom or time.monotonic() >= deadline:
                return self._json({"ndicom": [f"Expected {ndicom} DICOM files, found {count}."]}, 400)
            time.sleep(self.ndicom_poll)
        if path in self.state.series_paths and self.state.series_paths[path] != body["SeriesInstanceUID"]:
            return self._json({"detail": "duplicate key value violates unique constraint"}, 500)

        def write() -> None:
            self.state.series[key] = dict(body)
            self.state.series_paths[path] = body["SeriesInstanceUID"]
            for file in folder.rglob("*"):
                if file.is_file():  # CUBE registers every file under the folder
                    name = str(file.relative_to(self.files_root)).replace(",", "")
                    self.state.files[name] = {**body, "path": name}
        return self._insert(f"series:{key}", write, body)

    def _search_files(self, args: Any) -> Response:
        results = []
        for path, record in list(self.state.files.items()):
            match = True
            for name, value in args.items():
                if name in ("limit", "offset"):
                    continue
                if name == "pacs_identifier":
                    if record.get("pacs_name") != value:
                        match = False
                elif str(record.get(name)) != value:
                    match = False
            if match:
                results.append({**record, "fname": path})
        return self._json({"count": len(results), "results": results}, 200)
