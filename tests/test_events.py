"""What a worker receives as its `event`: the event without its headers, a fresh copy each time."""

from __future__ import annotations

import pytest

from dicomflow.events import Event

EVENTS = [
    {"level": "instance", "headers": {"SOPInstanceUID": "1.2.3", "PatientID": "P"},
     "orthanc": {"instance": "8c71dce7-18b5a29b-a0c56856-48d9abf0-0dd1f7d9", "series": "s", "study": "t",
                 "patient": "p"},
     "remoteAet": "STORESCU", "remoteIp": "127.0.0.1", "calledAet": None,
     "transferSyntax": "1.2.840.10008.1.2.1", "receivedAt": 1795758007.5},
    {"level": "series", "headers": {"SeriesInstanceUID": "1.2"},
     "orthanc": {"series": "s", "instances": ["i1", "i2"]}, "replay": True},
    {"level": "study", "headers": {"StudyInstanceUID": "1"}, "orthanc": {"study": "t"},
     "pluginVersion": "2", "extra": {"nested": [1, {"deep": "x"}]}},
]


@pytest.mark.parametrize("raw", EVENTS, ids=["instance", "series", "study-with-extra-fields"])
def test_the_context_is_the_event_as_pydantic_dumps_it_without_headers(raw):
    event = Event.model_validate(raw)
    assert event.context() == event.model_dump(mode="json", exclude={"headers"})
    assert "headers" not in event.context()


def test_each_context_is_a_copy_a_callback_cannot_change_for_the_jobs():
    event = Event.model_validate(EVENTS[1])
    seen_by_callbacks = event.context()
    seen_by_callbacks["orthanc"]["instances"].append("i3")
    seen_by_callbacks["orthanc"]["series"] = "changed"
    study = Event.model_validate(EVENTS[2])
    changed = study.context()
    changed["extra"]["nested"][1]["deep"] = "changed"
    assert event.context()["orthanc"] == {"series": "s", "instances": ["i1", "i2"]}
    assert study.context()["extra"] == {"nested": [1, {"deep": "x"}]}
