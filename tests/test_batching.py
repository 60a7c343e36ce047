"""`batchSize`: instances of one series from one sender share a job (scheduler/batching.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from rq.job import Job

from dicomflow.service import JobSpec
from tests.support.services import job, make_service
from tests.test_scheduler import instance_event, post


def test_batch_size_is_for_instance_jobs_and_bounded():
    base = {"jobName": "j", "worker": "p.worker"}
    assert JobSpec.model_validate(base).batchSize == 1
    assert JobSpec.model_validate({**base, "batchSize": 8}).batchSize == 8
    with pytest.raises(ValidationError, match="batchSize applies to instance jobs"):
        JobSpec.model_validate({**base, "batchSize": 4, "triggerLevel": "series"})
    for wrong in (0, 257, "many"):
        with pytest.raises(ValidationError):
            JobSpec.model_validate({**base, "batchSize": wrong})


def events_of(series: str, count: int, aet: str = "TEST", start: int = 0) -> list[dict]:
    return [{**instance_event(f"{series}.{i}", SeriesInstanceUID=series), "remoteAet": aet}
            for i in range(start, start + count)]


def test_instances_of_a_series_share_jobs_of_at_most_batch_size(make_client, services, connection):
    make_service(services, "b", [job("bJob", "b", batchSize=3), job("single", "b")])
    a, b = events_of("1.9.1", 7), events_of("1.9.2", 2)
    mixed = [a[0], b[0], a[1], a[2], a[3], b[1], a[4], a[5], a[6]]
    results = post(make_client(), *mixed)
    assert [r["status"] for r in results] == ["scheduled"] * 9
    # A job of its own per instance for the job without batchSize.
    assert len({r["jobs"]["single"] for r in results}) == 9
    by_job: dict[str, list[str]] = {}
    for event, result in zip(mixed, results):
        by_job.setdefault(result["jobs"]["bJob"], []).append(event["headers"]["SOPInstanceUID"])
    # Series 1.9.1: 3 + 3 + 1 in arrival order; series 1.9.2: one job of 2.
    assert sorted(by_job.values()) == [["1.9.1.0", "1.9.1.1", "1.9.1.2"], ["1.9.1.3", "1.9.1.4", "1.9.1.5"],
                                       ["1.9.1.6"], ["1.9.2.0", "1.9.2.1"]]
    for job_id, sops in by_job.items():
        rq_job = Job.fetch(job_id, connection=connection)
        batch = rq_job.kwargs["batch"]
        assert [item["headers"]["SOPInstanceUID"] for item in batch] == sops
        assert [item["event"]["orthanc"]["instance"] for item in batch] == [
            next(e for e in mixed if e["headers"]["SOPInstanceUID"] == sop)["orthanc"]["instance"] for sop in sops]
        # Each item carries what its own callback added; the job's own keywords are its first item's.
        assert [item["added_params"]["bJob"]["sop"] for item in batch] == sops
        assert rq_job.kwargs["headers"]["SOPInstanceUID"] == sops[0]
        assert len(rq_job.meta["events"]) == len(sops) and rq_job.get_status() == "queued"
    assert connection.llen("rq:queue:default") == 9 + 4


def test_other_senders_and_services_are_not_mixed(make_client, services, connection):
    make_service(services, "b", [job("bJob", "b", batchSize=10)])
    make_service(services, "c", [job("cJob", "c", batchSize=10)])
    results = post(make_client(), *events_of("1.9.3", 2, aet="SITE_A"), *events_of("1.9.3", 2, aet="SITE_B", start=2))
    assert len({r["jobs"]["bJob"] for r in results}) == 2 and len({r["jobs"]["cJob"] for r in results}) == 2
    assert results[0]["jobs"]["bJob"] == results[1]["jobs"]["bJob"] != results[2]["jobs"]["bJob"]
    assert not {r["jobs"]["bJob"] for r in results} & {r["jobs"]["cJob"] for r in results}


def test_a_copy_resent_while_its_batch_is_queued_is_a_duplicate(make_client, services, connection):
    make_service(services, "b", [job("bJob", "b", batchSize=4)])
    client = make_client()
    first = post(client, *events_of("1.9.4", 4))
    again = post(client, *[{**e, "receivedAt": 99.0} for e in events_of("1.9.4", 4)])
    assert [r["status"] for r in again] == ["duplicate"] * 4
    assert {r["jobs"]["bJob"] for r in again} == {r["jobs"]["bJob"] for r in first}
    assert connection.llen("rq:queue:default") == 1


def test_a_dependent_job_waits_for_the_batch_of_its_instance(make_client, services, connection):
    make_service(services, "b", [job("bJob", "b", batchSize=4), job("after", "b", dependsOn="bJob")])
    results = post(make_client(), *events_of("1.9.5", 3))
    batch_id = results[0]["jobs"]["bJob"]
    assert {r["jobs"]["bJob"] for r in results} == {batch_id}
    for result in results:
        dependent = Job.fetch(result["jobs"]["after"], connection=connection)
        assert dependent.get_status() == "deferred" and dependent.dependency_ids == [batch_id]
    assert connection.lrange("rq:queue:default", 0, -1) == [batch_id.encode()]
