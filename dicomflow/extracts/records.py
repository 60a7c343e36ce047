"""Export bookkeeping: which study went out for which project, when, where, and how it ended.

SQLite by default (a file under the state folder), PostgreSQL when ``DICOMFLOW_DB_URL`` names
one (``postgresql+psycopg://...``). The schema is created and upgraded by the alembic
migrations shipped in ``dicomflow/extracts/migrations``, run on first use ("upgrade head").

PIXL's rule: a study exported for a project is not exported again unless an operator forces
it; a failed or partial export is listed and can be re-run. Each (project, study) has one row
in ``study_exports`` (a unique constraint), and a job exports a study only after *claiming*
that row: inserting it, or moving it from a re-runnable state to ``exporting`` with a
compare-and-set on its ``version``. Two workers on the same study: one claim wins, the other
hears ``busy``. Every attempt is also appended to ``export_attempts`` (the history), and every
Parquet extract to ``extracts``.

The original StudyInstanceUID is never stored: rows hold its keyed hash (HMAC with the
project's key, `study_hash`) and the pseudonymised StudyInstanceUID that was exported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dicomflow.extracts.errors import RecordsError
from dicomflow.extracts.status import ExportStatus

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: alembic's version table, named for us: the database may be shared with other software.
VERSION_TABLE = "dicomflow_exports_version"
#: A claim older than its job's timeout plus this counts as abandoned (its worker is gone and
#: the job was not re-run); a re-run of the same job takes its own claim back at once.
CLAIM_GRACE = dt.timedelta(minutes=10)
DEFAULT_JOB_TIMEOUT = 3600


#: What `retry` re-runs; `force` also re-runs DONE.
RETRYABLE = (ExportStatus.FAILED, ExportStatus.PARTIAL, ExportStatus.REQUESTED)


def study_key(deid: Any, study_uid: str) -> str:
    """A study's key in the records: HMAC of its original StudyInstanceUID with the project's key
    (`dicomflow.extracts.deid.Deidentifier`), so the records never hold the UID itself."""
    return deid.pseudonym("record-study", study_uid, 64).lower()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands datetimes back without their zone; every one we write is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


class Base(DeclarativeBase):
    pass


class StudyExport(Base):
    """One study of one project: its current export state (one row per project and study)."""

    __tablename__ = "study_exports"
    __table_args__ = (UniqueConstraint("project", "study_hash", name="uq_study_exports_project_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    study_hash: Mapped[str] = mapped_column(String(64))              # HMAC of the original StudyInstanceUID
    study_id: Mapped[str] = mapped_column(String(64), index=True)    # the pseudonymised StudyInstanceUID
    patient_id: Mapped[str | None] = mapped_column(String(64))       # pseudonymised
    accession_number: Mapped[str | None] = mapped_column(String(64))  # pseudonymised
    study_date: Mapped[str | None] = mapped_column(String(8))        # as exported (date-shifted or dummy)
    status: Mapped[str] = mapped_column(String(16))
    claim: Mapped[str | None] = mapped_column(String(200))           # the job exporting it now
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, default=1)         # compare-and-set of claims
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    destinations: Mapped[list] = mapped_column(JSON, default=list)   # names it went / was going to
    instances: Mapped[int] = mapped_column(Integer, default=0)       # instances confirmed
    failed_files: Mapped[dict] = mapped_column(JSON, default=dict)   # file -> reason (partial)
    reason: Mapped[str | None] = mapped_column(Text)                 # why it failed
    series: Mapped[list] = mapped_column(JSON, default=list)         # [{SeriesInstanceUID, ...}] exported
    job: Mapped[dict] = mapped_column(JSON, default=dict)            # how to run its job again
    exported_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class ExportAttempt(Base):
    """One job's attempt at one study (the history; `study_exports` holds the latest state)."""

    __tablename__ = "export_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("study_exports.id", ondelete="CASCADE"), index=True)
    job: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16))
    destinations: Mapped[dict] = mapped_column(JSON, default=dict)   # name -> {sent, failed}
    instances: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)


