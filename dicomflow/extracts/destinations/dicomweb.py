"""STOW-RS uploads of a de-identified study to a DICOMweb server, in bounded batches, with dicomweb-client.

Each batch is one request (to ``/studies/{StudyInstanceUID}``) of several instances (at most
the endpoint's `maxBatchInstances` and `maxBatchMb`; one larger instance goes alone), after
taking one rate-limit token per instance. The server's answer is read instance by instance:
what its Referenced SOP Sequence lists is confirmed, what its Failed SOP Sequence lists fails
with the server's reason, what it lists in neither is not confirmed (fails); then, unless the endpoint says `verify:
false`, a QIDO-RS search of the study keeps as sent only what the server holds. A client error
(4xx) that names no instance sends the batch's instances one by one, so the one at fault is
named and the rest arrive. Unreachable servers and 5xx / 429 answers are tried `attempts`
times with back-off.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
import requests.adapters
from dicomweb_client.api import DICOMwebClient

from dicomflow.extracts.destinations.errors import (
    DestinationAuthError,
    DestinationConfigError,
    DestinationUnavailableError,
)
from dicomflow.extracts.destinations.secrets import Credentials
from dicomflow.extracts.destinations.settings import DestinationSettings
from dicomflow.extracts.project import Endpoint

log = logging.getLogger(__name__)

#: DICOM tags of a STOW-RS response (PS3.18 Table 10.5.3-1).
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
#: SOPInstanceUID in a QIDO-RS result.
REFERENCED_SOP_INSTANCE_UID_QIDO = "00080018"
#: What the common Failure Reason codes mean (PS3.4 Annex GG.4, C-STORE statuses).
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class", 0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
#: Answers worth another attempt: the server is busy or broken for now.
TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class _Answer:
    """One STOW-RS answer: HTTP status, and per SOPInstanceUID what the server said."""

    status: int
    confirmed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class _Item:
    name: str
    path: Path
    uid: str
    size: int


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """Verifies every HTTPS request against the destination's CA file. (A session's `verify`
    loses to REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment; the adapter's does not.)"""

    def __init__(self, ca_file: str):
        super().__init__()
        self._ca_file = ca_file

    def send(self, request, **kwargs):
        kwargs["verify"] = self._ca_file
        return super().send(request, **kwargs)


def _session(credentials: Credentials) -> requests.Session:
    session = requests.Session()
    if credentials.ca_file:
        session.mount("https://", _TrustAdapter(str(credentials.ca_file)))
    if credentials.username:
        session.auth = (credentials.username, credentials.password)
    if credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    return session


