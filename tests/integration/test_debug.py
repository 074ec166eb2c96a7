"""Headscale's /debug endpoints on the metrics listener, judged with official clients:
/debug/ping gets an answer from a connected node, and /metrics counts its map session."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server import http_get_from
from tests.integration.versions import PINNED
from tests.integration.world import World

pytestmark = pytest.mark.integration

METRICS = "http://127.0.0.1:9090"  # the harness's metrics_listen_addr, in the server's netns


def test_debug_ping_and_metrics_with_official_clients(world: World) -> None:
    world.start_server()
    clients = [world.join(f"pg{i}", v) for i, v in enumerate((PINNED[0], PINNED[-1]))]
    host = world.server_host
    status, body = http_get_from(host, METRICS + "/debug/batcher", timeout=10)
    assert status == 200 and b"Summary: 2 connected, 2 total" in body, body  # the text form
    for ts in clients:
        name = ts.status_json()["Self"]["HostName"]
        status, page = http_get_from(host, f"{METRICS}/debug/ping?node={name}", timeout=40)
        assert status == 200 and b'class="result ok"' in page, page.decode(errors="replace")

    status, text = http_get_from(host, METRICS + "/metrics", timeout=10)
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    sessions = fams["pyheadscale_map_sessions"].samples[0].value
    assert sessions == 2
    generated = {s.labels["response_type"]: s.value
                 for s in fams["headscale_mapresponse_generated"].samples}
    assert generated["full"] >= 2 and generated["ping"] >= 2
