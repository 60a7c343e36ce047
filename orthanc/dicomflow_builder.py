"""The builder process: turns captured instances into events outside Orthanc's interpreter.

Reading the tags, computing Orthanc's ids and writing the JSON of each event is the
plugin's main per-instance work. Done by a thread in Orthanc's embedded Python, it holds
the GIL that Orthanc's ingest threads need to enter the on-stored callback, and each
instance then waits for it. The plugin starts this program as its child instead
(``python3 -I -S dicomflow_builder.py``) and hands it each batch over a pipe; its sender
thread then only copies bytes in and out (with the GIL released while it waits).

Protocol over the child's stdin and stdout: frames of an 8-byte little-endian length and a
``marshal`` payload (plain values only: no objects are built from it). The first frame
from the plugin is the configuration ``{"root", "tags", "maxStringLength", "nice", "server"}`` (the
child first adds ``nice`` to its nice value: it yields the CPU to Orthanc); then each
request is a list of ``(seq, instance_id, data, complete, aet, ip, called, syntax,
received)`` — `data` the file's bytes, or its first bytes with ``complete`` false — and
each answer the list of ``(seq, answer)`` in the same order: the event's JSON, an offset
(the header goes on past `data`: send the file's bytes at least up to there), or None (the
plugin builds that one itself, asking Orthanc).

When the configuration has ``"delivery"`` (the scheduler's URL, token, intake path and
timeouts), the builder also delivers: a request ``("keep", requests)`` is answered as
above but with True instead of each event's JSON, which the child keeps; then
``("deliver", parts)`` — each part a kept event's seq or a ``(seq, JSON)`` the plugin built
— is POSTed as one batch, in that order, and answered ``(status, reason, rows)``: the HTTP
status (None when the scheduler could not be reached), the start of its answer (or the
error), and the ``(seq, JSON)`` rows unless the batch was taken (2xx), for the plugin to
spool or keep as dead letters. The sender thread in Orthanc then neither reads the events
back nor POSTs them. The child exits when its stdin closes, so it never outlives Orthanc,
however Orthanc ends. Standard library only.
"""

from __future__ import annotations

import marshal
import os
import select
import subprocess
import sys
import time
from typing import Any

_LENGTH = 8
_MARSHAL_VERSION = 4
#: The most bytes of a file handed over at first, where no pixel data starts before: the
#: default tags end before the pixel data, but after private groups (sag-anon's Siemens CSA
#: headers: 101 KB). A longer header is asked for again (`BuilderProcess.build_events`).
PREFIX = 32 * 1024
#: Requests per batch before the rest is sent whole.
_ROUNDS = 4
#: The pixel data tag (7FE0,0010) as a little endian file stores it. The header the builder
#: reads ends before it, so only the bytes up to it (and its element header: the reader then
#: sees a tag past the last one wanted and stops) cross the pipe, not a small file's pixels.
#: The same bytes inside a header value only cut too early: the builder asks for more.
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_ELEMENT_HEADER = 12
_PREAMBLE = 132


class BuilderError(Exception):
    """The builder process could not be started, died, or did not answer in time."""


def _frame(value: Any) -> bytes:
    payload = marshal.dumps(value, _MARSHAL_VERSION)
    return len(payload).to_bytes(_LENGTH, "little") + payload


