"""The scheduler's OpenAPI document lists every /api/v1 route the app serves, and nothing else."""

from __future__ import annotations

import json
import re

from tests.support.services import AUTH


def test_every_api_route_and_method_is_documented_and_nothing_else(make_client):
    client = make_client()
    app = client.application
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") or rule.rule == "/health":
            path = re.sub(r"<(?:[a-z]+:)?[A-Za-z_]+>", "{}", rule.rule)
            served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    document = client.get("/api/v1/openapi.json").get_json()
    documented = {(re.sub(r"\{[A-Za-z_]+\}", "{}", path), method)
                  for path, methods in document["paths"].items() for method in methods}
    assert served == documented, {"undocumented": sorted(served - documented),
                                  "not served": sorted(documented - served)}
    json.dumps(document)  # and it is JSON
    assert client.get("/api/v1/openapi.json", headers=AUTH).status_code == 200