def _parse(response: requests.Response) -> _Answer:
    """The server's answer, per instance where its body (DICOM JSON) says (whatever its Content-Type)."""
    answer = _Answer(response.status_code)
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        answer.message = response.text[:300].strip() if response.content else response.reason or ""
        return answer
    for item in (body.get(REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [None])[0]
        if uid:
            answer.confirmed.add(str(uid))
    for item in (body.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [None])[0]
        code = ((item.get(FAILURE_REASON) or {}).get("Value") or [None])[0]
        if uid:
            meaning = FAILURE_REASONS.get(int(code), "") if isinstance(code, int) else ""
            reason = f"HTTP {response.status_code}: FailureReason {_hex(code)}" + (f" ({meaning})" if meaning else "")
            answer.failed[str(uid)] = reason
    return answer


def _hex(code: object) -> str:
    return f"0x{code:04X}" if isinstance(code, int) else str(code)


class StowSender:
    """Sends one study's files to one DICOMweb destination (a fresh client per send)."""

    def __init__(self, name: str, endpoint: Endpoint, credentials: Credentials, settings: DestinationSettings,
                 take_tokens: Callable[[int], None]):
        self.name = name
        self.endpoint = endpoint
        self.settings = settings
        self.take_tokens = take_tokens
        self.max_bytes = int(endpoint.max_batch_mb * 2**20)
        self._responses: list[requests.Response] = []
        #: File names the server confirmed, and name -> reason for those it did not.
        self.sent: list[str] = []
        self.failed: dict[str, str] = {}
        self.study_uid: str | None = None
        self._items: list[_Item] = []
        # dicomweb-client's own retries are off: ours also cover refused connections, and count
        # toward DICOMFLOW_EXPORT_ATTEMPTS. The hook keeps every answer, whatever its status,
        # since the client raises on 4xx before it returns the body.
        self.client = DICOMwebClient(credentials.url, session=_session(credentials), timeout=settings.timeout,
                                     callback=self._keep, chunk_size=self.max_bytes * 2 + 2**20)
        self.client.set_http_retry_params(retry=False)

    def _keep(self, response: requests.Response, *args, **kwargs) -> requests.Response:
        self._responses.append(response)
        return response

    def send(self, root: Path, files: list[Path]) -> None:
        """Send `files` (under `root`); `sent` and `failed` say how each went, also after a raise.

        Raises:
            DestinationAuthError: the server refused the credentials.
            DestinationUnavailableError: it stayed unreachable (or 5xx) through every attempt.
            DestinationBusyError: no rate-limit token within the bounded wait.
        """
        items: list[_Item] = []
        studies: Counter[str] = Counter()
        for path in files:
            name = path.relative_to(root).as_posix()
            try:
                head = pydicom.dcmread(path, stop_before_pixels=True,
                                       specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
                uid = str(head.SOPInstanceUID)
                studies[str(head.get("StudyInstanceUID", ""))] += 1
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
                self.failed[name] = f"not sent: cannot read it as DICOM ({exc})"
                continue
            items.append(_Item(name, path, uid, path.stat().st_size))
        self._items = items
        # Posted to /studies/{uid}: the server refuses (and names) an instance of another study.
        self.study_uid = studies.most_common(1)[0][0] if studies else None
        for batch in self._batches(items):
            self._send_batch(batch)
        if self.endpoint.verify and self.sent and self.study_uid:
            self._verify()

    def _verify(self) -> None:
        """Keep as sent only the instances a QIDO-RS search of the study finds on the server."""
        by_uid = {item.uid: item.name for item in self._items if item.name in set(self.sent)}
        try:
            found = self.client.search_for_instances(study_instance_uid=self.study_uid, fields=["SOPInstanceUID"],
                                                     get_remaining=True)
        except (requests.HTTPError, requests.ConnectionError, requests.Timeout) as exc:
            reason = (f"sent, but the check of what arrived (QIDO-RS) failed: {type(exc).__name__}: {exc} "
                      "(a server without QIDO-RS: set verify: false)")
            self.failed.update({name: reason for name in by_uid.values()})
            self.sent = [name for name in self.sent if name not in set(by_uid.values())]
            return
        present = {str(((row.get(REFERENCED_SOP_INSTANCE_UID_QIDO) or {}).get("Value") or [""])[0]) for row in found}
        for uid, name in by_uid.items():
            if uid not in present:
                self.sent.remove(name)
                self.failed[name] = ("the server confirmed it (STOW-RS) but does not hold it (QIDO-RS): "
                                     "dropped by a filter of the server?")

    def _batches(self, items: list[_Item]):
        batch: list[_Item] = []
        size = 0
        for item in items:
            if batch and (len(batch) >= self.endpoint.max_batch_instances or size + item.size > self.max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += item.size
        if batch:
            yield batch

    def _send_batch(self, batch: list[_Item]) -> None:
        self.take_tokens(len(batch))
        answer = self._post(batch)
        unknown = []
        for item in batch:
            if item.uid in answer.failed:
                self.failed[item.name] = answer.failed[item.uid]
            elif item.uid in answer.confirmed:
                self.sent.append(item.name)
            else:
                unknown.append(item)
        if not unknown:
            return
        if len(batch) > 1 and answer.status >= 400:
            # a refusal that names nobody (400, 413...): one by one, so the one at fault is named
            for item in unknown:
                self._send_single(item)
            return
        for item in unknown:
            self.failed[item.name] = (f"HTTP {answer.status}: {answer.message or 'the server did not confirm it'}"
                                 if answer.status >= 400 else
                                 f"HTTP {answer.status}: the server's answer does not confirm it")

    def _send_single(self, item: _Item) -> None:
        # its token was taken with its batch; a resend of one costs none more
        answer = self._post([item])
        if item.uid in answer.failed:
            self.failed[item.name] = answer.failed[item.uid]
        elif item.uid in answer.confirmed:
            self.sent.append(item.name)
        else:
            self.failed[item.name] = f"HTTP {answer.status}: {answer.message or 'the server did not confirm it'}"

    def _post(self, batch: list[_Item]) -> _Answer:
        """One STOW-RS request, tried `attempts` times while the server is unreachable or 5xx."""
        last = ""
        for attempt in range(self.settings.attempts):
            if attempt:
                time.sleep(self.settings.backoff(attempt - 1))
            self._responses.clear()
            try:
                # read per request, not up front: a batch's pixel data is in memory, never a study's
                self.client.store_instances([pydicom.dcmread(item.path) for item in batch],
                                            study_instance_uid=self.study_uid or None)
            except requests.HTTPError:
                pass  # the hook kept the answer; read below
            except requests.exceptions.SSLError as exc:
                raise DestinationConfigError(self.name, f"TLS with the server failed ({exc}); if its certificate "
                                                        "is not trusted, give its CA as the destination's caFile"
                                             ) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("destination %s: attempt %d of %d failed: %s", self.name, attempt + 1,
                            self.settings.attempts, last)
                continue
            if not self._responses:
                raise DestinationUnavailableError(self.name, "no HTTP answer to the STOW-RS request")
            response = self._responses[-1]
            if response.status_code in (401, 403, 407):
                raise DestinationAuthError(self.name, f"HTTP {response.status_code}: the server refused the "
                                                      "credentials (check the destination's secrets)")
            if response.status_code in TRANSIENT:
                last = f"HTTP {response.status_code}: {response.text[:200].strip()}"
                log.warning("destination %s: attempt %d of %d failed: %s", self.name, attempt + 1,
                            self.settings.attempts, last)
                continue
            return _parse(response)
        raise DestinationUnavailableError(self.name, f"STOW-RS failed {self.settings.attempts} times; last: {last}")
