"""The plugin's REST routes in Orthanc (`/dicomflow/...`) and its button in Orthanc Explorer."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import dicomflow_disk
import orthanc
from dicomflow_relay import Relay

#: Orthanc Explorer: a button on each study and series page that opens that study on the
#: scheduler's status page (STATUS_PAGE is replaced by its address).
_EXPLORER_BUTTON = """
(function () {
  var statusPage = STATUS_PAGE;
  function addLink(page, before, studyOf) {
    $(page).live('pagebeforecreate', function () {
      var link = $('<a>').attr('id', 'dicomflow-status-' + page.substring(1)).attr('data-role', 'button')
        .attr('href', '#').attr('data-icon', 'info').attr('data-theme', 'e')
        .text('dicomflow: what happened to this study');
      link.insertBefore($(before).parent().parent());
      link.click(function () {
        var uuid = $.mobile.pageData && $.mobile.pageData.uuid;
        if (uuid) {
          $.ajax({url: studyOf(uuid), dataType: 'json', cache: false, success: function (study) {
            window.location.href = statusPage + '?q=' + encodeURIComponent(study.MainDicomTags.StudyInstanceUID);
          }});
        }
        return false;
      });
    });
  }
  addLink('#study', '#study-delete', function (id) { return '../studies/' + id; });
  addLink('#series', '#series-delete', function (id) { return '../series/' + id + '/study'; });
})();
"""


def _answer(output: Any, payload: Any) -> None:
    output.AnswerBuffer(json.dumps(payload, indent=1), "application/json")


def register(relay: Relay, guard: Any, retention: Any, status_page: str) -> None:
    """Register the routes (status, the spool's dead letters and retry, the Lua script's stable
    series/studies) and the Explorer button opening `status_page` (empty: the scheduler's address)."""

    def status_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
        else:
            _answer(output, {**relay.status(), **dicomflow_disk.status(guard, retention)})

    def retry_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
        else:
            _answer(output, {"requeued": relay.spool.resurrect()})

    def dead_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
        else:
            limit = int((request.get("get") or {}).get("limit", 100))
            _answer(output, relay.spool.dead_letters(limit))

    def stable_route(output: Any, uri: str, **request: Any) -> None:
        # Called by dicomflow_stable.lua (Orthanc's Lua engine), once per stable series/study.
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
            return
        resource_id = (request.get("body") or b"").decode("ascii", "replace").strip()
        if relay.capture.on_stable(request["groups"][0], resource_id):
            _answer(output, {"queued": request["groups"][0], "id": resource_id})
        else:
            output.SendHttpStatusCode(400)

    orthanc.RegisterRestCallback("/dicomflow/stable/(series|study)", stable_route)
    orthanc.RegisterRestCallback("/dicomflow/status", status_route)
    orthanc.RegisterRestCallback("/dicomflow/spool/retry", retry_route)
    orthanc.RegisterRestCallback("/dicomflow/spool/dead", dead_route)
    if not status_page:
        parts = urllib.parse.urlsplit(relay.settings.scheduler_url)
        status_page = f"{parts.scheme}://{parts.netloc}/"
    orthanc.ExtendOrthancExplorer(_EXPLORER_BUTTON.replace("STATUS_PAGE", json.dumps(status_page)))
