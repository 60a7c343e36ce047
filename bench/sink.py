"""A counting sink for the plugin's batches: a process of its own, at the scheduler's nice value.

`bench.ingest`'s (c-sink) delivers to it, so that (c-sink)/(b) is what the plugin costs
Orthanc's ingest and (c)/(c-sink) what the scheduler and Redis cost. It answers every batch
200 (401 for a wrong token, as the scheduler does) and does as little as a receiver can: it
counts the instance events with one byte search and reads their `receivedAt` with one
regular expression; it parses no JSON. Before session 10 the sink was a thread of the
benchmark's own process at nice 0 that parsed every batch in Python: it cost the ingest as
much as the scheduler and Redis did, so (c)/(c-sink) measured nothing.

    python -m bench.sink PORT TOKEN     (the benchmark starts it; GET /stats reads it)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from bench.support import cpu_seconds
from tests.support.procs import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent

_INSTANCE = b'"level":"instance"'
_RECEIVED = re.compile(rb'"receivedAt":([0-9.eE+-]+)')


def serve(port: int, token: str) -> None:
    """Answer batches on 127.0.0.1:`port` until killed."""
    lock = threading.Lock()
    state = {"events": 0, "batches": 0, "latencies": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the plugin expects
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived = time.time()
            if self.headers.get("Authorization") != f"Bearer {token}":
                self._answer(401, b'{"error":"unauthorized"}')
                return
            # Every event of the benchmark is an instance event (no series is stable within it).
            latencies = [arrived - float(t) for t in _RECEIVED.findall(body)]
            with lock:
                state["events"] += body.count(_INSTANCE)
                state["batches"] += 1
                state["latencies"] += latencies
            self._answer(200, b'{"results":[]}')

        def do_GET(self) -> None:
            # /stats: the counts (polled while a chunk drains: kept small); /latencies?since=N
            # the latencies from the N-th on (read once per chunk).
            path, _, query = self.path.partition("?")
            with lock:
                if path == "/latencies":
                    body = json.dumps(state["latencies"][int(query.partition("=")[2] or 0):])
                else:
                    body = json.dumps({"events": state["events"], "batches": state["batches"]})
            self._answer(200, body.encode())

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


class CountingSink:
    """The benchmark's side: starts `serve` as a child (after `prefix`, e.g. nice), reads it."""

    def __init__(self, token: str, prefix: Sequence[str] = ()):
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._prefix = list(prefix)
        self._proc: subprocess.Popen | None = None
        self._expected = 0  # instance events sent so far
        self._seen = 0  # latencies already handed out

    def start(self) -> CountingSink:
        self._proc = subprocess.Popen([*self._prefix, sys.executable, "-m", "bench.sink", str(self.port), self.token],
                                      cwd=REPO)
        wait_for(lambda: self._stats() is not None, timeout=20, what="the counting sink")
        return self

    def _stats(self) -> dict | None:
        try:
            return requests.get(self.url + "/stats", timeout=2).json()
        except requests.RequestException:
            return None

    def stats(self) -> dict:
        stats = self._stats()
        if stats is None:
            raise RuntimeError(f"the counting sink on port {self.port} does not answer")
        return stats

    def wait_for_events(self, count: int, timeout: float = 120) -> list[float]:
        """Wait until the `count` instance events sent since the last call arrived; their
        latencies (s), arrival at the sink minus `receivedAt`."""
        self._expected += count
        total = self._expected
        wait_for(lambda: self.stats()["events"] >= total, timeout=timeout, what=f"{total} events at the sink")
        new = requests.get(f"{self.url}/latencies?since={self._seen}", timeout=10).json()
        self._seen += len(new)
        return new

    def cpu(self) -> dict[str, float]:
        return {"sink": cpu_seconds(self._proc.pid)} if self._proc is not None else {}

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
