"""Export bookkeeping (issue 19): once per project and study, claims, re-runs — on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from dicomflow.extracts.errors import RecordsError
from dicomflow.extracts.records import VERSION_TABLE, ExportStatus, open_records, utcnow
from tests.support.postgres import throwaway_database


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory):
    """An empty database of each kind: a SQLite file, and a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('records') / 'exports.db'}"
        return
    with throwaway_database() as url:
        yield url


@pytest.fixture()
def records(db_url, request):
    records = open_records(db_url)
    with records.engine.begin() as conn:   # each test starts from empty tables
        for table in ("export_attempts", "extracts", "study_exports"):
            conn.execute(sa.text(f"DELETE FROM {table}"))
    yield records
    records.dispose()


def _finish(records, claim, job, status, **kw):
    return records.finish(claim.export_id, job, status, started_at=utcnow(), **kw)


def test_migrations_create_the_schema_once_and_again_is_a_no_op(db_url):
    first, second = open_records(db_url), open_records(db_url)
    tables = set(sa.inspect(first.engine).get_table_names())
    assert {"study_exports", "export_attempts", "extracts", VERSION_TABLE} <= tables
    with first.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == ["0001"]
    uniques = sa.inspect(first.engine).get_unique_constraints("study_exports")
    assert any(set(u["column_names"]) == {"project", "study_hash"} for u in uniques)
    first.dispose()
    second.dispose()


def test_a_study_is_exported_once_per_project_unless_forced(records):
    claim = records.claim("lung", "h1", "2.25.1", "deid-a", {"timeout": 60})
    assert claim.claimed
    assert records.claim("lung", "h1", "2.25.1", "deid-b", {}).outcome == "busy"     # another job: no
    assert records.claim("other", "h1", "2.25.9", "deid-b", {}).claimed             # another project: yes
    assert _finish(records, claim, "deid-a", ExportStatus.DONE, instances=12,
                   destinations={"local": {"sent": 12, "failed": {}}},
                   study={"patient_id": "P1", "study_date": "20200101", "series": [{"instances": 12}]})
    again = records.claim("lung", "h1", "2.25.1", "deid-c", {})
    assert again.outcome == "already-exported" and again.row["instances"] == 12
    assert records.claim("lung", "h1", "2.25.1", "deid-d", {}, force=True).claimed
    row = records.find("lung", "2.25.1")
    assert row["status"] == "exporting" and row["claim"] == "deid-d" and row["attempts"] == 2
    assert records.find("lung", "nope", study_hash="h1")["id"] == row["id"]
    assert records.find("lung", "nope") is None


def test_the_same_job_takes_its_own_claim_back_and_an_abandoned_claim_is_taken_over(records):
    assert records.claim("lung", "h1", "2.25.1", "deid-a", {"timeout": 60}).claimed
    assert records.claim("lung", "h1", "2.25.1", "deid-a", {"timeout": 60}).claimed   # its worker died, re-run
    assert records.claim("lung", "h1", "2.25.1", "deid-b", {}).outcome == "busy"
    with records.engine.begin() as conn:   # claimed 2 hours ago with a 60 s job: abandoned
        conn.execute(sa.text("UPDATE study_exports SET claimed_at = :t"),
                     {"t": utcnow() - dt.timedelta(hours=2)})
    taken = records.claim("lung", "h1", "2.25.1", "deid-b", {})
    assert taken.claimed
    # the first job finishing late does not overwrite the new claim; its attempt is in the history
    assert not records.finish(taken.export_id, "deid-a", ExportStatus.DONE, started_at=utcnow())
    assert records.find("lung", "2.25.1")["claim"] == "deid-b"
    assert [a["job"] for a in records.history(taken.export_id)] == ["deid-a"]


def test_failed_and_partial_exports_are_listed_and_re_runnable(records):
    a = records.claim("lung", "ha", "2.25.10", "j1", {"kwargs": {"x": 1}})
    b = records.claim("lung", "hb", "2.25.11", "j2", {})
    c = records.claim("lung", "hc", "2.25.12", "j3", {})
    _finish(records, a, "j1", ExportStatus.PARTIAL, instances=10,
            failed_files={"1.dcm": "409 Conflict: already there"}, destinations={"pacs": {"sent": 10}})
    _finish(records, b, "j2", ExportStatus.FAILED, reason="pacs: unreachable")
    _finish(records, c, "j3", ExportStatus.DONE, instances=3)
    failed = records.studies("lung", [ExportStatus.FAILED, ExportStatus.PARTIAL])
    assert {r["studyId"]: r["status"] for r in failed} == {"2.25.10": "partial", "2.25.11": "failed"}
    assert failed[[r["studyId"] for r in failed].index("2.25.10")]["failedFiles"] == {
        "1.dcm": "409 Conflict: already there"}
    assert records.summary("lung")["studies"] == {"exporting": 0, "done": 1, "partial": 1, "failed": 1,
                                                  "requested": 0}
    assert records.summary("lung")["instancesExported"] == 3
    # retry: the failed and partial ones, not the done one
    chosen = records.request_rerun("lung", None, force=False)
    assert sorted(r["studyId"] for r in chosen) == ["2.25.10", "2.25.11"]
    assert next(r for r in chosen if r["studyId"] == "2.25.10")["job"] == {"kwargs": {"x": 1}}
    assert records.request_rerun("lung", ["2.25.12"], force=False) == []
    assert records.claim("lung", "ha", "2.25.10", "j4", {}).claimed          # requested: claimable
    # force: the done one too
    assert [r["studyId"] for r in records.request_rerun("lung", ["2.25.12"], force=True)] == ["2.25.12"]
    assert records.claim("lung", "hc", "2.25.12", "j5", {}).claimed
    assert records.request_rerun("lung", ["2.25.12"], force=True) == []      # being exported: left alone


@pytest.mark.parametrize("workers", [8])
def test_concurrent_workers_on_one_study_only_one_exports(db_url, records, workers):
    barrier = threading.Barrier(workers)
    outcomes: list[str] = []

    def work(n: int) -> None:
        own = open_records(db_url)   # each worker its own connections
        try:
            barrier.wait()
            outcomes.append(own.claim("lung", "race", "2.25.7", f"job-{n}", {}).outcome)
        finally:
            own.dispose()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["busy"] * (workers - 1) + ["claimed"]
    # a failed study re-claimed by many at once: still one
    row = records.find("lung", "2.25.7")
    records.finish(row["id"], row["claim"], ExportStatus.FAILED, started_at=utcnow(), reason="x")
    outcomes.clear()
    barrier.reset()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["busy"] * (workers - 1) + ["claimed"]


def test_extracts_are_recorded(records):
    when = dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC)
    records.record_extract("lung", when, "/x/lung/all_extracts/2026-12-02t10-00-00", 3, {"local": "done"})
    listed = records.extracts("lung")
    assert listed[0]["extractTime"] == when.isoformat() and listed[0]["studies"] == 3
    assert records.summary("lung")["lastExtract"]["id"] == listed[0]["id"]


def test_an_unusable_database_is_a_clear_error_without_the_password(tmp_path):
    with pytest.raises(RecordsError, match=r"127\.0\.0\.1:1/x") as caught:
        open_records("postgresql://someone:s3cret-pw@127.0.0.1:1/x")
    assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(RecordsError, match="DICOMFLOW_DB_URL"):
        open_records("nosuchdb://x")
