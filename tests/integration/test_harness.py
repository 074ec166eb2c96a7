"""Tests of the integration harness itself: topologies, UDP blocking, official daemons, server.

Everything except test_every_version_reaches_server runs without pyheadscale.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import versions
from tests.integration.netns import Host, Topology, list_netns, root_links, topology
from tests.integration.server import PyHeadscale, http_get_from
from tests.integration.tailscale import Tailscaled

pytestmark = pytest.mark.integration

PY = sys.executable
TCP_PORT = 9000
UDP_PORT = 9001

# Answers each TCP connection with the peer's address and appends that address to a file.
TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
while True:
    c, a = s.accept()
    with open(sys.argv[2], "a") as f:
        f.write(a[0] + "\\n")
    c.sendall(a[0].encode()); c.close()
"""
TCP_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(c.recv(100).decode())
"""
# Echoes each datagram back, prefixed with the sender's address.
UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(2048); s.sendto(a[0].encode() + b" " + d, a)
"""
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
for _ in range(int(sys.argv[3])):
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(2048)[0].decode()); sys.exit(0)
    except TimeoutError:
        pass
sys.exit(1)
"""


def tcp_connect(src: Host, dst: str, timeout: float = 2) -> subprocess.CompletedProcess[str]:
    return src.run([PY, "-c", TCP_CLIENT, dst, str(TCP_PORT), str(timeout)], timeout=timeout + 10)


def udp_echo(src: Host, dst: str, tries: int = 4) -> subprocess.CompletedProcess[str]:
    return src.run([PY, "-c", UDP_CLIENT, dst, str(UDP_PORT), str(tries)], timeout=tries + 10)


def start_servers(host: Host, workdir: Path) -> Path:
    """TCP and UDP echo servers on `host`; returns the file listing TCP peers seen."""
    seen = workdir / f"tcp-peers-{host.name}.txt"
    seen.touch()
    host.popen([PY, "-c", TCP_SERVER, str(TCP_PORT), str(seen)])
    host.popen([PY, "-c", UDP_SERVER, str(UDP_PORT)])
    # Ready when both answer on the host's own loopback.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            tcp_connect(host, "127.0.0.1").returncode == 0
            and udp_echo(host, "127.0.0.1", 1).returncode == 0
        ):
            seen.write_text("")
            return seen
        time.sleep(0.1)
    raise AssertionError(f"echo servers on {host.name} did not come up")


# -- topology ------------------------------------------------------------------------------


def test_topology_teardown_leaves_nothing_even_when_body_raises(netns_ready: None) -> None:
    links_before = set(root_links())
    procs: list[subprocess.Popen[bytes]] = []
    prefix = ""

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with topology() as topo:
            prefix = topo.prefix
            nat = topo.add_nat("nat")
            lan = topo.add_lan_host(nat, "lan")
            pub = topo.add_host("pub")
            topo.public_segment()
            topo.block_udp(lan, pub)
            procs.append(lan.popen(["sleep", "600"]))
            created = [ns for ns in list_netns() if ns.startswith(prefix)]
            assert len(created) == 4, created  # switch, nat, lan, pub
            assert all(len(ns) <= 15 for ns in created)
            raise Boom

    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []
    # Nothing was ever created in the root namespace, and nothing is left there.
    assert set(root_links()) <= links_before
    assert procs[0].poll() is not None, "process in a torn-down namespace still running"


def test_two_topologies_do_not_collide(netns_ready: None) -> None:
    with topology() as a, topology() as b:
        assert a.prefix != b.prefix
        ha = a.add_server_host()
        hb = b.add_server_host()  # same address, separate worlds
        assert ha.ip == hb.ip
        assert ha.run(["ip", "-4", "-o", "addr", "show", "eth0"]).returncode == 0


def test_nat_host_reaches_internet_but_not_the_reverse(topology: Topology, workdir: Path) -> None:
    server = topology.add_server_host()
    nat = topology.add_nat("nat")
    lan = topology.add_lan_host(nat, "lan")
    assert lan.ip.startswith("192.0.2.")
    server_seen = start_servers(server, workdir)
    lan_seen = start_servers(lan, workdir)

    out = tcp_connect(lan, server.ip)
    assert out.returncode == 0, out.stderr
    # The server sees the router's public address: the LAN host is masqueraded.
    assert out.stdout.strip() == nat.wan_ip
    assert server_seen.read_text().split() == [nat.wan_ip]
    udp = udp_echo(lan, server.ip)
    assert udp.returncode == 0 and udp.stdout.split()[0] == nat.wan_ip

    # Inward: neither the LAN address nor the router's public address lead into the LAN.
    for target in (lan.ip, nat.wan_ip):
        res = tcp_connect(server, target, timeout=1)
        assert res.returncode != 0, f"server reached {target}: {res.stdout}"
    assert udp_echo(server, lan.ip, tries=2).returncode != 0
    assert lan_seen.read_text() == ""


def test_public_segments_route_and_namespaces_have_no_way_out(topology: Topology) -> None:
    seg = topology.public_segment()
    a = topology.add_host("a")
    b = topology.add_host("b", seg)
    assert b.ip.startswith("203.0.113.")
    for h in (a, b):
        routes = h.run(["ip", "-4", "route"]).stdout
        # Only the segment and a default route to the switch; the switch has no default route.
        assert "default via" in routes
        fwd = h.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
        assert fwd == "0"
    sw_routes = topology.switch.run(["ip", "-4", "route"]).stdout
    assert "default" not in sw_routes
    assert tcp_connect(a, "192.0.2.77", timeout=1).returncode != 0


def test_a_later_port_leaves_the_gateway_address_alone(
        topology: Topology, workdir: Path) -> None:
    """A host that resolved its gateway keeps reaching other segments through it after a
    host joins whose cable end at the switch has a lower address than any before. (A bridge
    that picks its own address takes the lowest of its ports': the first host's ARP entry
    would then name another port, where the switch's IP layer ignores frames not sent to
    its own address.)"""
    far = topology.add_host("far", topology.public_segment())
    start_servers(far, workdir)
    sw, bridge = topology.switch, topology.internet.bridge

    def ports() -> set[str]:
        out = sw.run(["ip", "-o", "link", "show", "master", bridge]).stdout
        return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}

    def joins(name: str, mac: str) -> Host:
        """A host whose cable end at the switch gets `mac`."""
        before = ports()
        host = topology.add_host(name)
        (port,) = ports() - before
        sw.run(["ip", "link", "set", port, "address", mac], check=True)
        return host

    def bridge_mac() -> str:
        return sw.run(["cat", f"/sys/class/net/{bridge}/address"]).stdout.strip()

    joins("s", "02:00:00:00:00:02")
    a = topology.add_host("a")
    assert tcp_connect(a, far.ip).returncode == 0  # a has resolved the gateway
    mac = bridge_mac()
    joins("b", "02:00:00:00:00:01")
    assert bridge_mac() == mac
    out = tcp_connect(a, far.ip)
    assert out.returncode == 0 and out.stdout.strip() == a.ip, out.stderr


def test_udp_block_switch_blocks_udp_but_not_tcp(topology: Topology, workdir: Path) -> None:
    a = topology.add_host("a")
    b = topology.add_host("b")
    nat = topology.add_nat("nat")
    c = topology.add_lan_host(nat, "c")
    start_servers(b, workdir)

    for src in (a, c):
        assert udp_echo(src, b.ip).returncode == 0
        assert tcp_connect(src, b.ip).returncode == 0

    topology.block_udp(a, b)
    topology.block_udp(c, b)
    for src in (a, c):
        assert udp_echo(src, b.ip, tries=2).returncode != 0, f"UDP {src.name}->b not blocked"
        assert tcp_connect(src, b.ip).returncode == 0, f"TCP {src.name}->b blocked too"

    topology.unblock_udp(a, b)
    assert udp_echo(a, b.ip).returncode == 0
    assert udp_echo(c, b.ip, tries=2).returncode != 0


def test_block_all_udp_from_a_host(topology: Topology, workdir: Path) -> None:
    server = topology.add_server_host()
    a = topology.add_host("a")
    start_servers(server, workdir)
    topology.block_udp_outside(a)
    assert udp_echo(a, server.ip, tries=2).returncode != 0
    assert tcp_connect(a, server.ip).returncode == 0
    # Loopback UDP inside the host is untouched.
    start_servers(a, workdir)
    topology.unblock_udp_outside(a)
    assert udp_echo(a, server.ip).returncode == 0


# -- official daemons ----------------------------------------------------------------------


@pytest.mark.parametrize("version", versions.PINNED)
def test_tailscaled_starts_with_kernel_tun(
    version: str, topology: Topology, tailscaled_factory: Callable[..., Tailscaled]
) -> None:
    host = topology.add_host("c")
    ts = tailscaled_factory(host, version)
    assert ts.tun == "ts0"
    out = ts.cli("version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(version.removeprefix("v"))
    st = ts.status_json()
    assert st["BackendState"] in ("NoState", "NeedsLogin", "Stopped"), st["BackendState"]
    assert st.get("Version", "").startswith(version.removeprefix("v"))
    # The TUN device exists in the host namespace and not in the root namespace.
    assert host.run(["ip", "link", "show", "ts0"]).returncode == 0
    assert "ts0" not in root_links()
    ts.stop()
    assert not ts.running


def test_tailscaled_userspace_and_restart(
    topology: Topology, tailscaled_factory: Callable[..., Tailscaled]
) -> None:
    host = topology.add_host("c")
    ts = tailscaled_factory(host, versions.newest(), userspace=True)
    assert ts.status_json()["BackendState"] in ("NoState", "NeedsLogin", "Stopped")
    first_pid = ts.proc.pid if ts.proc else None
    ts.restart()
    assert ts.running and ts.proc is not None and ts.proc.pid != first_pid
    assert "BackendState" in ts.status_json()
    assert host.run(["ip", "link", "show", "ts0"]).returncode != 0  # no kernel TUN


# -- against pyheadscale -------------------------------------------------------------------

# Lines tailscaled logs when a RegisterRequest got an HTTP answer through the Noise channel
# (control/controlclient/direct.go); a transport failure logs "register request: <err>".
REGISTER_ANSWERED = re.compile(r"RegisterReq: got response|register request: http \d{3}")


def test_every_version_reaches_server(
    topology: Topology,
    workdir: Path,
    pyheadscale_factory: Callable[..., PyHeadscale],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    server_host = topology.add_server_host()
    nat = topology.add_nat("nat")
    server = pyheadscale_factory(server_host)
    assert server.url == "https://198.51.100.1"

    daemons: list[Tailscaled] = []
    for i, version in enumerate(versions.PINNED):
        host = topology.add_lan_host(nat, f"c{i}")
        ca = server.ca_file
        assert ca is not None
        daemons.append(tailscaled_factory(host, version, ssl_cert_file=ca))

    for ts in daemons:
        # /key from the client's namespace, verified against the test CA like the client does.
        status, body = http_get_from(ts.host, f"{server.url}/key?v=113", ca_file=server.ca_file)
        assert status == 200, body
        key = json.loads(body)
        assert re.fullmatch(r"mkey:[0-9a-f]{64}", key["publicKey"])
        assert key["publicKey"] != "mkey:" + "0" * 64

    # A bogus key must be refused, but only after the server answered the register request.
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def up(ts: Tailscaled) -> None:
        results[ts.version] = ts.up(server.url, authkey="bogus", timeout=15)

    threads = [threading.Thread(target=up, args=(ts,)) for ts in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ts in daemons:
        res = results[ts.version]
        assert res.returncode != 0, f"{ts.version}: bogus key accepted: {res.stdout}"
        assert ts.backend_state() != "Running"
        assert REGISTER_ANSWERED.search(ts.log_text()), (
            f"{ts.version}: no register answer from the server in {ts.log_path}:\n"
            f"{res.stderr}\n{ts.log_tail()}"
        )
    assert server.running, server.log_tail()


def test_headscale_scenario_self_test(
    topology: Topology, pyheadscale_factory: Callable[..., PyHeadscale]
) -> None:
    """Headscale's TestHeadscale, its harness's own check: the server the harness starts
    in its namespace is healthy, and the harness makes a user and a reusable key on it."""
    server = pyheadscale_factory(topology.add_server_host())
    assert server.running and server.http_get("/health")[0] == 200
    user = server.cli_json("users", "create", "test-space")
    assert user["name"] == "test-space"
    assert [u["name"] for u in server.cli_json("users", "list")] == ["test-space"]
    key = server.cli_json("preauthkeys", "create", "-u", str(user["id"]), "--reusable")
    assert key["reusable"] is True and key["key"].startswith("hskey-auth-")
    assert [k["id"] for k in server.cli_json("preauthkeys", "list")] == [key["id"]]


def test_tailscale_node_joining_headscale(
    topology: Topology,
    pyheadscale_factory: Callable[..., PyHeadscale],
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    """Headscale's TestTailscaleNodesJoiningHeadcale: the harness starts the server, makes a
    user and a reusable key, brings one client up with it; the client has one IPv4 and one
    IPv6 tailnet address, and the server lists its node under that user."""
    server = pyheadscale_factory(topology.add_server_host())
    user = server.cli_json("users", "create", "join-node-test")
    key = server.cli_json("preauthkeys", "create", "-u", str(user["id"]), "--reusable")
    ts = tailscaled_factory(topology.add_host("joiner"), versions.PINNED[-1],
                            ssl_cert_file=server.ca_file)
    r = ts.up(server.url, authkey=key["key"], hostname="joiner", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    ips = sorted(ts.ip(), key=lambda a: ":" in a)
    assert len(ips) == 2, ips
    assert ipaddress.ip_address(ips[0]) in ipaddress.ip_network("100.64.0.0/10")
    assert ipaddress.ip_address(ips[1]) in ipaddress.ip_network("fd7a:115c:a1e0::/48")
    nodes = server.cli_json("nodes", "list", "--user", "join-node-test")
    assert [n["givenName"] for n in nodes] == ["joiner"]
    assert sorted(nodes[0]["ipAddresses"], key=lambda a: ":" in a) == ips
