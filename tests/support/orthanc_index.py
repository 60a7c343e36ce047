"""Orthanc's index in PostgreSQL for tests: one throwaway database per Orthanc, dropped at exit.

`TEST_ORTHANC_INDEX=postgresql` in the environment puts every test Orthanc
(`tests.support.orthanc.OrthancServer`) on a database of its own on the machine's PostgreSQL
(`DICOMFLOW_TEST_POSTGRES`, default 127.0.0.1:5432 as user postgres), so the whole
end-to-end suite runs on Debian's orthanc-postgresql index plugin instead of SQLite. The
database lives as long as the test process (an Orthanc restarted within a test keeps its
index) and is dropped when the process exits.
"""

from __future__ import annotations

import atexit
import os
import secrets

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from tests.support.postgres import ADMIN_URL

#: The environment variable that chooses the test Orthancs' index: "sqlite" (default) or "postgresql".
INDEX_ENV = "TEST_ORTHANC_INDEX"

_created: list[str] = []


class OrthancIndexError(RuntimeError):
    """TEST_ORTHANC_INDEX has a value this module does not know, or PostgreSQL is unreachable."""


def wanted_index() -> str:
    """The index the test Orthancs use ("sqlite" or "postgresql"), from TEST_ORTHANC_INDEX."""
    value = os.environ.get(INDEX_ENV, "sqlite").strip().lower() or "sqlite"
    if value not in ("sqlite", "postgresql"):
        raise OrthancIndexError(f"{INDEX_ENV}={value!r}: expected 'sqlite' or 'postgresql'")
    return value


def create_database(prefix: str = "dicomflow_orthanc") -> str:
    """A new empty database on ADMIN_URL's server, dropped when this process exits; its libpq URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        raise OrthancIndexError(f"PostgreSQL is not reachable at {ADMIN_URL} (set DICOMFLOW_TEST_POSTGRES): "
                                f"{exc}") from exc
    if not _created:
        atexit.register(drop_databases)
    _created.append(name)
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop a database `create_database` made (its Orthanc must be stopped, or is cut off)."""
    name = make_url(url).database
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    if name in _created:
        _created.remove(name)


def drop_databases() -> None:
    """Drop every database this process created and has not dropped yet."""
    for name in list(_created):
        try:
            drop_database(make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False))
        except psycopg.Error as exc:  # at exit: say so, keep dropping the others
            print(f"could not drop the test database {name}: {exc}")


def index_rows(url: str) -> int:
    """How many resources Orthanc's PostgreSQL index holds (its `resources` table)."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM resources").fetchone()[0]
