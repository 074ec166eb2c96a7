"""Official clients against pyheadscale's DERP relays and STUN server .

Every test builds its own topology of network namespaces (UDP dropped between
clients with iptables, TCP to the relay left open), so tests are independent and their
namespaces never collide. Each pinned client version runs in several scenarios: the pairs
below give every version two partners, and the single-topology tests run one node per version.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.public import PrivateKey

from tests.integration import build_clients, versions
from tests.integration.derp_helpers import (
    REGION_CODE,
    REGION_ID,
    StandaloneDerp,
    Tailnet,
    derp_connect,
    derp_report,
    firewall_nat,
    http_get,
    node_private_key,
    ping_paths,
    ping_until_direct,
    pong_paths,
    run_with_hosts,
    serve_http,
    wait_home,
    wait_peer,
)
from tests.integration.netns import Host, Topology
from tests.integration.server import make_test_ca
from tests.integration.tailscale import Tailscaled

pytestmark = pytest.mark.integration

V80, V92, V102 = versions.PINNED
# Pairs mixing versions: each pinned version appears on both ends of some pair.
PAIRS = [(V80, V92), (V92, V102), (V102, V80)]
DERP_PATH = f"DERP({REGION_CODE})"


@pytest.fixture
def tailnets(topology: Topology, workdir: Path) -> Iterator[Callable[..., Tailnet]]:
    """`make(host, **kw)` -> a seeded, started Tailnet; servers stopped at teardown."""
    made: list[Tailnet] = []

    def make(host: Host, **kwargs: Any) -> Tailnet:
        tn = Tailnet(host, workdir / f"tn{len(made)}", **kwargs)
        made.append(tn)
        return tn

    yield make
    for tn in reversed(made):
        tn.close()


@pytest.fixture(scope="session")
def derpprobe() -> Path:
    """Tailscale's cmd/derpprobe at the newest pinned version (built if missing)."""
    try:
        return build_clients.ensure(versions.newest(), ["derpprobe"]) / "derpprobe"
    except build_clients.BuildError as exc:
        pytest.fail(f"derpprobe unavailable: {exc}", pytrace=False)


def _pings_or_none(ts: Tailscaled, target: str) -> tuple[list[str], str]:
    """One short `tailscale ping` round: (pong paths, output); [] when nothing answered."""
    res = ts.ping(target, count=3, timeout=3, until_direct=False)
    out = res.stdout + res.stderr
    return pong_paths(out), out


