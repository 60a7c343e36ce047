"""Several repack processes at once on files of the same patient: no lost update, no torn file."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from dicomflow.repack import atomicfs
from tests.support.repack_dicom import make_instance

CTX = multiprocessing.get_context("fork")


def test_concurrent_commands_on_one_patient_lose_no_study(tmp_path):
    studies = [f"1.2.826.0.9.{s}" for s in range(6)]
    sources = []
    for s, study in enumerate(studies):
        for i in range(4):
            sources.append(make_instance(tmp_path / "in" / f"{s}-{i}.dcm", PatientID="SAMEPATIENT",
                                         study_uid=study, series_uid=f"{study}.1", InstanceNumber=str(i + 1)))
    data, log = tmp_path / "data", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-m", "dicomflow.repack", "--xcrdir", str(src.parent), "--xcrfile",
                               src.name, "--datadir", str(data), "--logdir", str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for src in sources]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()

    patient = json.loads((log / "patientData" / "SAMEPATIENT.json").read_text())
    assert sorted(patient["SAMEPATIENT"]["StudyList"]) == studies
    for path in log.rglob("*.json"):
        json.loads(path.read_text())  # every log file whole
    assert len(list(log.glob("seriesData/*-img/*.json"))) == len(sources)
    assert len(list(data.rglob("*.dcm"))) == len(sources)
    for study in studies:
        for name in (f"studyData/{study}-meta.json", f"studyData/{study}-series/{study}.1-meta.json",
                     f"seriesData/{study}.1-meta.json", f"seriesData/{study}.1-pack.json"):
            assert (log / name).is_file(), name
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files left behind"


def _add_items(path: str, worker: int, count: int, start) -> None:
    start.wait()
    for i in range(count):
        atomicfs.update_json_locked(path, lambda doc, item=f"{worker}-{i}": {"items": [*(doc or {"items": []})["items"],
                                                                                    item]})


def test_locked_updates_are_never_lost_and_readers_never_see_a_torn_file(tmp_path):
    path = str(tmp_path / "patient.json")
    workers, count = 6, 60
    start = CTX.Barrier(workers + 1)
    procs = [CTX.Process(target=_add_items, args=(path, w, count, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    start.wait()
    reads = 0
    while any(p.is_alive() for p in procs):
        try:
            with open(path) as file:
                json.loads(file.read())  # a torn file would raise here
            reads += 1
        except FileNotFoundError:
            pass
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    items = json.loads(Path(path).read_text())["items"]
    assert len(items) == workers * count and len(set(items)) == workers * count
    assert reads > 0
    assert sorted(os.listdir(tmp_path)) == [".patient.json.lock", "patient.json"]


def _write_once(path: str, worker: int, start, results) -> None:
    start.wait()
    results.put((worker, atomicfs.write_once(path, f'{{"writer": {worker}}}'.encode())))


def test_write_once_has_exactly_one_winner(tmp_path):
    for attempt in range(5):
        path = str(tmp_path / f"meta-{attempt}.json")
        start, results = CTX.Barrier(8), CTX.Queue()
        procs = [CTX.Process(target=_write_once, args=(path, w, start, results)) for w in range(8)]
        for proc in procs:
            proc.start()
        outcome = dict(results.get(timeout=30) for _ in procs)
        for proc in procs:
            proc.join(30)
        winners = [w for w, won in outcome.items() if won]
        assert len(winners) == 1
        assert json.loads(Path(path).read_text()) == {"writer": winners[0]}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_place_file_never_shows_a_partial_file(tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(8 << 20))
    dst = tmp_path / "out" / "big.bin"
    dst.parent.mkdir()
    proc = CTX.Process(target=lambda: [atomicfs.place_file(str(src), str(dst), False) for _ in range(10)])
    proc.start()
    seen = 0
    deadline = time.monotonic() + 30
    while proc.is_alive() and time.monotonic() < deadline:
        if dst.exists():
            assert dst.stat().st_size == src.stat().st_size
            seen += 1
    proc.join(30)
    assert proc.exitcode == 0 and dst.read_bytes() == src.read_bytes()
    assert sorted(os.listdir(dst.parent)) == ["big.bin"]
