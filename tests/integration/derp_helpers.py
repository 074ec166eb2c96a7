"""Helpers for the DERP acceptance tests (test_derp.py): tailnets, paths, relays, probes."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.integration.netns import Host, Router
from tests.integration.procs import NamespacedProcess
from tests.integration.seed import seed
from tests.integration.server import REPO, VENV_PYTHON, CertAuthority, PyHeadscale
from tests.integration.tailscale import Tailscaled

PY = sys.executable
REGION_ID = 999
REGION_CODE = "headscale"

# `tailscale ping` answer lines: "pong from <name> (<ip>) via <path> in <ms>".
PONG = re.compile(r"pong from (\S+) \(([^)]+)\) via (\S+) in ")


class Tailnet:
    """A pyheadscale server with one user and a reusable pre-auth key, seeded before start."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        ca: CertAuthority | None = None,
        start_timeout: float = 30,
        **server_kwargs: Any,
    ) -> None:
        self.server = PyHeadscale(host, workdir / "server", overrides, ca=ca, start=False,
                                  **server_kwargs)
        seeded = seed(self.server, ["alice"], {"k": {"user": "alice", "reusable": True}})
        self.authkey: str = seeded["keys"]["k"]
        self.server.start(timeout=start_timeout)

    @property
    def ca_file(self) -> Path:
        assert self.server.ca_file is not None
        return self.server.ca_file

    def join(self, ts: Tailscaled, timeout: float = 60) -> str:
        """`tailscale up` with the key; returns the node's tailnet IPv4."""
        res = ts.up(self.server.url, self.authkey, timeout=timeout)
        assert res.returncode == 0, f"{ts!r} up failed: {res.stderr}\n{ts.log_tail()}"
        ts.wait_state("Running", timeout=timeout)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ips = ts.ip("4")
            if ips:
                return ips[0]
            time.sleep(0.3)
        raise AssertionError(f"{ts!r} has no tailnet IPv4")

    def close(self) -> None:
        self.server.close()


def wait_peer(ts: Tailscaled, peer_ip: str, timeout: float = 60) -> dict[str, Any]:
    """Wait until `ts` has `peer_ip` in its netmap; returns that peer's status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for peer in (ts.status_json().get("Peer") or {}).values():
            if peer_ip in (peer.get("TailscaleIPs") or []):
                return dict(peer)
        time.sleep(0.5)
    raise AssertionError(f"{ts!r} never saw peer {peer_ip}:\n{ts.log_tail()}")


def wait_home(ts: Tailscaled, code: str = REGION_CODE, timeout: float = 60) -> None:
    """Wait until the daemon reports a home DERP (Self.Relay) with region code `code`."""
    deadline = time.monotonic() + timeout
    relay = ""
    while time.monotonic() < deadline:
        relay = (ts.status_json().get("Self") or {}).get("Relay", "")
        if relay == code:
            return
        time.sleep(0.5)
    raise AssertionError(f"{ts!r}: home DERP {relay!r}, want {code!r}:\n{ts.log_tail()}")


def pong_paths(out: str) -> list[str]:
    return [m.group(3) for m in PONG.finditer(out)]


def ping_paths(
    ts: Tailscaled,
    target: str,
    *,
    count: int = 3,
    until_direct: bool = False,
    attempts: int = 8,
) -> tuple[list[str], str]:
    """`tailscale ping` until it gets pongs; returns (paths of the pongs, full output).

    Retried because the first pings can race the netmap or the DERP connection coming up.
    """
    out = ""
    for _ in range(attempts):
        res = ts.ping(target, count=count, timeout=3, until_direct=until_direct)
        out = res.stdout + res.stderr
        paths = pong_paths(out)
        if paths:
            return paths, out
        time.sleep(1)
    raise AssertionError(f"{ts!r}: no pong from {target}:\n{out}\n{ts.log_tail()}")


def ping_until_direct(ts: Tailscaled, target: str, timeout: float = 90) -> tuple[str, str]:
    """Ping until a pong comes over a direct path; returns (ip:port, output)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        res = ts.ping(target, count=15, timeout=2, until_direct=True)
        out = res.stdout + res.stderr
        paths = pong_paths(out)
        if paths and not paths[-1].startswith("DERP("):
            return paths[-1], out
        time.sleep(1)
    raise AssertionError(f"{ts!r}: no direct path to {target}:\n{out}\n{ts.log_tail()}")


def firewall_nat(router: Router) -> None:
    """Make a topology NAT router drop unsolicited UDP addressed to itself, as home routers do.

    Without it, a peer's disco ping that reaches the router before the LAN host has sent
    anything to that peer creates a conntrack entry (router-local, ICMP port unreachable) whose
    reply tuple is exactly the mapping the LAN host's own packets would get; MASQUERADE then
    picks another source port for them, and hole punching never meets. Dropping in INPUT
    happens before conntrack confirms the entry, so none is kept.
    """
    router.iptables("-A", "INPUT", "-i", "eth0", "-p", "udp", "-m", "conntrack",
                    "--ctstate", "NEW", "-j", "DROP")  # fmt: skip


# -- TCP over the tailnet --------------------------------------------------------------------

