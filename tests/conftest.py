"""Shared fixtures: a real redis-server on a free port for the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import start_redis_server, stop_redis_server

REPO = Path(__file__).resolve().parent.parent
#: The full sag-anon series (192 files), which CI places beside the repository.
SAG_ANON_FULL = REPO.parent / "shared" / "data" / "sag-anon"
#: Its first 16 files, shipped in the repository for a clone without ../shared (MIT, tests/data/sag-anon-16/LICENSE).
SAG_ANON_16 = REPO / "tests" / "data" / "sag-anon-16"
#: The series the tests use: $SAG_ANON_DIR, else the full series when present, else the 16 shipped files.
SAG_ANON = Path(os.environ.get("SAG_ANON_DIR") or (SAG_ANON_FULL if SAG_ANON_FULL.is_dir() else SAG_ANON_16))
#: How many instances it holds: 192, or 16 in a fresh clone (tests compare with this, not with 192).
SAG_ANON_COUNT = len(list(SAG_ANON.glob("*.dcm")))

pytest_plugins = ["tests.support.chris_fixtures", "tests.support.orthanc_fixtures"]

os.environ.setdefault("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server started for this test session (never the machine's own)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run .ci/run or build.sh first")
    proc, url = start_redis_server(tmp_path_factory.mktemp("redis"), what="redis-server to start")
    yield url
    stop_redis_server(proc)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """A second redis-server, for the DICOM store (never the queue's), per test module."""
    proc, url = start_redis_server(tmp_path_factory.mktemp("store-redis"), what="the store's redis-server")
    yield url
    stop_redis_server(proc)


@pytest.fixture()
def connection(redis_url) -> redis.Redis:
    """A client of the session's Redis, flushed before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    return client


@pytest.fixture(scope="session")
def sag_anon() -> Path:
    """The sag-anon MR series folder (192 files in CI, 16 in a fresh clone: see `SAG_ANON`)."""
    if not any(SAG_ANON.glob("*.dcm")):
        pytest.fail(f"no sag-anon DICOM files in {SAG_ANON}")
    return SAG_ANON


@pytest.fixture(scope="session")
def sag_anon_count(sag_anon) -> int:
    """How many instances of the series `sag_anon` holds (192, or 16 in a fresh clone)."""
    return len(list(sag_anon.glob("*.dcm")))


@pytest.fixture()
def services(tmp_path) -> Path:
    """An empty services folder (registry/ + modules/) for this test."""
    return tmp_path / "services"


@pytest.fixture()
def make_client(tmp_path, redis_url, services, connection):
    """A Flask test client of the scheduler over `services` and the session's Redis."""
    from scheduler.app import create_app
    from tests.support.services import settings_for

    def make(**extra):
        return create_app(settings_for(tmp_path, redis_url, services, **extra), connection).test_client()
    return make
