"""Row 6: a man in the middle between two meshed relays never gets the mesh key.

Relay A is pyheadscale's embedded relay, relay B a standalone `python -m derp`; A meshes with
B. A DNAT rule on the server host sends A's mesh connections to B to a third host instead,
where tests/derp_mitm.py answers like a relay and records any ClientInfo it can open.
1. It presents a certificate from another CA: A's TLS check refuses it.
2. A pins B's DERP key, and the man in the middle presents a certificate A trusts (as with a
   mis-issued or stolen one) but its own DERP key: A refuses before ClientInfo.
Without the rule, A links to B each time (B sees A's key as a client). Official clients of
the oldest and newest versions register and ping each other throughout.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.attacklab import db_agrees
from tests.integration.derp_helpers import StandaloneDerp
from tests.integration.netns import Host, Topology
from tests.integration.server import REPO, make_test_ca
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import World, wait_for

pytestmark = pytest.mark.integration


class Mitm:
    def __init__(self, host: Host, workdir: Path, cert: Path, key: Path) -> None:
        self.out = workdir / "mitm.jsonl"
        self.proc = host.popen([sys.executable, "-m", "tests.derp_mitm", "--listen",
                                f"{host.ip}:443", "--cert", str(cert), "--key", str(key),
                                "--out", str(self.out)], cwd=str(REPO),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={"PYTHONPATH": str(REPO)})

    def records(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


_WATCH = """
import asyncio, sys, time
from derp import protocol as p
from derp.client import DerpClient
from derp.keys import generate_private_key

async def main(url, mesh_key, want):
    c = await DerpClient.connect(url, generate_private_key(), mesh_key=mesh_key, timeout=5)
    c.watch_conns()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            ev = await c.recv(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if isinstance(ev, p.PeerPresent) and ev.key.hex() == want:
            print("present")
            break
    await c.close()

asyncio.run(main(*sys.argv[1:]))
"""


def b_sees_client(host: Host, relay_b: StandaloneDerp, mesh_key: str, client_key: str) -> bool:
    """Whether relay B lists `client_key` as connected (a mesh watcher's PeerPresent)."""
    r = host.run([sys.executable, "-c", _WATCH, f"https://{relay_b.host.ip}:443/derp",
                  mesh_key, client_key], timeout=30, env={"PYTHONPATH": str(REPO)})
    return "present" in r.stdout


def test_mesh_key_never_reaches_a_man_in_the_middle(
        topology: Topology, workdir: Path,
        tailscaled_factory: Callable[..., Tailscaled]) -> None:
    world = World(topology, workdir, tailscaled_factory)
    relay_host, mitm_host = topology.add_host("relay2"), topology.add_host("mitm")
    ca = make_test_ca(workdir / "tls", ips=(world.server_host.ip, relay_host.ip))
    rogue_ca = make_test_ca(workdir / "rogue", ips=(relay_host.ip,))
    mesh_key = secrets.token_hex(32)
    (workdir / "mesh.key").write_text(mesh_key + "\n")
    relay_b = StandaloneDerp(relay_host, workdir / "relay2", ca,
                             extra_args=["--mesh-psk-file", str(workdir / "mesh.key")])
    b_key = re.search(r"key nodekey:([0-9a-f]{64})", relay_b.log_text())
    assert b_key is not None
    dnat = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", relay_host.ip, "--dport", "443",
            "-j", "DNAT", "--to-destination", f"{mitm_host.ip}:443"]
    mitm: Mitm | None = None
    try:
        for case, mesh_peer, (cert, key) in (
                ("untrusted certificate", f"{relay_host.ip}:443", (rogue_ca.cert, rogue_ca.key)),
                ("trusted certificate, wrong DERP key",
                 {"url": f"{relay_host.ip}:443", "public_key": f"nodekey:{b_key[1]}"},
                 (ca.cert, ca.key))):
            mitm = Mitm(mitm_host, workdir / case.replace(" ", "_").replace(",", ""), cert, key)
            mitm.out.parent.mkdir(exist_ok=True)
            world.server_host.iptables(*dnat)
            if world.server is not None:
                world.server.close()
            srv = world.start_server({"derp": {"server": {
                "mesh_key_path": str(workdir / "mesh.key"),
                "mesh_ca_cert_path": str(ca.ca_cert), "mesh_with": [mesh_peer]}}})
            found = re.search(r"key nodekey:([0-9a-f]{64})", srv.log_text())
            assert found is not None
            a_key = found[1]
            time.sleep(12)  # at least two attempts of the link (5 s apart)
            assert "mesh" in srv.log_text() and "connect failed" in srv.log_text(), case
            got = [r for r in mitm.records() if "mesh_key" in r]
            assert got == [], f"{case}: the man in the middle learned {got}"
            if case.startswith("trusted"):
                assert any("connection" in r for r in mitm.records()), case  # TLS did pass
            # Official clients keep working meanwhile.
            a = world.join(f"a{len(world.nodes)}", PINNED[0])
            b = world.join(f"b{len(world.nodes)}", PINNED[-1])
            r = a.ping(b.ip("4")[0], count=10, until_direct=False)
            assert r.returncode == 0 and "pong from" in r.stdout, f"{case}: {r.stdout}{r.stderr}"
            # Without the man in the middle the link comes up.
            world.server_host.iptables(*["-D" if x == "-A" else x for x in dnat])
            wait_for(f"{case}: relay B to see relay A's mesh link",
                     lambda a_key=a_key: b_sees_client(mitm_host, relay_b, mesh_key, a_key),
                     timeout=30, interval=1)
            mitm.close()
            mitm = None
        db_agrees(world.server, list(world.nodes))  # type: ignore[arg-type]
    finally:
        if mitm is not None:
            mitm.close()
        relay_b.close()
        world.close()
