"""The metrics listener: /metrics scraped with Prometheus' text parser holds every series a
Headscale 0.29 server exposes (tests/data/headscale-0.29-metrics.json, taken from its
source) with their types and labels, plus pyheadscale's own; /debug/* answers in
Headscale's JSON shapes, leaves secrets out and refuses clients outside private ranges."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyheadscale.app import Server
from pyheadscale.debug import debug_allowed
from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.testclient import connect
from tests.inproc import running_server, server_config
from tests.netutil import free_port

EXPECTED = json.loads((Path(__file__).parents[1] / "data" / "headscale-0.29-metrics.json")
                      .read_text())["series"]
POLICY = {"tagOwners": {"tag:srv": ["alice@"]},
          "acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:22,443"]}],
          "ssh": [{"action": "accept", "src": ["alice@"], "dst": ["autogroup:self"],
                   "users": ["root"]}]}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Server, str]]:
    policy = tmp_path / "policy.hujson"
    policy.write_text(json.dumps(POLICY))
    port = free_port()
    overrides = {"metrics_listen_addr": f"127.0.0.1:{port}",
                 "policy": {"mode": "file", "path": str(policy)},
                 "database": {"postgres": {"pass": "pg-secret-value"}},
                 "cli": {"api_key": "cli-secret-value"}}
    async with running_server(server_config(tmp_path, overrides=overrides)) as srv:
        yield srv, f"http://127.0.0.1:{port}"


async def join(srv: Server) -> tuple[Any, AsyncIterator[dict[str, Any]], int]:
    """A node of alice with an open map stream (its first frame read)."""
    user = srv.tailnet.user_by_name("alice") or await srv.tailnet.create_user("alice")
    _, key = await srv.tailnet.create_preauth_key(user.id, reusable=True)
    machine, node = generate_private_key(), generate_private_key()
    conn = await connect(str(srv.cfg.server_url), machine, capver=113)
    nk = "nodekey:" + public_key(node).hex()
    body = {"Version": 113, "NodeKey": nk, "Auth": {"AuthKey": key},
            "Hostinfo": {"Hostname": "laptop", "RoutableIPs": ["10.9.0.0/24"]}}
    status, _, resp = await conn.request("POST", "/machine/register", orjson.dumps(body))
    assert status == 200, resp
    req = {"Version": 113, "NodeKey": nk, "Stream": True, "Compress": "zstd",
           "KeepAlive": True, "Hostinfo": {"Hostname": "laptop",
                                           "RoutableIPs": ["10.9.0.0/24"]},
           "DiscoKey": "discokey:" + public_key(generate_private_key()).hex()}
    frames = conn.stream_map(orjson.dumps(req)).__aiter__()
    await asyncio.wait_for(frames.__anext__(), 10)
    nid = next(n.id for n in srv.tailnet.nodes.values() if n.hostname == "laptop")
    return conn, frames, nid


async def get(url: str, accept: str = "") -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def get_json(url: str) -> Any:
    status, kind, body = await get(url, "application/json")
    assert status == 200 and kind.startswith("application/json"), (status, body)
    return json.loads(body)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def find(fams: dict[str, Any], name: str) -> Any:
    """The parser names a counter family without its `_total` suffix."""
    return fams.get(name) or fams.get(name.removesuffix("_total"))


async def test_every_headscale_series_is_exposed(served: tuple[Server, str]) -> None:
    srv, base = served
    conn, frames, _ = await join(srv)  # keep `frames`: a collected generator ends the stream
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{srv.cfg.server_url}/api/v1/user") as r:
                assert r.status == 401  # an API call: recorded by the HTTP middleware
        status, kind, text = await get(base + "/metrics")
        assert status == 200 and kind.startswith("text/plain")
    finally:
        await conn.close()
    fams = families(text)
    missing = []
    for series in EXPECTED:
        if series.get("only_with_env"):
            continue
        fam = find(fams, series["name"])
        if fam is None:
            missing.append(series["name"])
            continue
        assert fam.type == series["type"], series["name"]
        for sample in fam.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(series["labels"]), (series["name"], sample)
    assert missing == []
    assert not [n for n in fams if n.endswith("_created")]

    def value(name: str, **labels: str) -> float:
        fam = find(fams, name)
        return sum(s.value for s in fam.samples if s.name.startswith(name.removesuffix("_total"))
                   and not s.name.endswith(("_bucket", "_sum"))
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("headscale_mapresponse_sent_total", status="ok", type="full") >= 1
    assert value("headscale_mapresponse_generated_total", response_type="full") >= 1
    assert value("headscale_nodestore_nodes") == 1
    assert value("headscale_nodestore_operations_total", operation="put") >= 1
    assert value("http_requests_total", endpoint="GET /api/v1/user", status="401") >= 1
    assert value("http_requests_total", endpoint="POST /ts2021", status="101") >= 1
    assert value("http_requests_total", endpoint="POST /machine/register",
                 proto="HTTP/2.0") >= 1
    assert value("process_resident_memory_bytes") > 0
    assert value("process_start_time_seconds") > 0
    # pyheadscale's own
    assert value("pyheadscale_nodes", user="alice") == 1
    assert value("pyheadscale_map_sessions") == 1
    assert find(fams, "pyheadscale_change_delivery_seconds").type == "histogram"
    assert find(fams, "pyheadscale_derp_packets_dropped") is not None
    assert value("pyheadscale_derp_current_connections") == 0


async def test_change_delivery_latency_is_observed(served: tuple[Server, str]) -> None:
    srv, base = served
    conn, frames, nid = await join(srv)
    other = None
    try:
        before = families((await get(base + "/metrics"))[2])
        count0 = sum(s.value for s in find(before, "pyheadscale_change_delivery_seconds").samples
                     if s.name.endswith("_count"))
        other, other_frames, _ = await join(srv)  # a new peer: the first node must hear of it
        await asyncio.wait_for(frames.__anext__(), 10)
        after = families((await get(base + "/metrics"))[2])
        counts = {s.labels["kind"]: s.value
                  for s in find(after, "pyheadscale_change_delivery_seconds").samples
                  if s.name.endswith("_count")}
        assert sum(counts.values()) > count0  # a "peers" or "policy" delta, by timing
    finally:
        await conn.close()
        if other is not None:
            await other.close()


async def test_debug_shapes(served: tuple[Server, str]) -> None:
    srv, base = served
    conn, frames, nid = await join(srv)
    try:
        overview = await get_json(base + "/debug/overview")
        assert overview["nodes"] == {"total": 1, "online": 1, "expired": 0, "ephemeral": 0}
        assert overview["users"] == {"alice": 1} and overview["total_users"] == 1
        assert overview["policy"] == {"mode": "file", "path": str(srv.cfg.policy.path)}
        assert overview["derp"] == {"configured": True, "regions": 1}
        assert isinstance(overview["primary_routes"], int)
        status, kind, text = await get(base + "/debug/overview")
        assert kind.startswith("text/plain") and "Nodes: 1 total" in text

        status, _, raw = await get(base + "/debug/config")
        cfg = json.loads(raw)
        assert {"ServerURL", "Addr", "MetricsAddr", "GRPCAddr", "TrustedProxies", "Node",
                "PrefixV4", "PrefixV6", "IPAllocation", "NoisePrivateKeyPath", "BaseDomain",
                "Log", "DisableUpdateCheck", "Database", "DERP", "TLS", "ACMEURL", "ACMEEmail",
                "DNSConfig", "TailcfgDNSConfig", "UnixSocket", "UnixSocketPermission", "OIDC",
                "LogTail", "Taildrop", "AutoUpdate", "CLI", "Policy", "Tuning"} <= set(cfg)
        assert cfg["ServerURL"] == srv.cfg.server_url
        assert cfg["Node"]["Ephemeral"]["InactivityTimeout"] == 120 * 10**9  # nanoseconds
        assert "Pass" not in cfg["Database"]["Postgres"] and "APIKey" not in cfg["CLI"]
        assert "ClientSecret" not in cfg["OIDC"]
        assert "pg-secret-value" not in raw and "cli-secret-value" not in raw

        status, kind, text = await get(base + "/debug/policy")
        assert status == 200 and json.loads(text) == POLICY
        rules = await get_json(base + "/debug/filter")
        assert rules and all({"SrcIPs", "DstPorts"} <= set(r) for r in rules)
        assert {p["Ports"]["First"] for r in rules for p in r["DstPorts"]} == {22, 443}

        ssh = await get_json(base + "/debug/ssh")
        (key, pol), = ssh.items()
        assert key == f"id:{nid} hostname:laptop givenname:laptop" and pol["rules"]

        derp = await get_json(base + "/debug/derp")
        assert derp["configured"] is True and derp["total_regions"] == 1
        region = derp["regions"]["999"]
        assert region["region_id"] == 999 and region["nodes"][0]["derp_port"] > 0

        store = await get_json(base + "/debug/nodestore")
        node = store[str(nid)]
        assert node["ID"] == nid and node["Hostname"] == "laptop"
        assert node["MachineKey"].startswith("mkey:") and node["NodeKey"].startswith("nodekey:")
        assert node["User"]["Name"] == "alice" and node["IsOnline"] is True
        assert "Hash" not in (node["AuthKey"] or {})

        cache = await get_json(base + "/debug/registration-cache")
        assert cache == {"type": "expirable-lru", "expiration": "15m0s", "max_entries": 1024,
                         "current_len": 0, "status": "active"}
        routes = await get_json(base + "/debug/routes")
        assert set(routes) >= {"available_routes", "primary_routes"}
        manager = await get_json(base + "/debug/policy-manager")
        assert set(manager) == {"content"} and "Policy Manager" in manager["content"]
        batcher = await get_json(base + "/debug/batcher")
        assert batcher == {"connected_nodes": {str(nid): {"connected": True,
                                                          "active_connections": 1}},
                           "total_nodes": 1}
        status, _, text = await get(base + "/debug/mapresponses")
        assert text == "HEADSCALE_DEBUG_DUMP_MAPRESPONSE_PATH not set"
        status, kind, page = await get(base + "/debug/")
        assert status == 200 and "/debug/overview" in page
    finally:
        await conn.close()


async def test_debug_ping_of_nodes_that_cannot_answer(served: tuple[Server, str]) -> None:
    srv, base = served
    _, _, page = await get(base + "/debug/ping?node=no-such-node")
    assert "Node &#x27;no-such-node&#x27; not found." in page
    user = await srv.tailnet.create_user("bob")
    _, key = await srv.tailnet.create_preauth_key(user.id)
    async with aiohttp.ClientSession() as s, s.post(base + "/debug/ping",
                                                    data={"node": ""}) as r:
        assert "No node specified." in await r.text()
    conn, _, nid = await join(srv)
    await conn.close()
    for _ in range(50):
        if not srv.tailnet.bus.subscribed(nid):
            break
        await asyncio.sleep(0.1)
    _, _, page = await get(base + f"/debug/ping?node={nid}")
    assert f"Node {nid} is not connected." in page


@pytest.mark.parametrize(("remote", "allowed"), [
    ("127.0.0.1", True), ("::1", True), ("100.64.1.2", True), ("fd7a:115c:a1e0::5", True),
    ("10.1.2.3", True), ("192.168.1.1", True), ("172.20.0.1", True), ("fd00::1", True),
    ("::ffff:127.0.0.1", True), ("198.51.100.7", False), ("203.0.113.9", False),
    ("2001:db8::1", False), ("", False), ("not-an-ip", False)])
def test_debug_access_rule(remote: str, allowed: bool) -> None:
    assert debug_allowed(remote) is allowed


async def test_derp_relay_counters(tmp_path: Path) -> None:
    """The embedded relay's counters move when it relays (main-port DERP over TLS)."""
    from derp.client import DerpClient
    from derp.keys import generate_private_key as derp_key
    from derp.tls import client_ssl_context, ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    mport = free_port()
    cfg = server_config(tmp_path, scheme="https", overrides={
        "tls_cert_path": str(cert), "tls_key_path": str(key),
        "metrics_listen_addr": f"127.0.0.1:{mport}",
        "derp": {"server": {"verify_clients": False}}})
    async with running_server(cfg) as srv:
        tls = client_ssl_context(cert)
        url = f"https://127.0.0.1:{str(srv.cfg.listen_addr).rpartition(':')[2]}/derp"
        a = await DerpClient.connect(url, derp_key(), ssl=tls)
        b = await DerpClient.connect(url, derp_key(), ssl=tls)
        try:
            for i in range(3):
                a.send(b.public_key, b"packet %d" % i)
                assert (await b.recv_packet(2)).data == b"packet %d" % i
            fams = families((await get(f"http://127.0.0.1:{mport}/metrics"))[2])
        finally:
            await a.close()
            await b.close()

    def value(name: str) -> float:
        return sum(s.value for s in find(fams, name).samples)

    assert value("pyheadscale_derp_packets_received_total") >= 3
    assert value("pyheadscale_derp_packets_sent_total") >= 3
    assert value("pyheadscale_derp_current_connections") == 2
    assert value("pyheadscale_derp_accepts_total") >= 2
    assert value("http_requests_total") >= 2  # the two /derp upgrades, counted by the door


@pytest.mark.parametrize(("kinds", "ping", "expected"), [
    (["FULL", "NODE_PATCH"], False, "full"), (["POLICY", "NODE_ADDED"], False, "policy"),
    (["NODE_ADDED"], False, "peers"), (["NODE_REMOVED", "NODE_PATCH"], False, "peers"),
    (["NODE_PATCH"], False, "patch"), (["NODE_ONLINE"], False, "patch"),
    (["DNS"], False, "config"), (["DERP"], False, "config"), (["SELF"], True, "ping"),
    (["SELF"], False, "self")])
def test_response_types_follow_headscale(kinds: list[str], ping: bool, expected: str) -> None:
    """Headscale's Change.Type() categories for mapresponse_generated_total."""
    from pyheadscale.mapper.delta import BatchView
    from pyheadscale.metrics import response_type
    from pyheadscale.state.changes import Change, ChangeKind

    batch = [Change(ChangeKind[k], 1) for k in kinds]
    assert response_type(BatchView.of(batch).kinds, ping=ping) == expected
