"""Two Orthanc receivers (two sites: own storage, AE title, ports, name, password), one scheduler:
each event names the Orthanc that holds its instance (`orthanc.server`, its `Name`), and workers
fetch from that one (ORTHANC_URL for their own, ORTHANC_URLS for the others).

The same instance sent to both sites is two deliveries by design (a push is per sender and
receiver): both are planned, each site's series push completes with the files that site holds.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import requests

from dicomflow.errors import OrthancError
from dicomflow.events import Event
from dicomflow.orthanc_config import write_config
from dicomflow.settings import Settings
from tests.support.orthanc import OrthancServer, write_series
from tests.support.procs import wait_for
from tests.support.remote_workers import fetches, open_to_hosts
from tests.support.services import job, make_service
from tests.support.stack import TOKEN, Pipeline, diagnostics
from worker.dicomcache import DicomCache

INSTANCE_WORKER = '''
import json
import pydicom

def worker(jobName, headers, params, added_params, dcmpath=None, event=None, connection=None, **kwargs):
    sop = str(pydicom.dcmread(dcmpath, stop_before_pixels=True).SOPInstanceUID)
    connection.rpush("sites:instances", json.dumps({"sop": sop, "expected": headers["SOPInstanceUID"],
                                                    "server": event["orthanc"].get("server"),
                                                    "aet": event.get("remoteAet")}))
'''

SERIES_WORKER = '''
import json, os
import pydicom

def worker(jobName, headers, params, added_params, dcmpath=None, event=None, connection=None, **kwargs):
    sops = sorted(str(pydicom.dcmread(os.path.join(dcmpath, f), stop_before_pixels=True).SOPInstanceUID)
                  for f in os.listdir(dcmpath))
    connection.rpush("sites:series", json.dumps({"series": headers["SeriesInstanceUID"], "sops": sops,
                                                 "server": event["orthanc"].get("server")}))
'''

AN_ID = "0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d"


def test_an_event_names_its_orthanc_by_a_name_not_a_url():
    base = {"level": "instance", "headers": {"SOPInstanceUID": "1.2.3"}, "remoteAet": "MOD"}
    event = Event.model_validate({**base, "orthanc": {"instance": AN_ID, "server": "site-b"}})
    assert event.sender == "MOD@site-b" and event.key == "instance:MOD@site-b:1.2.3"
    assert Event.model_validate({**base, "orthanc": {"instance": AN_ID}}).key == "instance:MOD:1.2.3"
    for bad in ("http://evil.example/", "", "a" * 65, 7):
        with pytest.raises(ValueError, match="orthanc.server"):
            Event.model_validate({**base, "orthanc": {"instance": AN_ID, "server": bad}})


def test_a_worker_refuses_an_orthanc_it_does_not_know_by_name(tmp_path):
    settings = Settings.from_config({"DICOMFLOW_HOME": str(tmp_path), "ORTHANC_URL": "http://127.0.0.1:9",
                                     "ORTHANC_URLS": "site-b=http://u:p%40ss@127.0.0.1:9"})
    cache = DicomCache(settings)
    credentials = base64.b64encode(b"u:p@ss").decode()     # the URL's credentials, unquoted
    assert cache.servers["site-b"] == ("http://127.0.0.1:9", {"Accept-Encoding": "identity",
                                                              "authorization": f"Basic {credentials}"})
    with pytest.raises(OrthancError, match="ORTHANC_URLS"):
        cache.instance(AN_ID, "site-c")


def sops(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def entries(connection, key: str) -> list[dict]:
    return [json.loads(e) for e in connection.lrange(key, 0, -1)]


def named(server: OrthancServer, name: str, folder: Path) -> OrthancServer:
    """Give a (not yet started) Orthanc its site's name, and log its file fetches."""
    server.config["Name"] = name
    write_config(server.config, server.config_path)
    open_to_hosts(server, folder)
    return server


def test_two_sites_deliver_to_one_scheduler_and_workers_fetch_from_the_holder(tmp_path, redis_url, connection):
    services = tmp_path / "services"
    make_service(services, "each", job("eachInstance", "each"), worker_code=INSTANCE_WORKER)
    make_service(services, "whole", job("wholeSeries", "whole", triggerLevel="series"), worker_code=SERIES_WORKER)
    # Site b first: the workers' configuration needs its address (and its own password).
    site_b = OrthancServer(tmp_path / "site-b", aet="SITEB", token=TOKEN, stable_age=2,
                           plugin_options={"RetryMaxDelay": 1.0})
    b_url = f"http://{site_b.username}:{site_b.password}@127.0.0.1:{site_b.http_port}"
    stack = Pipeline(tmp_path / "main", redis_url, services, workers=2, stable_age=2,
                     extra_config={"ORTHANC_NAME": "site-a", "ORTHANC_URLS": f"site-b={b_url}"})
    site_a = named(stack.orthanc, "site-a", tmp_path / "a")
    named(site_b, "site-b", tmp_path / "b")
    site_b.config["Dicomflow"]["SchedulerUrl"] = stack.scheduler_url
    write_config(site_b.config, site_b.config_path)
    only_a, only_b, both = (write_series(tmp_path / name, count) for name, count in
                            (("only-a", 6), ("only-b", 6), ("both", 5)))
    try:
        with stack:
            site_b.start()
            site_a.store(only_a, aet="MODA")
            site_b.store(only_b, aet="MODB")
            site_a.store(both, aet="MODX")
            site_b.store(both, aet="MODX")
            expected = len(only_a) + len(only_b) + 2 * len(both)
            wait_for(lambda: connection.llen("sites:instances") >= expected and connection.llen("sites:series") >= 4,
                     timeout=90, what=f"{expected} instance jobs and 4 series jobs\n{diagnostics(stack)}")
            instances = entries(connection, "sites:instances")
            series = entries(connection, "sites:series")
            a_fetches, b_fetches = fetches(site_a), fetches(site_b)
            a_ids = set(site_a.get("/instances"))
            b_ids = set(site_b.get("/instances"))
            with pytest.raises(requests.HTTPError):  # what site b alone holds, site a has not
                site_a.get(f"/instances/{next(iter(b_ids - a_ids))}")
    finally:
        site_b.stop()
    assert all(e["sop"] == e["expected"] for e in instances), "a worker got another instance's file"
    by_server = Counter((e["server"], e["sop"]) for e in instances)
    assert {sop for server, sop in by_server if server == "site-a"} == sops(only_a) | sops(both)
    assert {sop for server, sop in by_server if server == "site-b"} == sops(only_b) | sops(both)
    assert max(by_server.values()) == 1
    # The same instances sent to both sites: planned twice, once per receiver (two pushes).
    assert Counter(e["sop"] for e in instances if e["sop"] in sops(both)) == {sop: 2 for sop in sops(both)}
    assert sorted((s["server"], len(s["sops"])) for s in series) == sorted(
        [("site-a", len(only_a)), ("site-b", len(only_b)), ("site-a", len(both)), ("site-b", len(both))])
    # Each site was asked only for files it holds (the cache is per host: shared files come once).
    assert {instance for _, instance in a_fetches} <= a_ids
    assert {instance for _, instance in b_fetches} <= b_ids
    assert {instance for _, instance in b_fetches} - a_ids, "no file came from site b"
