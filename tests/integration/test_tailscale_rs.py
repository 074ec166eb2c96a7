"""A tailscale-rs node on our server, serving HTTP to official clients over the tailnet
(Headscale's TestTailscaleRustAxum).

tailscale-rs is Tailscale's Rust implementation, the `tailscale` crate on crates.io;
tests/integration/tsrs is our small axum site on it (built by tsrs_build.py). It trusts only
the public web roots, so, as in Headscale's test, the control server speaks plain HTTP; the
embedded relay's self-signed certificate is marked InsecureForTests in the DERP map, which
tailscale-rs built with ts_control's insecure-derp feature honours (the official clients
too; with it the map carries no certificate pin, which v1.80 cannot read), where
Headscale's test borrows Tailscale's public relays.

As in Headscale's test the node joins with a single-use ephemeral key and must register
with an IPv4 and an IPv6 address under its own host name; the official clients (one per
pinned version, where Headscale has one) must list it as a peer and fetch its page, its
style sheet and a counter that advances across requests, over the tailnet.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.buildutil import BuildError
from tests.integration import hsapi, tsrs_build
from tests.integration.netns import Host
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import World, peers_by_name, wait_for

pytestmark = pytest.mark.integration

NAME = "tsrs-axum"  # Headscale's test looks for a node whose name starts with "tsrs-"


@pytest.fixture(scope="module")
def tsrs() -> Path:
    try:
        return tsrs_build.ensure()
    except BuildError as exc:
        pytest.fail(f"tailscale-rs node unavailable: {exc}", pytrace=False)


def curl(host: Host, *args: str) -> str | None:
    """curl's body from inside `host`'s namespace, or None when the request failed."""
    try:
        r = host.run(["curl", "--silent", "--show-error", "--fail", "--connect-timeout", "3",
                      "--max-time", "5", *args], timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return r.stdout if r.returncode == 0 else None


def count(host: Host, url: str) -> int | None:
    """POST /count: the node's counter before this request."""
    body = curl(host, "-X", "POST", url)
    if body is None:
        return None
    value: Any = json.loads(body)
    assert isinstance(value, dict) and isinstance(value.get("count"), int), body
    return int(value["count"])


def peer_addresses(ts: Tailscaled) -> set[str]:
    """The tailnet addresses `ts` lists for the tailscale-rs node."""
    return set(peers_by_name(ts.status_json()).get(NAME, {}).get("TailscaleIPs") or ())


def test_tailscale_rust_axum(world: World, tsrs: Path) -> None:
    srv = world.start_server(
        {"derp": {"server": {"insecure_for_tests": True}}}, users=["user1"],
        keys={"probe": {"user": "user1", "reusable": True},
              "rust": {"user": "user1", "ephemeral": True}},
        tls=False)
    probes: list[Tailscaled] = [world.join(f"probe{i}", v, "probe")
                                for i, v in enumerate((OLDEST, MIDDLE, NEWEST))]

    host = world.topology.add_host("tsrs")
    log_path = world.workdir / "tsrs.log"
    with log_path.open("w") as log:
        proc = host.popen([str(tsrs), srv.url, world.keys["rust"],
                           str(world.workdir / "tsrs-keys.json"), NAME],
                          env={"TSRS_LOG": "debug"}, stdout=log, stderr=subprocess.STDOUT)

    def alive() -> None:
        """Fails at once when the node has exited: no point waiting on it."""
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"tsrs-axum exited with {proc.returncode}:\n{tail}")

    def registered() -> dict[str, Any] | None:
        alive()
        n = hsapi.node_by_name(srv, NAME)
        return n if n and n.get("ipAddresses") else None

    # It registers, with both address families, under the name it asked for.
    node = wait_for("the tailscale-rs node to register with an IPv4 address", registered, 120)
    assert len(hsapi.nodes(srv)) == len(probes) + 1
    addrs = node["ipAddresses"]
    v4 = [a for a in addrs if ":" not in a]
    v6 = [a for a in addrs if ":" in a]
    assert len(v4) == 1 and len(v6) == 1, addrs
    assert node["givenName"] == NAME and node["name"] == NAME
    assert node["user"]["name"] == "user1"
    # The key was single-use and ephemeral (Headscale's CreateAuthKey(user, false, true)).
    ephemeral = [k for k in srv.cli_json("preauthkeys", "list") if k["ephemeral"]]
    assert len(ephemeral) == 1, ephemeral
    assert ephemeral[0]["used"] is True and ephemeral[0]["reusable"] is False, ephemeral
    base = f"http://{v4[0]}"

    for ts in probes:
        wait_for(f"{ts.host.name} to list the tailscale-rs node as a peer",
                 lambda ts=ts: alive() or peer_addresses(ts) == set(addrs), 60)

    # Each official client reaches the axum site over the tailnet: the page, then (as in
    # Headscale's test) the style sheet; `/` names the caller, so the request did come in
    # from that client's tailnet address.
    for ts in probes:
        page = wait_for(f"{ts.host.name} to fetch /index.html from the tailscale-rs node",
                        lambda ts=ts: alive() or curl(ts.host, f"{base}/index.html"), 120)
        assert "tailscale-rs" in page, page
        css = curl(ts.host, f"{base}/assets/index.css")
        assert css is not None and "font-family" in css, css
        assert curl(ts.host, f"{base}/") == f"tsrs {ts.ip('4')[0]}"

    # The counter keeps its state across connections: back-to-back POSTs give consecutive
    # values (Headscale's test asserts that they differ).
    (first,) = wait_for("POST /count to answer", lambda: alive() or (
        (n,) if (n := count(probes[-1].host, f"{base}/count")) is not None else None), 30)
    second = count(probes[0].host, f"{base}/count")
    third = count(probes[-1].host, f"{base}/count")
    assert (second, third) == (first + 1, first + 2)
