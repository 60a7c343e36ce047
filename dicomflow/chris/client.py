"""The HTTP client of CUBE: token auth, rate limit, retries with back-off, one registration at a time."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import redis
import requests
from redis.lock import Lock

from dicomflow import httpsession
from dicomflow.chris.errors import (
    ChrisRequestError,
    ChrisUnavailableError,
    PathTooLongError,
    RegistrationBusyError,
)
from dicomflow.chris.ratelimit import limiter
from dicomflow.chris.settings import ChrisSettings, Registration
from dicomflow.keys import service_key

log = logging.getLogger(__name__)

#: HTTP answers worth another attempt (oxidicom's list); network errors are retried too.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 507})
PACSFILES = "pacsfiles/"
SERIES = "pacs/series/"
#: How long a detected registration API is trusted before CUBE is asked again (seconds).
API_CACHE_TTL = 300
#: CUBE 5 stores a file's path in a 512-character column; a longer one makes it answer 500.
MAX_PATH = 512
_KEYS = service_key("chris")
#: Hash `<files|series>:<created|already|refused|unavailable>` -> registrations sent to CUBE.
COUNTERS_KEY = _KEYS + "registrations"


@dataclass(frozen=True)
class Registered:
    """The outcome of one registration: created now, or CUBE already had it."""

    created: bool
    status: int
    body: Any

    @property
    def already(self) -> bool:
        """True when CUBE answered that this was registered before (a success)."""
        return not self.created


def _messages(body: Any) -> list[str]:
    """Every string in a JSON error body (dicts of lists, bare lists, strings)."""
    if isinstance(body, str):
        return [body]
    if isinstance(body, dict):
        return [m for value in body.values() for m in _messages(value)]
    if isinstance(body, list):
        return [m for value in body for m in _messages(value)]
    return []


def is_already_registered(status: int, body: Any) -> bool:
    """CUBE's "already registered" answers: 400 with `path` (pacsfiles) or a bare list (series)."""
    return status == 400 and any("already" in m.lower() and "registered" in m.lower()
                                 for m in _messages(body))


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


