"""A series' progress record in Redis (dicomflow/chris/progress.py), on a real redis-server:
what the store and register steps count, what they keep, and for how long."""

from __future__ import annotations

import time

from dicomflow.chris import progress as progress_module
from dicomflow.chris.progress import INDEX_KEY, PROGRESS_TTL, SeriesProgress, SeriesState, series_progress

FOLDER = "SERVICES/PACS/PACS1/1449c1d-anonymized-20090701/MR-Brain-98edede8b2-20130308/00005-SAG-a27cf06"


def _keys(record: SeriesProgress) -> list[str]:
    return [*record._all, f"{progress_module._KEYS}series-pacs:{record.series_uid}"]


def test_the_first_instance_starts_the_push_and_the_record(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    before = time.time()
    count, new, info = record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, 192)

    assert (count, new) == (1, True)
    assert info["pacs_name"] == "PACS1" and info["path"] == FOLDER and info["announced"] == "192"
    assert info["state"] == SeriesState.RECEIVING.value
    assert len(info["attempt"]) == 26   # a ULID naming this push
    assert before <= float(info["updatedAt"]) <= time.time()
    assert connection.zscore(INDEX_KEY, "PACS1/1.2.3") == float(info["updatedAt"])
    assert connection.smembers(f"{progress_module._KEYS}series-pacs:1.2.3") == {b"PACS1"}


def test_the_same_sop_again_is_not_new_and_the_push_keeps_its_attempt(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    _, _, first = record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, None)
    count, new, again = record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, None)
    count2, new2, info = record.stored("orthanc-2", "1.2.3.2", "PACS1", FOLDER, None)

    assert (count, new) == (1, False)
    assert (count2, new2) == (2, True)
    assert again["attempt"] == first["attempt"] == info["attempt"]
    assert "announced" not in info


def test_registrations_are_counted_and_clear_an_earlier_error(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    for n in (1, 2, 3):
        record.stored(f"orthanc-{n}", f"1.2.3.{n}", "PACS1", FOLDER, 3)
    record.failed("orthanc-2", "CUBE answered 500")
    assert record.counts() == (3, 0, 1)

    assert record.registered("orthanc-1", "1.2.3.1") == 1
    assert record.registered("orthanc-2", "1.2.3.2") == 2
    assert record.registered("orthanc-2", "1.2.3.2") == 2   # a retry counts once
    assert record.counts() == (3, 2, 0)
    assert record.pending(["orthanc-1", "orthanc-2", "orthanc-3"], registration=True) == ["orthanc-3"]
    shown = series_progress(connection, "PACS1", "1.2.3")
    assert shown is not None and (shown["stored"], shown["registered"], shown["errors"]) == (3, 2, {})


def test_every_key_of_the_record_expires_a_week_after_its_last_change(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, 2)
    record.failed("orthanc-2", "unreadable")
    record.registered("orthanc-1", "1.2.3.1")
    for key in _keys(record):
        assert connection.exists(key), key
        assert PROGRESS_TTL - 5 <= connection.ttl(key) <= PROGRESS_TTL, key


def test_the_index_of_recent_series_keeps_the_newest(connection, monkeypatch):
    monkeypatch.setattr(progress_module, "INDEX_LENGTH", 3)
    for n in range(5):
        SeriesProgress(connection, "PACS1", f"1.2.{n}").stored(f"o{n}", f"1.2.{n}.1", "PACS1", FOLDER, None)
        time.sleep(0.002)
    SeriesProgress(connection, "PACS1", "1.2.0").registered("o0", "1.2.0.1")   # touched last

    assert [m.decode() for m in connection.zrevrange(INDEX_KEY, 0, -1)] == ["PACS1/1.2.0", "PACS1/1.2.4", "PACS1/1.2.3"]


def test_finishing_a_push_closes_its_attempt_and_keeps_the_record(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    _, _, first = record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, 1)
    record.registered("orthanc-1", "1.2.3.1")
    record.finish(1)

    info = record.info()
    assert info["state"] == SeriesState.DONE.value and info["attempted"] == "1" and "attempt" not in info
    assert PROGRESS_TTL - 5 <= connection.ttl(record.info_key) <= PROGRESS_TTL
    _, _, again = record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, 1)   # the series re-sent
    assert again["attempt"] != first["attempt"]


def test_a_series_registered_then_grown_says_so(connection):
    record = SeriesProgress(connection, "PACS1", "1.2.3")
    record.stored("orthanc-1", "1.2.3.1", "PACS1", FOLDER, None)
    record.series_registered(1)
    assert record.info()["state"] == SeriesState.REGISTERED.value and record.info()["registeredCount"] == "1"
    record.grown(2)
    info = record.info()
    assert info["state"] == SeriesState.GROWN.value and info["grown"] == "2"
    record.series_registered(3)
    assert "grown" not in record.info()
