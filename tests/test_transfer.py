"""The HTTP client under the engine: keep-alive reuse, and what happens when the server drops idle connections."""
from __future__ import annotations

import json

from hpcstage.transfer import Http, RetryPolicy


def test_a_keep_alive_connection_closed_by_the_server_is_replaced_without_a_retry(hub):
    # attempts=1: any retry would raise, so only the silent reconnect can make the second request succeed
    http = Http({}, retry=RetryPolicy(attempts=1, budget=5))
    url = f"{hub.url}/api/models/demo-org/tiny-model"
    first = http.request("GET", url)
    assert first.status == 200 and json.loads(first.read())["id"] == "demo-org/tiny-model"
    first.release_conn()
    assert sum(len(idle) for idle in http._idle.values()) == 1  # kept for the next request
    for listener in hub._listeners:  # the server closes every idle keep-alive connection
        listener.close_connections(timeout=5)
    second = http.request("GET", url)
    assert second.status == 200 and json.loads(second.read())["id"] == "demo-org/tiny-model"
    second.release_conn()
    assert [r.path for r in hub.log].count("/api/models/demo-org/tiny-model") == 2


def test_a_half_read_body_closes_its_connection_instead_of_reusing_it(hub):
    http = Http({})
    files = hub.files_of("model", "demo-org/tiny-model")
    path, info = max(((p, f) for p, f in files.items() if f.sha256 is None), key=lambda kv: kv[1].size)  # no redirect
    assert info.size > 10
    resp = http.request("GET", f"{hub.url}/demo-org/tiny-model/resolve/main/{path}")
    assert resp.status == 200 and len(resp.read(10)) == 10
    resp.release_conn()
    assert sum(len(idle) for idle in http._idle.values()) == 0
    again = http.request("GET", f"{hub.url}/demo-org/tiny-model/resolve/main/{path}")
    assert len(again.read()) == info.size
    again.release_conn()
