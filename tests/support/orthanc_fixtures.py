"""Fixtures of the tests that start real Orthancs (loaded with `pytest_plugins`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.orthanc import EventSink, OrthancServer, leftovers, stop_all

#: The plugin's back-off made fast, so an outage's end is noticed within a second.
FAST_RETRY = {"RetryMinDelay": 0.2, "RetryMaxDelay": 0.5}


@pytest.fixture()
def servers() -> Iterator[list[OrthancServer]]:
    """Orthanc servers a test starts; all stopped afterwards, none left running."""
    started: list[OrthancServer] = []
    yield started
    stop_all(started)
    assert not leftovers(started), "an Orthanc started by the test is still running"


@pytest.fixture()
def sink() -> Iterator[EventSink]:
    """A stand-in scheduler that records the plugin's batches."""
    sink = EventSink().start()
    yield sink
    sink.stop()


@pytest.fixture()
def plain_orthanc(tmp_path) -> Iterator[OrthancServer]:
    """An Orthanc without the plugin, holding what a test stores in it (the workers' source)."""
    server = OrthancServer(tmp_path / "orthanc", plugin=False).start()
    yield server
    server.stop()