class ChrisClient:
    """One client per job: a requests.Session on CUBE's API root, sharing token and rate via Redis.

    Safe to use from several threads at once (a batch's registrations in flight): the session's
    pool gives each its own connection."""

    def __init__(self, settings: ChrisSettings, connection: redis.Redis,
                 session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self._connection = connection
        #: A session given by the caller is the caller's to close (one kept across jobs).
        self._own_session = session is None
        self._session = session or httpsession.session()
        self._session.headers["Accept"] = "application/json"
        self._sleep = sleep
        self._limiter = limiter(connection, settings.rate_limit, settings.rate_burst)
        ident = hashlib.sha256(f"{settings.url}|{settings.username}".encode()).hexdigest()[:16]
        self._token_key = f"{_KEYS}token:{ident}"
        self._api_key = f"{_KEYS}api:{hashlib.sha256(settings.url.encode()).hexdigest()[:16]}"
        self._token: str | None = settings.token or None
        self._token_lock = threading.Lock()
        #: The API detected, kept for this client's life (a job): one Redis read, not one per file.
        self._mode: Registration | None = None

    def close(self) -> None:
        """Close the HTTP connections (unless the session was given: its owner closes it)."""
        if self._own_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): min(base*2^n, cap)."""
        return min(self.settings.retry_base * 2 ** attempt, self.settings.retry_cap)

    def _send(self, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> requests.Response:
        """Send with rate limit and retries; returns the first answer that is not worth retrying.

        Raises:
            ChrisUnavailableError: every attempt failed with a network error or a retryable status.
        """
        attempts = self.settings.http_retries
        last = ""
        for attempt in range(1, attempts + 1):
            self._limiter.acquire()
            try:
                response = self._session.request(method, url, headers=headers,
                                                 timeout=self.settings.http_timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                last = f"HTTP {response.status_code}: {_body(response)}"
            if attempt < attempts:
                pause = self.backoff(attempt)
                log.warning("CUBE %s %s attempt %d/%d failed (%s); retrying in %.1fs",
                            method, url, attempt, attempts, last, pause)
                self._sleep(pause)
        raise ChrisUnavailableError(method, url, attempts, last)

    def _auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token()}"}

    def token(self) -> str:
        """The API token: CHRIS_TOKEN, else one shared through Redis, else a new one from auth-token/.

        Raises:
            ChrisRequestError: CUBE refused the credentials.
            ChrisUnavailableError: CUBE did not answer.
        """
        if self._token:
            return self._token
        with self._token_lock:   # registrations in flight at once: one of them asks CUBE
            return self._token or self._new_token()

    def _new_token(self) -> str:
        cached = self._connection.get(self._token_key)
        if cached:
            self._token = cached.decode()
            return self._token
        url = self.settings.url + "auth-token/"
        response = self._send("POST", url, {}, json={"username": self.settings.username,
                                                     "password": self.settings.password})
        if response.status_code != 200:
            raise ChrisRequestError("POST", url, response.status_code, _body(response))
        self._token = str(response.json()["token"])
        # Shared so that other workers do not pay CUBE's password hash again (cube.md section 4).
        self._connection.set(self._token_key, self._token, ex=86400)
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An authenticated request to `CHRIS_URL + path`; one fresh token on a 401 of a cached one."""
        url = self.settings.url + path
        response = self._send(method, url, self._auth_header(), **kwargs)
        if response.status_code == 401 and not self.settings.token:
            self._connection.delete(self._token_key)
            self._token = None
            response = self._send(method, url, self._auth_header(), **kwargs)
        return response

    # -- API detection ----------------------------------------------------------------------

    def detect_registration(self) -> Registration:
        """The API this CUBE offers: `series` (CUBE 6+, preferred), else `pacsfiles` (CUBE 5).

        Raises:
            ChrisRequestError: CUBE offers neither (or refuses the credentials).
        """
        if self.settings.registration is not Registration.AUTO:
            return self.settings.registration
        if self._mode is not None:
            return self._mode
        cached = self._connection.get(self._api_key)
        if cached:
            self._mode = Registration(cached.decode())
            return self._mode
        found = None
        for path, kind in ((SERIES, Registration.SERIES), (PACSFILES, Registration.PACSFILES)):
            response = self.request("GET", path, params={"limit": 1})
            if response.status_code == 200:
                found = kind
                break
            if response.status_code != 404:
                raise ChrisRequestError("GET", self.settings.url + path, response.status_code,
                                        _body(response))
        if found is None:
            raise ChrisRequestError("GET", self.settings.url + PACSFILES, 404,
                                    "CUBE offers neither pacs/series/ nor pacsfiles/")
        self._connection.set(self._api_key, found.value, ex=API_CACHE_TTL)
        self._mode = found
        return found

    # -- registration -----------------------------------------------------------------------

    def _lock_ttl(self) -> float:
        s = self.settings
        return s.http_retries * (s.http_timeout + s.retry_cap) + 10

    def _register(self, path: str, body: dict[str, Any], key: str) -> Registered:
        """POST a registration while holding its Redis lock (CUBE answers 500 to concurrent duplicates)."""
        lock_name = f"{_KEYS}lock:{hashlib.sha1(key.encode()).hexdigest()}"
        ttl = self._lock_ttl()
        lock = self._connection.lock(lock_name, timeout=ttl, blocking_timeout=ttl, sleep=0.02)
        token = uuid.uuid4().hex
        if not lock.acquire(token=token):
            raise RegistrationBusyError(f"registration {key} is locked by another worker for over {ttl:.0f}s")
        kind = "files" if path == PACSFILES else "series"
        try:
            response = self.request("POST", path, json=body)
        except ChrisUnavailableError:
            self._release(lock, token, f"{kind}:unavailable")
            raise
        except BaseException:
            self._release(lock, token, None)
            raise
        status, answer = response.status_code, _body(response)
        outcome = "created" if status == 201 else "already" if is_already_registered(status, answer) else "refused"
        self._release(lock, token, f"{kind}:{outcome}")
        if outcome == "created":
            return Registered(True, status, answer)
        if outcome == "already":
            return Registered(False, status, answer)
        raise ChrisRequestError("POST", self.settings.url + path, status, answer)

    def _release(self, lock: Lock, token: str, counter: str | None) -> None:
        """Release the lock and count the outcome (`COUNTERS_KEY`, for /metrics) in one round trip:
        a registration in flight beside the job's other work pays every round trip twice, once
        in the GIL it hands back and forth (issue 23)."""
        pipe = self._connection.pipeline(transaction=False)
        lock.lua_release(keys=[lock.name], args=[token], client=pipe)
        if counter is not None:
            pipe.hincrby(COUNTERS_KEY, counter, 1)
        if not pipe.execute()[0]:
            # Held past its TTL (longer than every attempt's timeout together): another worker
            # may have registered the same path meanwhile, which CUBE answers "already".
            log.warning("the lock %s expired before the registration was answered", lock.name)

    def register_file(self, fields: dict[str, Any]) -> Registered:
        """Register one stored file (CUBE 5 pacsfiles API); `fields` include `path`.

        Raises:
            ChrisRequestError: CUBE refused it (validation, auth); the body names the field.
            ChrisUnavailableError: no answer after CHRIS_HTTP_RETRIES attempts.
            PathTooLongError: the path is longer than CUBE can store (not sent).
        """
        if len(fields["path"]) > MAX_PATH:
            raise PathTooLongError(f"path has {len(fields['path'])} characters, CUBE stores at most "
                                   f"{MAX_PATH}: {fields['path'][:80]}...")
        return self._register(PACSFILES, fields, f"file:{fields['path']}")

    def register_series(self, fields: dict[str, Any]) -> Registered:
        """Register one series folder (CUBE 6+ series API); `fields` include `path` and `ndicom`.

        Raises:
            ChrisRequestError: CUBE refused it (validation, auth, ndicom mismatch).
            ChrisUnavailableError: no answer after CHRIS_HTTP_RETRIES attempts.
        """
        key = f"series:{fields['pacs_name']}:{fields['SeriesInstanceUID']}"
        return self._register(SERIES, fields, key)
