"""A throwaway database on the machine's PostgreSQL for one test module (created, then dropped).

The server is the one already running (CI and the dev machine: 127.0.0.1:5432, trust auth,
user postgres); `TEST_POSTGRES_URL` names another (an admin URL whose user may create
databases). A server that is not there fails the tests: they are not skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

#: TEST_POSTGRES_URL; DICOMFLOW_TEST_POSTGRES is the same (the name tests/support/orthanc_index.py gives).
ADMIN_URL = (os.environ.get("TEST_POSTGRES_URL") or os.environ.get("DICOMFLOW_TEST_POSTGRES")
             or "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new empty database `dicomflow_test_<random>`; yields its SQLAlchemy URL, drops it afterwards."""
    name = f"dicomflow_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL} (set TEST_POSTGRES_URL): {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