class BuilderProcess:
    """The plugin's side: one child process, one request at a time (the sender thread's).

    Args:
        python: the interpreter to run the child with (Debian's ``python3``).
        root: the repository folder (``dicomflow/dicomheader.py`` and ``orthanc/`` below it).
        tags, max_string_length: as the plugin's settings.
        timeout: how long one batch may take before the child is given up (s).
        delivery: the scheduler's URL, token, path and timeouts when the child delivers.
        nice: added to the child's nice value (it yields the CPU to Orthanc's ingest).
        server: this Orthanc's name, in every event's ids ("": none).
    """

    def __init__(self, python: str, root: str, tags: tuple[str, ...], max_string_length: int,
                 timeout: float = 10.0, delivery: dict[str, Any] | None = None, nice: int = 0, server: str = ""):
        self._command = [python, "-I", "-S", os.path.abspath(__file__)]
        self._config = {"root": root, "tags": list(tags), "maxStringLength": max_string_length, "nice": nice,
                        "server": server}
        if delivery is not None:
            self._config["delivery"] = delivery
        self._timeout = timeout
        #: How long a delivery may take: connecting, and the request twice (one reconnect).
        self._delivery_timeout = (timeout + delivery["connectTimeout"] + 2 * delivery["requestTimeout"]
                                  if delivery is not None else timeout)
        self._proc: subprocess.Popen | None = None

    @property
    def delivers(self) -> bool:
        """Whether the child delivers the batches it builds (`build_events(keep=True)`, `deliver`)."""
        return "delivery" in self._config

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the child and hand it the configuration.

        Raises:
            BuilderError: the interpreter cannot be started.
        """
        try:
            # stderr stays Orthanc's: a traceback of the child lands in Orthanc's log.
            self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except OSError as exc:
            raise BuilderError(f"cannot start {self._command[0]}: {exc}") from exc
        os.set_blocking(self._proc.stdin.fileno(), False)
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._write(_frame(self._config), time.monotonic() + self._timeout)

    def build_events(self, items: list[tuple[int, str, bytes, tuple]],
                     keep: bool = False) -> dict[int, str | bool | None]:
        """{seq: event JSON or None} for `items` (seq, instance id, the file's bytes, (aet, ip,
        called, syntax, received)): the start of each file first, more where the header goes on.
        With `keep` (a delivering child), True instead of each JSON: the child keeps it for `deliver`.

        Raises:
            BuilderError: as `build`.
        """
        files = {seq: data for seq, _, data, _ in items}
        requests = []
        for seq, instance_id, data, context in items:
            end = data.find(_PIXEL_DATA, _PREAMBLE, PREFIX)
            end = PREFIX if end < 0 else end + _ELEMENT_HEADER
            requests.append((seq, instance_id, data[:end], len(data) <= end, *context))
        by_seq = {request[0]: request for request in requests}
        built: dict[int, str | bool | None] = {}
        for round_ in range(1, _ROUNDS + 1):
            again = []
            for seq, answer in self.build(requests, keep):
                if isinstance(answer, int) and not isinstance(answer, bool):
                    data = files[seq]
                    size = len(data) if round_ == _ROUNDS - 1 else max(answer, 2 * len(by_seq[seq][2]))
                    again.append((seq, by_seq[seq][1], data[:size], size >= len(data), *by_seq[seq][4:]))
                else:
                    built[seq] = answer
            if not again:
                break
            requests = again
            by_seq.update((request[0], request) for request in again)
        return built

    def build(self, requests: list[tuple], keep: bool = False) -> list[tuple[int, str | int | bool | None]]:
        """Answers to `requests` (see the module's protocol), in order.

        Raises:
            BuilderError: the child died or hung (it is then stopped; `start` again to retry).
        """
        answer = self._exchange(("keep", requests) if keep else requests, self._timeout)
        if not isinstance(answer, list) or len(answer) != len(requests):
            self.close()
            count = len(answer) if isinstance(answer, list) else "no"
            raise BuilderError(f"{count} answers to {len(requests)} requests")
        return answer

    def deliver(self, parts: list[int | tuple[int, str]]) -> tuple[int | None, str, list[tuple[int, str]] | None]:
        """POST kept events (by seq) and events built elsewhere ((seq, JSON)) as one batch.

        Returns (status or None when the scheduler could not be reached, the start of its
        answer or the error, the batch's (seq, JSON) rows unless it was taken).

        Raises:
            BuilderError: as `build` (whether the batch was taken is then unknown).
        """
        answer = self._exchange(("deliver", parts), self._delivery_timeout)
        try:
            status, reason, rows = answer
        except (TypeError, ValueError) as exc:
            self.close()
            raise BuilderError(f"unreadable delivery answer: {exc}") from exc
        return status, reason, rows

    def _exchange(self, request: Any, timeout: float) -> Any:
        if self._proc is None:
            raise BuilderError("not started")
        deadline = time.monotonic() + timeout
        try:
            self._write(_frame(request), deadline)
            return marshal.loads(self._read(int.from_bytes(self._read(_LENGTH, deadline), "little"), deadline))
        except BuilderError:
            self.close()
            raise
        except (ValueError, EOFError, TypeError) as exc:
            self.close()
            raise BuilderError(f"unreadable answer: {exc}") from exc

    def _write(self, data: bytes, deadline: float) -> None:
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        while view:
            self._wait(fd, select.POLLOUT, deadline)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: the child is gone
                raise BuilderError(f"the builder process is gone ({self._exit_status()}): {exc}") from exc

    def _read(self, size: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        chunks, left = [], size
        while left:
            self._wait(fd, select.POLLIN, deadline)
            try:
                chunk = os.read(fd, min(left, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise BuilderError(f"the builder process is gone ({self._exit_status()})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()
        poller.register(fd, event)
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise BuilderError(f"no answer from the builder process within {self._timeout:g} s")

    def _exit_status(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        return "still running" if code is None else f"exit status {code}"

    def close(self) -> None:
        """Stop the child: its stdin closes (it exits by itself), else it is killed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)


# ---- the child ----------------------------------------------------------------------------


def _read_exactly(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None  # the plugin closed the pipe: Orthanc stops (or died)
    return data


def _read_frame(stream: Any) -> Any:
    head = _read_exactly(stream, _LENGTH)
    if head is None:
        return None
    payload = _read_exactly(stream, int.from_bytes(head, "little"))
    return None if payload is None else marshal.loads(payload)


def _build(builder: Any, incomplete: type[Exception], requests: list[tuple], kept: dict[int, str] | None) -> list:
    """The answer to a build request; with `kept`, the events go there and True into the answer."""
    answer = []
    for seq, instance_id, data, complete, aet, ip, called, syntax, received in requests:
        try:
            text = builder.build(instance_id, data, complete, aet, ip, called, syntax, received)
        except incomplete as need:
            text = need.end
        except Exception as exc:  # noqa: BLE001 - one odd file: the plugin builds it itself and says why
            print(f"dicomflow builder: instance {instance_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
            text = None
        if kept is not None and isinstance(text, str):
            kept[seq] = text
            text = True
        answer.append((seq, text))
    return answer


def _deliver(delivery: Any, parts: list, kept: dict[int, str]) -> tuple:
    """The answer to a deliver request: POST the batch, (status, reason, rows unless taken)."""
    from dicomflow_delivery import DeliveryError, batch_body

    rows = [part if isinstance(part, tuple) else (part, kept.pop(part)) for part in parts]
    kept.clear()  # one batch at a time: nothing older is asked for again
    try:
        status, data = delivery.post(batch_body([text for _, text in rows]))
    except DeliveryError as exc:
        return None, str(exc), rows
    return status, data[:500].decode("utf-8", "replace"), None if 200 <= status < 300 else rows


def main() -> int:
    """The child's loop: configuration, then one answer per request until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    config = _read_frame(stdin)
    if config is None:
        return 0
    if config.get("nice"):
        os.nice(config["nice"])
    root = config["root"]
    for folder in (root, os.path.join(root, "orthanc")):
        if folder not in sys.path:
            sys.path.append(folder)
    from dicomflow import dicomheader
    from dicomflow_delivery import Delivery
    from dicomflow_events import EventBuilder

    builder = EventBuilder(dicomheader, config["tags"], config["maxStringLength"], config.get("server", ""))
    settings = config.get("delivery")
    delivery = None if settings is None else Delivery(
        settings["url"], settings["token"], settings["eventsPath"], settings["connectTimeout"],
        settings["requestTimeout"])
    #: The events built in "keep" requests, by seq, until the "deliver" request of their batch.
    kept: dict[int, str] = {}
    while True:
        request = _read_frame(stdin)
        if request is None:
            return 0
        if isinstance(request, list):
            answer = _build(builder, dicomheader.Incomplete, request, None)
        elif request[0] == "keep":
            answer = _build(builder, dicomheader.Incomplete, request[1], kept)
        else:
            answer = _deliver(delivery, request[1], kept)
        try:
            stdout.write(_frame(answer))
            stdout.flush()
        except BrokenPipeError:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
