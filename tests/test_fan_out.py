"""`fanOut`: one job per item the callback names (e.g. one deid job per project; docs/services.md)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from rq.job import Job

from dicomflow import keys
from dicomflow.service import JobSpec
from tests.support.services import job, make_service
from tests.test_scheduler import instance_event, post

#: Fans out over the comma-separated projects a test writes in the event's StudyDescription.
BY_DESCRIPTION = '''
def callback(jobName, headers, params, added_params, **kwargs):
    text = headers.get("StudyDescription", "")
    if text == "not-a-list":
        return True, {"projects": "a,b"}
    if text == "same-as-text":
        return True, {"projects": [1, "1"]}
    return True, {"projects": [p for p in text.split(",") if p], "note": "kept"}
'''


def test_fan_out_names_a_key_of_a_callback_and_excludes_batches():
    base = {"jobName": "j", "worker": "p.worker", "callback": "p.callback"}
    assert JobSpec.model_validate({**base, "fanOut": "projects"}).fanOut == "projects"
    with pytest.raises(ValidationError, match="fanOut needs a callback"):
        JobSpec.model_validate({"jobName": "j", "worker": "p.worker", "fanOut": "projects"})
    with pytest.raises(ValidationError, match="exclude each other"):
        JobSpec.model_validate({**base, "fanOut": "projects", "batchSize": 4})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, "fanOut": "no spaces"})


def test_one_job_per_item_each_seeing_its_own_and_dependents_wait_for_all(make_client, services, connection):
    make_service(services, "f", [job("fan", "f", sortPosition=1, fanOut="projects"),
                                 job("after", "f", sortPosition=2, dependsOn="fan")],
                 callback_code=BY_DESCRIPTION)
    (result,) = post(make_client(), instance_event("1.7.1", StudyDescription="mr,ct,all"))
    assert result["status"] == "scheduled"
    fanned = {name: jid for name, jid in result["jobs"].items() if name.startswith("fan")}
    assert sorted(fanned) == ["fan[all]", "fan[ct]", "fan[mr]"]
    assert len(set(fanned.values())) == 3
    for name, job_id in fanned.items():
        rq_job = Job.fetch(job_id, connection=connection)
        item = name[len("fan["):-1]
        # its own item only; the rest of what the callback returned is kept
        assert rq_job.kwargs["added_params"]["fan"] == {"projects": [item], "note": "kept"}
        assert rq_job.meta["item"] == item and rq_job.get_status() == "queued"
    after = Job.fetch(result["jobs"]["after"], connection=connection)
    # the dependent sees every item, and waits for every item's job
    assert after.kwargs["added_params"]["fan"]["projects"] == ["mr", "ct", "all"]
    assert after.get_status() == "deferred" and sorted(after.dependency_ids) == sorted(fanned.values())
    assert connection.llen("rq:queue:default") == 3
    # the metrics count every item's job
    assert int(connection.hget(keys.JOBS_ENQUEUED, "f/fan")) == 3
    assert int(connection.hget(keys.JOBS_ENQUEUED, "f/after")) == 1


def test_no_items_is_declined_and_a_wrong_answer_is_a_callback_failure(make_client, services, connection):
    make_service(services, "f", [job("fan", "f", fanOut="projects")], callback_code=BY_DESCRIPTION)
    make_service(services, "g", job("plain", "g"))
    empty, wrong, same = post(make_client(), instance_event("1.7.2", StudyDescription=""),
                              instance_event("1.7.3", StudyDescription="not-a-list"),
                              instance_event("1.7.4", StudyDescription="same-as-text"))
    assert empty["declined"] == ["fan"] and list(empty["jobs"]) == ["plain"]
    # the other service goes on; the failure names the job and says what was expected
    assert list(wrong["jobs"]) == ["plain"]
    [error] = wrong["errors"]
    assert "fan" in error and "fans out over 'projects'" in error and "'a,b'" in error
    # items are named by their text in the event's record (`fan[1]`): 1 and "1" would be one name
    [error] = same["errors"]
    assert "distinct as text" in error and list(same["jobs"]) == ["plain"]
    assert connection.llen("rq:queue:default") == 3