def _ids(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


# -- 1. UDP blocked: DERP relays ping and TCP ----------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=_ids)
def test_udp_blocked_nodes_talk_via_derp(
    pair: tuple[str, str],
    topology: Topology,
    tailnets: Callable[..., Tailnet],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """UDP between the nodes is dropped (STUN to the server still works); in the pairs with
    v1.80, node a also drops all other UDP. DERP (TLS over TCP) still carries disco pings and
    TCP streams both ways."""
    tn = tailnets(topology.add_server_host())
    a_host, b_host = topology.add_host("a"), topology.add_host("b")
    topology.block_udp(a_host, b_host)
    if V80 in pair:
        topology.block_udp_outside(a_host)
    a = tailscaled_factory(a_host, pair[0], ssl_cert_file=tn.ca_file)
    b = tailscaled_factory(b_host, pair[1], ssl_cert_file=tn.ca_file)
    ip_a, ip_b = tn.join(a), tn.join(b)
    wait_peer(a, ip_b)
    wait_peer(b, ip_a)

    for src, dst_ip in ((a, ip_b), (b, ip_a)):
        paths, out = ping_paths(src, dst_ip, count=3)
        assert paths and all(p == DERP_PATH for p in paths), out

    token = secrets.token_hex(8)
    serve_http(a_host, ip_a, 8080, token)
    serve_http(b_host, ip_b, 8080, token)
    # The answer names the caller's tailnet address: the stream crossed the tailnet.
    assert http_get(a_host, f"http://{ip_b}:8080/") == f"{token} {ip_a}"
    assert http_get(b_host, f"http://{ip_a}:8080/") == f"{token} {ip_b}"

    # Still relayed: the UDP blocks left no direct path to be found meanwhile.
    for ts, peer_ip in ((a, ip_b), (b, ip_a)):
        peer = wait_peer(ts, peer_ip)
        assert not peer.get("CurAddr"), peer
        assert peer.get("Relay") == REGION_CODE, peer


# -- 2. NAT traversal: STUN-learned endpoints, direct path -----------------------------------


def test_nat_traversal_ends_direct_via_stun_endpoints(
    topology: Topology,
    tailnets: Callable[..., Tailnet],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """One node per pinned version, each behind its own NAT router (separate LAN subnets).
    Their only way to learn the routers' public addresses is our STUN server; every pair
    then ends on a direct path to the peer router's public address."""
    tn = tailnets(topology.add_server_host())
    nodes: list[tuple[Tailscaled, Host, str]] = []
    for i, version in enumerate(versions.PINNED):
        nat = topology.add_nat(f"nat{i}", lan_subnet=f"192.0.2.{64 * i}/26")
        firewall_nat(nat)
        host = topology.add_lan_host(nat, f"n{i}")
        ts = tailscaled_factory(host, version, ssl_cert_file=tn.ca_file)
        nodes.append((ts, host, nat.wan_ip))
    ips = [tn.join(ts) for ts, _, _ in nodes]

    for (ts, _, wan_ip), ip in zip(nodes, ips, strict=True):
        # magicsock logs "endpoints changed: <ip:port> (stun), <lan ip:port> (local)".
        stun_ep = re.compile(rf"endpoints changed: .*{re.escape(wan_ip)}:(\d+) \(stun\)")
        assert stun_ep.search(ts.log_text()), f"{ts!r}: no STUN endpoint\n{ts.log_tail()}"
        for other, _, _ in nodes:
            if other is not ts:
                wait_peer(other, ip)

    for i, (ts, _, _) in enumerate(nodes):
        peer_ts, _, peer_wan = nodes[(i + 1) % len(nodes)]
        path, out = ping_until_direct(ts, ips[(i + 1) % len(nodes)])
        assert path.rsplit(":", 1)[0] == peer_wan, f"{ts!r} -> {peer_ts!r}: {out}"
        # The peer's STUN-learned endpoint, as published through the control server.
        st = wait_peer(ts, ips[(i + 1) % len(nodes)])
        assert st.get("CurAddr") == path, st


# -- 3. netcheck and debug derp --------------------------------------------------------------

# Our region in netcheck's text report: "- <code>: <latency> (<name>)" (cli/netcheck.go).
NETCHECK_REGION = re.compile(
    rf"- +{REGION_CODE}: +(\d+(?:\.\d+)?(?:µs|ms|s))\s+\((?:derp{REGION_ID}, )?"
    r"Headscale Embedded DERP\)"
)


@pytest.mark.parametrize("version", versions.PINNED)
def test_netcheck_and_debug_derp_see_our_region(
    version: str,
    topology: Topology,
    tailnets: Callable[..., Tailnet],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """`tailscale netcheck` (run in the node's namespace, with tailscaled's DERP map) measures
    our region and our STUN server maps the NAT; `tailscale debug derp` (present in every
    pinned version, run inside tailscaled) finds TLS, DERP and STUN working."""
    server_host = topology.add_server_host()
    tn = tailnets(server_host)
    nat = topology.add_nat("nat")
    host = topology.add_lan_host(nat, "n")
    ts = tailscaled_factory(host, version, ssl_cert_file=tn.ca_file)
    tn.join(ts)
    wait_home(ts)

    res = ts.netcheck(json_format=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["UDP"] is True, report
    assert report["PreferredDERP"] == REGION_ID, report
    assert report["RegionLatency"].get(str(REGION_ID), 0) > 0, report
    assert report["GlobalV4"].rsplit(":", 1)[0] == nat.wan_ip, report
    text = ts.netcheck(json_format=False)
    assert text.returncode == 0, text.stderr
    assert NETCHECK_REGION.search(text.stdout), text.stdout
    assert "Nearest DERP: Headscale Embedded DERP" in text.stdout, text.stdout

    rep = derp_report(ts)
    node = server_host.ip
    assert f'Region {REGION_ID} == "{REGION_CODE}"' in rep["Info"], rep
    assert f'Successfully established a DERP connection with node "{node}"' in rep["Info"], rep
    stun = [i for i in rep["Info"] if i.startswith(f'Node "{node}" returned IPv4 STUN response: ')]
    assert len(stun) == 1 and stun[0].rsplit(" ", 1)[1].rsplit(":", 1)[0] == nat.wan_ip, rep
    # The lab has no IPv6 (namespaces have it disabled, the map says IPv6 "none"): the IPv6
    # TCP check fails, and that is the only error. Everything over IPv4 passed.
    assert all("over IPv6" in e for e in rep["Errors"]), rep
    assert not any("TLS" in e or "IPv4" in e for e in rep["Errors"]), rep
    # Expected warnings only: one region in the map, and no plain-HTTP port 80 on the server
    # (the harness keeps it closed so clients go straight to 443).
    for w in rep["Warnings"]:
        assert "single point of failure" in w or "is port 80 blocked" in w, rep


# -- 4-6. two meshed relays in one region; admission; derpprobe --------------------------------


class MeshRegion:
    """Region 999 with two meshed relays: pyheadscale's embedded one (node 999a, first in the
    map) and a standalone `python -m derp` (999b) that admits clients through pyheadscale's
    /verify, refusing when it cannot ask (fail-open off). Both share one mesh key and use
    test-CA certificates, so every client version trusts them.

    The nodes have DNS host names (clients dial the map's IPv4, so they need no DNS) because
    derpprobe's mesh probe compares the TLS SNI with HostName, and Go sends no SNI for an IP
    literal; for the same reason the map has no IPv6 "none" (derpprobe would STUN "none").
    """

    NAMES = ("derp1.test", "derp2.test")

    def __init__(self, topology: Topology, workdir: Path,
                 tailnets: Callable[..., Tailnet]) -> None:
        self.server_host = topology.add_server_host()
        self.relay_host = topology.add_host("relay2")
        srv_ip, relay_ip = self.server_host.ip, self.relay_host.ip
        self.hosts = dict(zip(self.NAMES, (srv_ip, relay_ip), strict=True))
        self.ca = make_test_ca(workdir / "tls", ips=(srv_ip, relay_ip), dns_names=self.NAMES)
        self.mesh_key_file = workdir / "mesh.key"
        self.mesh_key_file.write_text(secrets.token_hex(32) + "\n")
        region = {
            "regionid": REGION_ID, "regioncode": REGION_CODE,
            "regionname": "Headscale Embedded DERP",
            "nodes": [
                {"name": f"{REGION_ID}a", "regionid": REGION_ID, "hostname": self.NAMES[0],
                 "ipv4": srv_ip, "stunport": 3478, "derpport": 8443},
                {"name": f"{REGION_ID}b", "regionid": REGION_ID, "hostname": self.NAMES[1],
                 "ipv4": relay_ip, "stunport": 3478, "derpport": 443},
            ],
        }  # fmt: skip
        paths_file = workdir / "derp-region.yaml"
        paths_file.write_text(yaml.safe_dump({"regions": {REGION_ID: region}}))
        # The standalone relay first: its mesh link retries until the embedded one is up.
        self.relay = StandaloneDerp(
            self.relay_host, workdir / "relay2", self.ca, hostname=self.NAMES[1],
            extra_args=["--mesh-psk-file", str(self.mesh_key_file),
                        "--mesh-with", f"{srv_ip}:8443",
                        "--verify-client-url", f"https://{srv_ip}/verify",
                        "--verify-client-url-fail-open=false"],
            env={"SSL_CERT_FILE": str(self.ca.ca_cert)},
        )  # fmt: skip
        # The embedded relay on its separate listener (derp.server.listen_addr), so a
        # client can be kept off it without losing the control server on 443.
        self.tn = tailnets(self.server_host, ca=self.ca, overrides={"derp": {
            "paths": [str(paths_file)],
            "server": {"automatically_add_embedded_derp_region": False,
                       "listen_addr": "0.0.0.0:8443",
                       "tls_cert_path": str(self.ca.cert), "tls_key_path": str(self.ca.key),
                       "hostname": self.NAMES[0],
                       "mesh_key_path": str(self.mesh_key_file),
                       "mesh_ca_cert_path": str(self.ca.ca_cert),
                       "mesh_with": [f"{relay_ip}:443"]},
        }})  # fmt: skip
        self.embedded_url = f"https://{srv_ip}:8443/derp"
        self.relay_url = f"https://{relay_ip}:443/derp"

    def close(self) -> None:
        self.relay.close()

    def home_on_relay2(self, host: Host) -> None:
        """Refuse `host`'s TCP to the first node, so its DERP client falls over to 999b."""
        host.iptables("-I", "OUTPUT", "-p", "tcp", "-d", self.server_host.ip, "--dport", "8443",
                      "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip

    def derp_peer(self, host: Host) -> str:
        """Which relay `host` holds a DERP connection to: "a", "b" or "" (from `ss`)."""
        out = host.run(["ss", "-tnH", "state", "established"]).stdout
        a = f"{self.server_host.ip}:8443" in out
        b = f"{self.relay_host.ip}:443" in out
        return "a" * a + "b" * b


@pytest.fixture
def mesh_region(
    topology: Topology, workdir: Path, tailnets: Callable[..., Tailnet]
) -> Iterator[MeshRegion]:
    region = MeshRegion(topology, workdir, tailnets)
    yield region
    region.close()


def _wait_derp_peer(region: MeshRegion, host: Host, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = region.derp_peer(host)
        if got == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{host.name}: DERP connections to {got!r}, want {want!r}")


def test_meshed_relays_carry_traffic_between_their_clients(
    mesh_region: MeshRegion,
    topology: Topology,
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """v1.80.3 and v1.102.5 home on the embedded relay, v1.92.5 on the standalone one; UDP
    between the nodes is blocked, so every cross-relay pong crossed the mesh link."""
    region, tn = mesh_region, mesh_region.tn
    e1, s1, e2 = topology.add_host("e1"), topology.add_host("s1"), topology.add_host("e2")
    region.home_on_relay2(s1)
    topology.block_udp(e1, s1)
    topology.block_udp(e2, s1)
    ts_e1 = tailscaled_factory(e1, V80, ssl_cert_file=tn.ca_file)
    ts_s1 = tailscaled_factory(s1, V92, ssl_cert_file=tn.ca_file)
    ts_e2 = tailscaled_factory(e2, V102, ssl_cert_file=tn.ca_file)
    ip_e1, ip_s1, ip_e2 = tn.join(ts_e1), tn.join(ts_s1), tn.join(ts_e2)
    for ts in (ts_e1, ts_s1, ts_e2):
        wait_home(ts)
    _wait_derp_peer(region, e1, "a")
    _wait_derp_peer(region, e2, "a")
    _wait_derp_peer(region, s1, "b")  # admitted by python -m derp through /verify

    for src, dst_ip in ((ts_e1, ip_s1), (ts_s1, ip_e1), (ts_e2, ip_s1), (ts_s1, ip_e2)):
        wait_peer(src, dst_ip)
        paths, out = ping_paths(src, dst_ip, count=3)
        assert paths and all(p == DERP_PATH for p in paths), out
    token = secrets.token_hex(8)
    serve_http(s1, ip_s1, 8080, token)
    assert http_get(e1, f"http://{ip_s1}:8080/") == f"{token} {ip_e1}"
    assert http_get(e2, f"http://{ip_s1}:8080/") == f"{token} {ip_e2}"
    # Still one relay each: the traffic went embedded relay <-> mesh <-> standalone relay.
    assert region.derp_peer(e1) == "a" and region.derp_peer(s1) == "b"


def test_relays_refuse_unknown_node_keys_and_admit_known_ones(
    mesh_region: MeshRegion,
    topology: Topology,
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """A derp.client.DerpClient with a node key the tailnet does not know is refused by the
    embedded relay (verify_clients) and by python -m derp --verify-client-url=<server>/verify;
    the same client with a registered node's key is admitted by both, and so is the real
    tailscaled that owns that key (it homes on the standalone relay and relays a ping)."""
    region, tn = mesh_region, mesh_region.tn
    probe = topology.add_host("probe")
    n, m = topology.add_host("n"), topology.add_host("m")
    region.home_on_relay2(n)
    topology.block_udp(n, m)
    urls = {"embedded": (region.embedded_url, region.server_host.ip),
            "standalone": (region.relay_url, region.relay_host.ip)}

    stranger = PrivateKey.generate().encode()
    for name, (url, sni) in urls.items():
        got = derp_connect(probe, url, stranger, ca_file=tn.ca_file, server_hostname=sni)
        assert got["admitted"] is False, (name, got)
        assert "DerpRejected" in got["error"], (name, got)

    ts_n = tailscaled_factory(n, V102, ssl_cert_file=tn.ca_file)
    ts_m = tailscaled_factory(m, V80, ssl_cert_file=tn.ca_file)
    ip_n, ip_m = tn.join(ts_n), tn.join(ts_m)
    _wait_derp_peer(region, n, "b")
    for src, dst_ip in ((ts_m, ip_n), (ts_n, ip_m)):
        paths, out = ping_paths(src, dst_ip, count=2)
        assert paths and all(p == DERP_PATH for p in paths), out

    known = node_private_key(ts_n)
    for name, (url, sni) in urls.items():
        got = derp_connect(probe, url, known, ca_file=tn.ca_file, server_hostname=sni)
        assert got["admitted"] is True, (name, got)
    # And the stranger is still refused once the tailnet has nodes.
    got = derp_connect(probe, region.relay_url, stranger, ca_file=tn.ca_file,
                       server_hostname=region.relay_host.ip)
    assert got["admitted"] is False, got


def _derpprobe_once(derpprobe: Path, host: Host, hosts: dict[str, str], map_file: Path,
                    mesh_key_file: Path, ca_file: Path) -> tuple[int, set[str], list[str], str]:
    """One `derpprobe --once` over `map_file`: (exit code, good probes, bad lines, output)."""
    out = run_with_hosts(
        host, hosts,
        [str(derpprobe), f"--derp-map=file://{map_file}", "--once", "--spread=false",
         f"--mesh-psk-file={mesh_key_file}"],
        map_file.with_suffix(".hosts"), timeout=120, env={"SSL_CERT_FILE": str(ca_file)},
    )  # fmt: skip
    text = out.stdout + out.stderr
    return (out.returncode, set(re.findall(r"good: ([^:\s]+):", text)),
            re.findall(r"bad: (.*)", text), text)  # fmt: skip


def _client_derp_map(ts: Tailscaled, path: Path) -> dict[str, Any]:
    """The DERP map as a client received it (`tailscale debug derp-map`), also saved to path."""
    res = ts.cli("debug", "derp-map")
    assert res.returncode == 0, res.stderr
    path.write_text(res.stdout)
    return dict(json.loads(res.stdout))


def test_derpprobe_healthy_on_main_port(
    topology: Topology,
    workdir: Path,
    tailnets: Callable[..., Tailnet],
    tailscaled_factory: Callable[..., Tailscaled],
    derpprobe: Path,
) -> None:
    """The relay on the main listener, as Headscale serves it: the DERP map points at
    server_url's port 443 with no certificate pin (the relay shares the control server's
    certificate), and Tailscale's prober finds its TLS, STUN and mesh probes healthy. The
    host name is a DNS name because derpprobe's mesh probe needs SNI."""
    server_host = topology.add_server_host()
    name = "hs.test"
    ca = make_test_ca(workdir / "tls-main", ips=(server_host.ip,), dns_names=(name,))
    mesh_key = workdir / "mesh-main.key"
    mesh_key.write_text(secrets.token_hex(32) + "\n")
    tn = tailnets(server_host, ca=ca, overrides={"derp": {"server": {
        "hostname": name, "mesh_key_path": str(mesh_key)}}})
    host = topology.add_host("prober")
    ts = tailscaled_factory(host, V102, ssl_cert_file=tn.ca_file)
    tn.join(ts)
    map_file = workdir / "derpmap-main.json"
    node = _client_derp_map(ts, map_file)["Regions"][str(REGION_ID)]["Nodes"][0]
    assert node["HostName"] == name and node["DERPPort"] == 443, node
    assert "CertName" not in node, node
    rc, good, bad, text = _derpprobe_once(derpprobe, host, {name: server_host.ip}, map_file,
                                          mesh_key, tn.ca_file)
    assert not bad and rc == 0, f"derpprobe reported problems:\n{text}"
    n = node["Name"]
    want = {f"derp/{REGION_CODE}/{n}/tls", f"derp/{REGION_CODE}/{n}/udp",
            f"derp/{REGION_CODE}/{n}/{n}/mesh"}
    assert want <= good, f"missing {sorted(want - good)}:\n{text}"


def test_derpprobe_reports_region_healthy(
    mesh_region: MeshRegion,
    topology: Topology,
    workdir: Path,
    tailscaled_factory: Callable[..., Tailscaled],
    derpprobe: Path,
) -> None:
    """Tailscale's prober, run once against the DERP map our control server hands out (as a
    client received it: `tailscale debug derp-map`), finds both nodes' TLS and STUN healthy
    and carries its mesh probes between every ordered pair of nodes, across the mesh. It uses
    the region's mesh key, which also lets it past verify_clients (as with derper)."""
    region, tn = mesh_region, mesh_region.tn
    host = topology.add_host("prober")
    ts = tailscaled_factory(host, V102, ssl_cert_file=tn.ca_file)
    tn.join(ts)
    map_file = workdir / "derpmap.json"
    derp_map = _client_derp_map(ts, map_file)
    nodes = [n["Name"] for n in derp_map["Regions"][str(REGION_ID)]["Nodes"]]
    assert nodes == [f"{REGION_ID}a", f"{REGION_ID}b"], derp_map

    def probe_once() -> tuple[int, set[str], list[str], str]:
        return _derpprobe_once(derpprobe, host, region.hosts, map_file,
                               region.mesh_key_file, tn.ca_file)

    rc, good, bad, text = probe_once()
    if bad:
        # The mesh probe gives the sender's relay 100 ms (prober/derp.go) to hear, over the
        # mesh, of a client that just connected to the other relay. The first run on cold
        # Python relays on a busy 2-core machine can miss that window for one cross-relay
        # pair; nothing else may fail, and a second run must be entirely clean.
        cross = re.compile(rf"derp/{REGION_CODE}/(\w+)/(?!\1/)\w+/mesh: .*timeout")
        assert all(cross.match(b) for b in bad), f"derpprobe reported problems:\n{text}"
        rc, good, bad, text = probe_once()
    assert not bad, f"derpprobe reported problems:\n{text}"
    assert rc == 0, f"derpprobe exited {rc}:\n{text}"
    want = {f"derp/{REGION_CODE}/{n}/{kind}" for n in nodes for kind in ("tls", "udp")}
    want |= {f"derp/{REGION_CODE}/{a}/{b}/mesh" for a in nodes for b in nodes}
    assert want <= good, f"missing {sorted(want - good)}:\n{text}"


# -- 7. the self-signed, pinned certificate ------------------------------------------------


def test_pinned_self_signed_certificate(
    topology: Topology,
    tailnets: Callable[..., Tailnet],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """The separate relay listener without derp.server.tls_cert_path: the embedded relay makes
    a self-signed certificate and
    the DERP map pins it (CertName "sha256-raw:<hex>"). Clients >= 1.82 (v1.92.5, v1.102.5)
    connect and relay through it with no CA to trust; v1.102.5's `debug derp` also checks the
    pin. v1.80.3 predates pins: it takes CertName as the TLS server name and fails, which is
    why a deployment with v1.80 clients must configure derp.server.tls_cert_path."""
    tn = tailnets(topology.add_server_host(),
                  overrides={"derp": {"server": {"listen_addr": "0.0.0.0:8443"}}})
    a, b, old = topology.add_host("a"), topology.add_host("b"), topology.add_host("old")
    topology.block_udp(a, b)
    topology.block_udp(a, old)
    topology.block_udp(b, old)
    # No SSL_CERT_FILE for the DERP side: the control server still needs the CA (its own
    # certificate is the test CA's), but the relay's self-signed certificate is in no store.
    ts_a = tailscaled_factory(a, V92, ssl_cert_file=tn.ca_file)
    ts_b = tailscaled_factory(b, V102, ssl_cert_file=tn.ca_file)
    ts_old = tailscaled_factory(old, V80, ssl_cert_file=tn.ca_file)
    ip_a, ip_b = tn.join(ts_a), tn.join(ts_b)
    tn.join(ts_old)

    res = ts_b.cli("debug", "derp-map")
    node = json.loads(res.stdout)["Regions"][str(REGION_ID)]["Nodes"][0]
    assert re.fullmatch(r"sha256-raw:[0-9a-f]{64}", node.get("CertName", "")), node

    for src, dst_ip in ((ts_a, ip_b), (ts_b, ip_a)):
        wait_peer(src, dst_ip)
        paths, out = ping_paths(src, dst_ip, count=3)
        assert paths and all(p == DERP_PATH for p in paths), out

    rep = derp_report(ts_b)
    assert any(i.startswith("Successfully established a DERP connection") for i in rep["Info"]), rep
    assert not any("TLS" in e or "IPv4" in e for e in rep["Errors"]), rep

    # v1.80.3: the TLS handshake to the relay fails (server name "sha256-raw:..." is not in the
    # self-signed certificate), so it never gets a DERP connection.
    old_rep = derp_report(ts_old)
    assert any("to TLS over IPv4" in e for e in old_rep["Errors"]), old_rep
    assert not any(i.startswith("Successfully established") for i in old_rep["Info"]), old_rep
    paths, _ = _pings_or_none(ts_old, ip_b)
    assert paths == [], paths
