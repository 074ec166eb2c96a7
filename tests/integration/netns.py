"""Network-namespace topologies for integration tests (`ip netns` + veth + bridges + iptables).

Shape (every box is a namespace, every name carries a per-run id):

    internet switch ns  "<id>-sw"   bridge br0 = 198.51.100.0/24 (gateway .254)
                                    bridge br1 = 203.0.113.0/24  (optional, gateway .254)
        |-- public hosts (eth0 on br0/br1, default route via .254)
        |-- NAT router ns (eth0 = public address, br0 = 192.0.2.0/24 LAN, MASQUERADE on eth0)
                |-- LAN hosts (eth0 on the router's br0, default route via 192.0.2.1)

Safety: no interface is ever created in the root namespace (veth pairs are created directly
inside their target namespaces), so nothing in a topology has a path off this machine.
ip_forward is enabled only in the switch and router namespaces.

Blocking UDP is done with iptables on the hosts' uplink (eth0) in OUTPUT and INPUT, because
traffic between two hosts on one bridge is switched, not routed, and so never crosses a FORWARD
chain (br_netfilter is not something a test may rely on). Rules on eth0 leave traffic inside a
tailscale TUN untouched while dropping its UDP transport.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTERNET_SUBNET = "198.51.100.0/24"
LAN_SUBNET = "192.0.2.0/24"
EXTRA_SUBNET = "203.0.113.0/24"
SERVER_IP = "198.51.100.1"

NS_PREFIX = "ph"  # every namespace we create starts with this + the run id
_MAX_IFNAME = 15

Cmd = Sequence[str] | str


class TopologyError(RuntimeError):
    """Creating or changing a topology failed."""


def _sh(args: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise TopologyError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def list_netns() -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def root_links() -> list[str]:
    out = _sh(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _new_run_id() -> str:
    existing = list_netns()
    for _ in range(100):
        rid = secrets.token_hex(2)
        if not any(n.startswith(f"{NS_PREFIX}{rid}") for n in existing):
            return rid
    raise TopologyError("could not find an unused run id")


def _argv(cmd: Cmd) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


@dataclass(eq=False)
class Segment:
    """One L2 segment: a bridge inside `owner` (the switch or a NAT router namespace)."""

    name: str
    subnet: ipaddress.IPv4Network
    owner: Namespace
    bridge: str
    gateway: str
    router: Router | None = None  # set for LANs behind a NAT
    _next: int = 2
    _used: set[str] = field(default_factory=set)

    def allocate(self, ip: str | None = None) -> str:
        if ip is not None:
            addr = ipaddress.IPv4Address(ip)
            if addr not in self.subnet:
                raise TopologyError(f"{ip} is not in {self.subnet}")
            if ip in self._used or ip == self.gateway:
                raise TopologyError(f"{ip} already in use on {self.name}")
            self._used.add(ip)
            return ip
        while True:
            if self._next >= 254:
                raise TopologyError(f"segment {self.name} is full")
            cand = str(self.subnet.network_address + self._next)
            self._next += 1
            if cand not in self._used and cand != self.gateway:
                self._used.add(cand)
                return cand

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


class Namespace:
    """A named network namespace plus the processes started in it."""

    def __init__(self, topo: Topology, name: str, nsname: str) -> None:
        self.topo = topo
        self.name = name
        self.ns = nsname
        self._procs: list[subprocess.Popen[Any]] = []
        self._port = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ns={self.ns}>"

    def exec_argv(self, cmd: Cmd) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *_argv(cmd)]

    def run(
        self,
        cmd: Cmd,
        *,
        check: bool = False,
        timeout: float | None = 60,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        """Run `cmd` inside the namespace and wait; output captured. Raises only if check."""
        full_env = {**os.environ, **env} if env is not None else None
        return subprocess.run(
            self.exec_argv(cmd),
            capture_output=True,
            text=text,
            timeout=timeout,
            check=check,
            env=full_env,
            input=input,
        )

    def popen(
        self, cmd: Cmd, *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start `cmd` inside the namespace; it is terminated at topology teardown."""
        full_env = {**os.environ, **env} if env is not None else None
        # A new session so a test's Ctrl-C reaches pytest first and teardown stays in charge.
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(cmd), env=full_env, **kwargs)
        self._procs.append(proc)
        return proc

    def _ip(self, *args: str, check: bool = True) -> str:
        return _sh(["ip", "-n", self.ns, *args], check=check)

    def _sysctl(self, key: str, value: str) -> None:
        _sh(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", f"{key}={value}"])

    def iptables(self, *args: str) -> None:
        _sh(["ip", "netns", "exec", self.ns, "iptables", "-w", "5", *args])

    def new_port_name(self, prefix: str = "p") -> str:
        self._port += 1
        name = f"{prefix}{self._port}"
        if len(name) > _MAX_IFNAME:
            raise TopologyError(f"interface name too long: {name}")
        return name

    def kill_processes(self, grace: float = 5.0) -> None:
        """Stop what we started here, then anything else still in the namespace, by pid."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        # Daemons that detached from our Popen still show up in `ip netns pids`.
        for pid_s in _sh(["ip", "netns", "pids", self.ns], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid_s), signal.SIGKILL)


class Host(Namespace):
    """An end host with one uplink `eth0` on a segment."""

    segment: Segment
    ip: str

    @property
    def face(self) -> str:
        """The address this host's packets carry once they reach the internet segment."""
        router = self.segment.router
        return router.wan_ip if router is not None else self.ip


class Router(Namespace):
    """A NAT router: eth0 on a public segment (MASQUERADE), br0 = its LAN."""

    wan_ip: str
    wan_segment: Segment
    lan: Segment


class Switch(Namespace):
    """The 'internet': bridges for the public segments, routing between them."""


class Topology:
    """Builds and tears down a set of namespaces. Use as a context manager.

    Teardown undoes every created object in reverse order, after stopping every process started
    in the namespaces, and is also registered with atexit in case the process exits early.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or ""
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._nsnames: set[str] = set()
        self.namespaces: dict[str, Namespace] = {}
        self.hosts: dict[str, Host] = {}
        self.segments: dict[str, Segment] = {}
        self._closed = False
        self._lock = threading.Lock()
        _LIVE.add(self)
        try:
            self.switch = self._claim_run_id(run_id)
            self.switch._sysctl("net.ipv4.ip_forward", "1")
            self.internet = self._add_bridge_segment(
                "internet", self.switch, INTERNET_SUBNET, gateway_host=254
            )
            # Automatic addresses start at .2: .1 stays free for the server (add_server_host).
        except BaseException:
            self.close()
            raise

    def _claim_run_id(self, run_id: str | None) -> Switch:
        """Create the switch namespace under `run_id` or a fresh id. Parallel workers may
        draw the same id at once; `ip netns add` is atomic, so the loser draws again."""
        for _ in range(20):
            self.run_id = run_id or _new_run_id()
            try:
                switch: Switch = self._add_ns(Switch, "sw")
                return switch
            except TopologyError as exc:
                if run_id is not None or "File exists" not in str(exc):
                    raise
        raise TopologyError("could not claim a run id")

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prefix(self) -> str:
        return f"{NS_PREFIX}{self.run_id}"

    # -- building blocks ---------------------------------------------------------------------

    def _track(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def _add_ns(self, cls: type[Any], name: str) -> Any:
        if name in self.namespaces:
            raise TopologyError(f"duplicate namespace name {name!r}")
        nsname = f"{self.prefix}-{name}"
        if len(nsname) > _MAX_IFNAME:
            raise TopologyError(f"name {name!r} too long (namespace would be {nsname!r})")
        _sh(["ip", "netns", "add", nsname])
        obj = cls(self, name, nsname)
        self._nsnames.add(nsname)

        def undo() -> None:
            obj.kill_processes()
            _sh(["ip", "netns", "del", nsname], check=False)

        self._track(f"netns {nsname}", undo)
        self.namespaces[name] = obj
        obj._ip("link", "set", "lo", "up")
        # New namespaces start with forwarding off; make it explicit so only routers route.
        obj._sysctl("net.ipv4.ip_forward", "0")
        return obj

    def _add_link(self, a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
        # Both ends are born inside their namespaces, so the root namespace never holds them.
        _sh([
            "ip", "link", "add", a_name, "netns", a.ns, "type", "veth",
            "peer", "name", b_name, "netns", b.ns,
        ])  # fmt: skip
        self._track(f"veth {a.ns}/{a_name}", lambda: a._ip("link", "del", a_name, check=False))
        for ns, ifname in ((a, a_name), (b, b_name)):
            # IPv4 only: no link-local IPv6 paths that the UDP blocks would not cover.
            ns._sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
            ns._ip("link", "set", ifname, "up")

    def _add_bridge_segment(
        self, name: str, owner: Namespace, subnet: str, *, gateway_host: int
    ) -> Segment:
        if name in self.segments:
            raise TopologyError(f"duplicate segment {name!r}")
        net = ipaddress.IPv4Network(subnet)
        bridge = owner.new_port_name("br")
        gw = str(net.network_address + gateway_host)
        # A fixed address: a bridge left to pick its own takes the lowest of its ports' and
        # changes it when a port with a lower one is attached, without telling anyone, so a
        # host that resolved the gateway before that keeps sending to the old address and
        # its routed traffic vanishes until its ARP entry expires (up to a minute).
        mac = "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(gw).packed)
        owner._ip("link", "add", bridge, "address", mac, "type", "bridge")
        self._track(
            f"bridge {owner.ns}/{bridge}", lambda: owner._ip("link", "del", bridge, check=False)
        )
        owner._sysctl(f"net.ipv6.conf.{bridge}.disable_ipv6", "1")
        owner._ip("addr", "add", f"{gw}/{net.prefixlen}", "dev", bridge)
        owner._ip("link", "set", bridge, "up")
        seg = Segment(name=name, subnet=net, owner=owner, bridge=bridge, gateway=gw)
        self.segments[name] = seg
        return seg

    def _attach(self, ns: Namespace, ifname: str, seg: Segment, ip: str) -> None:
        port = seg.owner.new_port_name("p")
        self._add_link(ns, ifname, seg.owner, port)
        seg.owner._ip("link", "set", port, "master", seg.bridge)
        ns._ip("addr", "add", f"{ip}/{seg.prefixlen}", "dev", ifname)

    def _uplink(self, ns: Namespace, seg: Segment, ip: str | None) -> str:
        """eth0 on `seg` at `ip` (or the next free address), the default route via the
        segment's gateway; returns the address."""
        addr = seg.allocate(ip)
        self._attach(ns, "eth0", seg, addr)
        ns._ip("route", "add", "default", "via", seg.gateway)
        return addr

    def public_segment(self, name: str = "internet2", subnet: str = EXTRA_SUBNET) -> Segment:
        """A further public segment on the switch, routed to the internet segment."""
        return self._add_bridge_segment(name, self.switch, subnet, gateway_host=254)

    def add_host(self, name: str, segment: Segment | None = None, ip: str | None = None) -> Host:
        """A host with eth0 on `segment` (default: the internet) and a default route."""
        seg = segment or self.internet
        host: Host = self._add_ns(Host, name)
        host.segment = seg
        host.ip = self._uplink(host, seg, ip)
        self.hosts[name] = host
        return host

    def set_hosts_file(self, ns: Namespace, names: Mapping[str, str]) -> None:
        """Give processes started in `ns` these host names (name -> IP).

        `ip netns exec` bind-mounts the files of /etc/netns/<namespace>/ over /etc, so only
        that namespace's processes see this /etc/hosts; teardown removes it.
        """
        d = Path("/etc/netns") / ns.ns
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost\n"] + [f"{ip} {name}\n" for name, ip in names.items()]
        (d / "hosts").write_text("".join(lines))
        self._track(f"hosts file {d}", lambda: shutil.rmtree(d, ignore_errors=True))

    def add_server_host(self, name: str = "server") -> Host:
        """The control server's host at 198.51.100.1 on the internet segment."""
        return self.add_host(name, self.internet, SERVER_IP)

    def add_nat(
        self,
        name: str,
        lan_subnet: str = LAN_SUBNET,
        wan_segment: Segment | None = None,
        wan_ip: str | None = None,
    ) -> Router:
        """A NAT router with a public eth0 and a LAN bridge; returns it (its LAN is `.lan`)."""
        wan = wan_segment or self.internet
        r: Router = self._add_ns(Router, name)
        r.wan_segment = wan
        r.wan_ip = self._uplink(r, wan, wan_ip)
        r.lan = self._add_bridge_segment(f"{name}-lan", r, lan_subnet, gateway_host=1)
        r.lan.router = r
        r._sysctl("net.ipv4.ip_forward", "1")
        r.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        # Stateful: only replies come in from the WAN; nothing can open a connection inward.
        r.iptables("-A", "FORWARD", "-i", "eth0", "-m", "conntrack",
                   "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        r.iptables("-A", "FORWARD", "-i", "eth0", "-j", "DROP")
        return r

    def add_lan_host(self, router: Router, name: str, ip: str | None = None) -> Host:
        return self.add_host(name, router.lan, ip)

    # -- switches ----------------------------------------------------------------------------

    def _drop_udp(self, host: Host, peer_addrs: Sequence[str] | None, insert: bool) -> list[str]:
        op = "-I" if insert else "-D"
        rules: list[list[str]] = []
        if peer_addrs is None:
            rules = [["OUTPUT", "-o", "eth0", "-p", "udp", "-j", "DROP"],
                     ["INPUT", "-i", "eth0", "-p", "udp", "-j", "DROP"]]  # fmt: skip
        else:
            for addr in peer_addrs:
                rules.append(["OUTPUT", "-o", "eth0", "-p", "udp", "-d", addr, "-j", "DROP"])
                rules.append(["INPUT", "-i", "eth0", "-p", "udp", "-s", addr, "-j", "DROP"])
        for rule in rules:
            host.iptables(op, *rule)
        return [" ".join(r) for r in rules]

    def _peer_addrs(self, host: Host, peer: Host) -> list[str]:
        # Same LAN: they talk with LAN addresses; otherwise with the peer's public face too.
        addrs = {peer.ip}
        if peer.segment is not host.segment:
            addrs.add(peer.face)
        return sorted(addrs)

    def block_udp(self, a: Host, b: Host) -> None:
        """Drop all UDP between hosts a and b (both directions, at both ends).

        A peer behind NAT is matched by its router's public address, so this also blocks UDP
        between `a` and other hosts behind the same NAT as `b`.
        """
        with self._lock:
            self._drop_udp(a, self._peer_addrs(a, b), insert=True)
            self._drop_udp(b, self._peer_addrs(b, a), insert=True)

    def unblock_udp(self, a: Host, b: Host) -> None:
        with self._lock:
            self._drop_udp(a, self._peer_addrs(a, b), insert=False)
            self._drop_udp(b, self._peer_addrs(b, a), insert=False)

    def block_udp_outside(self, host: Host) -> None:
        """Drop every UDP packet entering or leaving `host` on its uplink (TCP still works)."""
        self._drop_udp(host, None, insert=True)

    def unblock_udp_outside(self, host: Host) -> None:
        self._drop_udp(host, None, insert=False)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # keep going: the rest must still be removed
                errors.append(f"{what}: {exc}")
        self._undo.clear()
        # Safety net: anything carrying our prefix that is still there.
        for ns in list_netns():
            if ns in self._nsnames:
                _sh(["ip", "netns", "del", ns], check=False)
        _LIVE.discard(self)
        if errors:
            raise TopologyError("teardown problems: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        return [ns for ns in list_netns() if ns in self._nsnames]


_LIVE: set[Topology] = set()


@atexit.register
def _close_all() -> None:
    for topo in list(_LIVE):
        with contextlib.suppress(Exception):
            topo.close()


@contextlib.contextmanager
def topology(run_id: str | None = None) -> Iterator[Topology]:
    topo = Topology(run_id)
    try:
        yield topo
    finally:
        topo.close()