_HTTP_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (sys.argv[3] + " " + self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""
_HTTP_GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())
"""


def serve_http(host: Host, bind_ip: str, port: int, token: str) -> subprocess.Popen[Any]:
    """An HTTP server bound to `bind_ip` (a tailnet IP) answering "<token> <client ip>"."""
    proc = host.popen([PY, "-c", _HTTP_SERVER, bind_ip, str(port), token],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"HTTP server on {host.name} exited: {proc.stderr}")
        if host.run(["sh", "-c", f"ss -ltn | grep -q '{bind_ip}:{port} '"]).returncode == 0:
            return proc
        time.sleep(0.2)
    raise AssertionError(f"HTTP server on {host.name} {bind_ip}:{port} did not listen")


def http_get(host: Host, url: str, attempts: int = 5, timeout: float = 10) -> str:
    """GET `url` from `host`'s namespace; returns the body (retried a few times)."""
    err = ""
    for _ in range(attempts):
        res = host.run([PY, "-c", _HTTP_GET, url, str(timeout)], timeout=timeout + 10)
        if res.returncode == 0:
            return str(res.stdout.strip())
        err = res.stderr.strip()[-500:]
        time.sleep(1)
    raise AssertionError(f"GET {url} from {host.name} failed: {err}")


# -- DERP clients with chosen keys -----------------------------------------------------------

_DERP_CLIENT = """
import asyncio, json, ssl, sys
from derp.client import DerpClient, DerpClientError
url, key_hex, cafile, host = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile) if cafile else None
async def main():
    try:
        c = await DerpClient.connect(url, bytes.fromhex(key_hex), ssl=ctx,
                                     server_hostname=host, timeout=10)
    except (DerpClientError, OSError, TimeoutError) as e:
        return {"admitted": False, "error": f"{type(e).__name__}: {e}"}
    # Admitted: the relay sent ServerInfo; prove the connection is live with a Ping.
    await c.ping(timeout=5)
    await c.close()
    return {"admitted": True, "server_key": c.server_key.hex()}
print(json.dumps(asyncio.run(main())))
"""


def derp_connect(
    host: Host, url: str, private_key: bytes, *, ca_file: Path | None, server_hostname: str
) -> dict[str, Any]:
    """Connect a derp.client.DerpClient from `host`'s namespace; {"admitted": bool, ...}."""
    res = host.run(
        [str(VENV_PYTHON), "-c", _DERP_CLIENT, url, private_key.hex(), str(ca_file or ""),
         server_hostname],
        timeout=40, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert res.returncode == 0, f"DERP client script failed: {res.stderr}"
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def node_private_key(ts: Tailscaled) -> bytes:
    """The node's private node key, read from its state file (map of name -> base64 bytes)."""
    state = json.loads((ts.statedir / "tailscaled.state").read_text())
    for name, raw in state.items():
        if not name.startswith("profile-"):
            continue
        prefs = json.loads(base64.b64decode(raw))
        key = ((prefs.get("Config") or {}).get("PrivateNodeKey")) or ""
        if key.startswith("privkey:"):
            return bytes.fromhex(key.removeprefix("privkey:"))
    raise AssertionError(f"no node key in {ts.statedir}/tailscaled.state")


# -- a standalone relay (python -m derp) ------------------------------------------------------


class StandaloneDerp(NamespacedProcess):
    """`python -m derp` in `host`'s namespace with TLS from the test CA (certmode manual)."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        ca: CertAuthority,
        *,
        port: int = 443,
        stun_port: int = 3478,
        hostname: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(host, workdir / "derp.log")
        self.hostname = hostname or host.ip
        self.port = port
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        certdir = workdir / "certs"
        certdir.mkdir(exist_ok=True)
        # derper's manual layout: <certdir>/<hostname>.crt/.key; the CA's server certificate
        # must cover the hostname.
        (certdir / f"{self.hostname}.crt").write_bytes(ca.cert.read_bytes())
        (certdir / f"{self.hostname}.key").write_bytes(ca.key.read_bytes())
        argv = [
            str(VENV_PYTHON), "-m", "derp", "-a", f"{host.ip}:{port}", "--hostname", self.hostname,
            "--certmode", "manual", "--certdir", str(certdir), "-c", str(workdir / "derper.key"),
            "--stun-port", str(stun_port), "--http-port", "-1", "-v", *extra_args,
        ]  # fmt: skip
        self.spawn(argv, env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=REPO)
        self.wait_ready(lambda: "derp: serving" in self.log_text(), 20, AssertionError,
                        lambda: "no 'derp: serving' in its log")

    def __repr__(self) -> str:
        return f"<StandaloneDerp {self.hostname}:{self.port} on {self.host.name}>"


def derp_report(ts: Tailscaled, region: str = REGION_CODE) -> dict[str, list[str]]:
    """`tailscale debug derp <region>` as {"Info": [...], "Warnings": [...], "Errors": [...]}."""
    res = ts.cli("debug", "derp", region, timeout=120)
    text = res.stdout.strip()
    start = text.find("{")
    assert res.returncode == 0 and start >= 0, (
        f"debug derp failed ({res.returncode}): {res.stdout}\n{res.stderr}"
    )
    data = json.loads(text[start:])
    return {k: list(data.get(k) or []) for k in ("Info", "Warnings", "Errors")}


def run_with_hosts(
    host: Host, hosts: Mapping[str, str], argv: Sequence[str], hosts_file: Path, **kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """Run `argv` in `host`'s namespace with `hosts` (name -> IP) in its /etc/hosts.

    A private mount namespace (unshare -m) gets a bind-mounted hosts file, so nothing outside
    that one process sees it and nothing needs cleaning up.
    """
    hosts_file.write_text("".join(f"{ip} {name}\n" for name, ip in hosts.items()))
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return host.run(["unshare", "-m", "sh", "-c", script, str(hosts_file), *argv], **kwargs)