class Extract(Base):
    """One Parquet extract of a project (``exports/<project>/all_extracts/<time>/``)."""

    __tablename__ = "extracts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    extract_time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    path: Mapped[str] = mapped_column(Text)
    studies: Mapped[int] = mapped_column(Integer)
    destinations: Mapped[dict] = mapped_column(JSON, default=dict)   # name -> result
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Claim:
    """The answer to `Records.claim`.

    Attributes:
        outcome: "claimed" (export it), "already-exported" (done before; not forced) or
            "busy" (another job is exporting it now).
        export_id: the row's id.
        row: the row as it was when the claim was decided.
    """

    outcome: str
    export_id: int
    row: dict[str, Any]

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


def engine_for(url: str) -> Engine:
    """An engine for `url`; ``postgresql://`` is taken as psycopg 3 (the driver we pin)."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        if url.startswith("sqlite"):
            sa_url = sa.engine.make_url(url)
            if sa_url.database and sa_url.database != ":memory:":
                Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ValueError, ImportError, OSError) as exc:
        raise RecordsError(f"DICOMFLOW_DB_URL: cannot use {_safe(url)}: {exc}") from exc


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: readers do not block the writer (the CLI lists while workers record); foreign keys on.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "<unparsable URL>"


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction that holds the one migration lock: two processes starting
    on an empty database must not both create the tables."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('dicomflow-exports-migrations'))"))
            yield conn
        return
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        with open(f"{database}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with engine.begin() as conn:
                yield conn
        return
    with engine.begin() as conn:
        yield conn


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (alembic "upgrade head")."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("version_table", VERSION_TABLE)
    with _migration_lock(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


class Records:
    """The export bookkeeping of one database.

    Args:
        engine: where the records are; `open_records` builds it and runs the migrations.
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    # -- claims and results (the worker) ----------------------------------------------------
    def claim(self, project: str, study_hash: str, study_id: str, job_id: str, job: Mapping[str, Any],
              *, force: bool = False) -> Claim:
        """Claim (project, study) for `job_id`, so that only one job exports it.

        Returns "claimed" for a new study, a re-runnable one (failed, partial, requested), a
        claim of the same job (a re-run after its worker died) or an abandoned one (older than
        its job's timeout + CLAIM_GRACE), and a done one when `force`; "already-exported" for
        a done one; "busy" when another job holds it.
        """
        now = utcnow()
        table = StudyExport.__table__
        try:
            with self.engine.begin() as conn:
                new_id = conn.execute(table.insert().values(
                    project=project, study_hash=study_hash, study_id=study_id, status=ExportStatus.EXPORTING.value,
                    claim=job_id, claimed_at=now, version=1, attempts=1, destinations=[], instances=0,
                    failed_files={}, series=[], job=dict(job), created_at=now, updated_at=now)
                ).inserted_primary_key[0]
            return Claim("claimed", new_id, {"status": None})
        except IntegrityError:
            pass  # it has a row: decide from its state
        except SQLAlchemyError as exc:
            raise RecordsError(f"cannot record the export of {project}/{study_id}: {exc}") from exc
        with self._errors(f"claim {project}/{study_id}"), self.engine.begin() as conn:
            row = conn.execute(sa.select(table).where(table.c.project == project,
                                                      table.c.study_hash == study_hash)).mappings().one()
            state = self._describe(row)
            status = ExportStatus(row["status"])
            if status is ExportStatus.DONE and not force:
                return Claim("already-exported", row["id"], state)
            if status is ExportStatus.EXPORTING and row["claim"] != job_id and not self._abandoned(row, now):
                return Claim("busy", row["id"], state)
            done = conn.execute(table.update().where(table.c.id == row["id"], table.c.version == row["version"])
                                .values(status=ExportStatus.EXPORTING.value, claim=job_id, claimed_at=now,
                                        version=row["version"] + 1, attempts=row["attempts"] + 1,
                                        study_id=study_id, job=dict(job), updated_at=now))
            if done.rowcount != 1:   # another job changed it between our read and our write
                return Claim("busy", row["id"], state)
            return Claim("claimed", row["id"], state)

    @staticmethod
    def _abandoned(row: Mapping[str, Any], now: dt.datetime) -> bool:
        timeout = (row["job"] or {}).get("timeout") or DEFAULT_JOB_TIMEOUT
        claimed_at = _aware(row["claimed_at"]) or now
        return now - claimed_at > dt.timedelta(seconds=float(timeout)) + CLAIM_GRACE

    def finish(self, export_id: int, job_id: str, status: ExportStatus, *, started_at: dt.datetime,
               destinations: Mapping[str, Any] | None = None, instances: int = 0,
               failed_files: Mapping[str, str] | None = None, reason: str | None = None,
               study: Mapping[str, Any] | None = None) -> bool:
        """Record how the claimed export of `export_id` ended, and append the attempt to the history.

        Args:
            status: DONE, PARTIAL or FAILED.
            destinations: destination name -> {"sent": n, "failed": {file: reason}}.
            study: what the Parquet extract reads: patient_id, accession_number, study_date,
                series (pseudonymised, as exported).

        Returns:
            False when the claim was no longer this job's (taken over as abandoned); the attempt
            is still in the history.
        """
        now = utcnow()
        table = StudyExport.__table__
        values: dict[str, Any] = {"status": status.value, "claim": None, "claimed_at": None, "updated_at": now,
                                  "destinations": sorted(destinations or {}), "instances": instances,
                                  "failed_files": dict(failed_files or {}), "reason": reason,
                                  "version": table.c.version + 1}
        if status is ExportStatus.DONE:
            values["exported_at"] = now
        for key in ("patient_id", "accession_number", "study_date", "series"):
            if study and key in study:
                values[key] = study[key]
        with self._errors(f"record the export {export_id}"), self.engine.begin() as conn:
            ours = conn.execute(table.update().where(table.c.id == export_id, table.c.claim == job_id,
                                                     table.c.status == ExportStatus.EXPORTING.value)
                                .values(**values)).rowcount == 1
            conn.execute(ExportAttempt.__table__.insert().values(
                export_id=export_id, job=job_id, started_at=started_at, finished_at=now, status=status.value,
                destinations=dict(destinations or {}), instances=instances, reason=reason))
        if not ours:
            log.warning("export %s: the claim of job %s was taken over before it finished (%s recorded "
                        "in the history only)", export_id, job_id, status.value)
        return ours

    # -- operators (the CLI and the API) --------------------------------------------------------
    def studies(self, project: str, statuses: Sequence[ExportStatus] | None = None) -> list[dict[str, Any]]:
        """The project's studies, newest change first (optionally only those in `statuses`)."""
        table = StudyExport.__table__
        query = sa.select(table).where(table.c.project == project).order_by(table.c.updated_at.desc(),
                                                                              table.c.id.desc())
        if statuses:
            query = query.where(table.c.status.in_([s.value for s in statuses]))
        with self._errors(f"list {project}"), self.engine.connect() as conn:
            return [self._describe(row) for row in conn.execute(query).mappings()]

    def summary(self, project: str) -> dict[str, Any]:
        """Counts of the project's studies by status, instances exported, and its last extract."""
        table = StudyExport.__table__
        with self._errors(f"summarise {project}"), self.engine.connect() as conn:
            counts = dict(conn.execute(sa.select(table.c.status, sa.func.count()).where(table.c.project == project)
                                       .group_by(table.c.status)).all())
            instances = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.instances), 0)).where(
                table.c.project == project, table.c.status == ExportStatus.DONE.value)).scalar_one()
            extracts = Extract.__table__
            last = conn.execute(sa.select(extracts).where(extracts.c.project == project)
                                .order_by(extracts.c.extract_time.desc(), extracts.c.id.desc()).limit(1)
                                ).mappings().first()
        return {"project": project, "studies": {s.value: counts.get(s.value, 0) for s in ExportStatus},
                "instancesExported": int(instances),
                "lastExtract": self._describe_extract(last) if last else None}

    def find(self, project: str, study: str, study_hash: str | None = None) -> dict[str, Any] | None:
        """A study of the project by its pseudonymised StudyInstanceUID or by the hash of its original."""
        table = StudyExport.__table__
        which = table.c.study_id == study
        if study_hash:
            which = sa.or_(which, table.c.study_hash == study_hash)
        with self._errors(f"find {project}/{study}"), self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.project == project, which)).mappings().first()
        return self._describe(row) if row else None

    def history(self, export_id: int) -> list[dict[str, Any]]:
        """Every attempt at one study, oldest first."""
        table = ExportAttempt.__table__
        with self._errors(f"read the history of {export_id}"), self.engine.connect() as conn:
            rows = conn.execute(sa.select(table).where(table.c.export_id == export_id).order_by(table.c.id)).mappings()
            return [{"job": r["job"], "status": r["status"], "startedAt": _iso(r["started_at"]),
                     "finishedAt": _iso(r["finished_at"]), "destinations": r["destinations"],
                     "instances": r["instances"], "reason": r["reason"]} for r in rows]

    def request_rerun(self, project: str, study_ids: Sequence[str] | None, *, force: bool) -> list[dict[str, Any]]:
        """Mark studies for a re-run (status "requested") and return them with their job record.

        Args:
            study_ids: pseudonymised StudyInstanceUIDs; None: every study of the project that
                qualifies.
            force: also done studies (PIXL: a done study goes again only when forced).

        A study being exported now is left alone. The caller queues the jobs; if it cannot,
        the studies stay "requested" and the next retry picks them up.
        """
        table = StudyExport.__table__
        allowed = [s.value for s in RETRYABLE] + ([ExportStatus.DONE.value] if force else [])
        query = sa.select(table).where(table.c.project == project, table.c.status.in_(allowed))
        if study_ids is not None:
            query = query.where(table.c.study_id.in_(list(study_ids)))
        now = utcnow()
        chosen = []
        with self._errors(f"re-run {project}"), self.engine.begin() as conn:
            for row in conn.execute(query).mappings().all():
                done = conn.execute(table.update().where(table.c.id == row["id"], table.c.version == row["version"])
                                    .values(status=ExportStatus.REQUESTED.value, version=row["version"] + 1,
                                            updated_at=now)).rowcount
                if done == 1:
                    chosen.append({**self._describe(row), "previousStatus": row["status"],
                                   "status": ExportStatus.REQUESTED.value, "job": row["job"]})
        return chosen

    # -- Parquet extracts ---------------------------------------------------------------------
    def exported(self, project: str) -> list[dict[str, Any]]:
        """The project's done studies with what a Parquet extract lists, oldest export first."""
        table = StudyExport.__table__
        query = (sa.select(table).where(table.c.project == project, table.c.status == ExportStatus.DONE.value)
                 .order_by(table.c.exported_at, table.c.id))
        with self._errors(f"read the exports of {project}"), self.engine.connect() as conn:
            return [{**self._describe(row), "series": row["series"] or []} for row in conn.execute(query).mappings()]

    def record_extract(self, project: str, extract_time: dt.datetime, path: Path, studies: int,
                       destinations: Mapping[str, Any] | None = None) -> int:
        """Append a Parquet extract to the records; its id."""
        with self._errors(f"record an extract of {project}"), self.engine.begin() as conn:
            return conn.execute(Extract.__table__.insert().values(
                project=project, extract_time=extract_time, path=str(path), studies=studies,
                destinations=dict(destinations or {}), created_at=utcnow())).inserted_primary_key[0]

    def extracts(self, project: str) -> list[dict[str, Any]]:
        """The project's Parquet extracts, newest first."""
        table = Extract.__table__
        with self._errors(f"list the extracts of {project}"), self.engine.connect() as conn:
            return [self._describe_extract(r) for r in conn.execute(
                sa.select(table).where(table.c.project == project).order_by(table.c.extract_time.desc(),
                                                                           table.c.id.desc()))
                .mappings()]

    # -- plumbing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise RecordsError(f"export records ({_safe(str(self.engine.url))}): cannot {what}: {exc}") from exc

    @staticmethod
    def _describe(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "project": row["project"], "studyId": row["study_id"],
                "studyHash": row["study_hash"], "status": row["status"], "instances": row["instances"],
                "destinations": row["destinations"], "failedFiles": row["failed_files"], "reason": row["reason"],
                "attempts": row["attempts"], "claim": row["claim"], "exportedAt": _iso(row["exported_at"]),
                "updatedAt": _iso(row["updated_at"]), "patientId": row["patient_id"],
                "accessionNumber": row["accession_number"], "studyDate": row["study_date"]}

    @staticmethod
    def _describe_extract(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "project": row["project"], "extractTime": _iso(row["extract_time"]),
                "path": row["path"], "studies": row["studies"], "destinations": row["destinations"]}

    def dispose(self) -> None:
        self.engine.dispose()


def _iso(value: dt.datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value else None


def open_records(url: str) -> Records:
    """Connect to the records at `url` and bring their schema up to date.

    Raises:
        RecordsError: the URL is unusable, the database unreachable, or a migration failed
            (the message names the database without its password).
    """
    engine = engine_for(url)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise RecordsError(f"export records at {_safe(url)}: cannot open or migrate: {exc}") from exc
    return Records(engine)
