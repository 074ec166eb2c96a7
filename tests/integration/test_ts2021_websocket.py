"""/ts2021 over WebSocket (a GET upgrade with subprotocol tailscale-control-protocol), the way
Tailscale's browser/WASM client reaches its control server, next to official clients on the
same server (Headscale's ts2021_websocket_test.go).

Two clients of ours, built from tests/integration/ts2021ws against tailscale.com at the newest
pinned version: natively, dialling with the primitives the WASM client uses (coder/websocket
and tailscale.com's controlbase), as Headscale's TestTS2021WebSocketGET does from its test
process; and compiled for GOOS=js, running tailscale.com's own js/wasm control dial
(controlhttp.Dialer) under Node with its WebSocket, as TestTS2021WASMClientUnderNode does.
Both must finish the Noise handshake; with a wrong server key they must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.buildutil import BuildError
from tests.integration import ts2021ws_build
from tests.integration.netns import Host
from tests.integration.server import http_get_from
from tests.integration.versions import PINNED
from tests.integration.world import World, shared_world_fixture, wait_mesh

pytestmark = pytest.mark.integration

OK = "TS2021_WS_OK protocol="


def _boot(world: World) -> None:
    world.start_server()
    wait_mesh([world.join(f"n{i}", v) for i, v in enumerate((PINNED[0], PINNED[-1]))])


lab = shared_world_fixture(World, _boot)


@pytest.fixture(scope="module")
def programs() -> dict[str, Path]:
    try:
        return {"native": ts2021ws_build.native(), "wasm": ts2021ws_build.wasm(),
                "launcher": ts2021ws_build.wasm_exec_node()}
    except BuildError as exc:
        pytest.fail(f"ts2021ws client unavailable: {exc}", pytrace=False)


def _server_key(world: World, host: Host) -> str:
    """The server's Noise key from /key, fetched as a client does before dialling."""
    assert world.server is not None
    status, body = http_get_from(host, f"{world.server.url}/key?v=113",
                                 ca_file=world.server.ca_file, timeout=10)
    assert status == 200, body
    key = json.loads(body)["publicKey"]
    assert isinstance(key, str) and key.startswith("mkey:")
    return key


def _wrong_key(key: str) -> str:
    """Another valid-looking Noise key: the last hex digit changed."""
    return key[:-1] + ("0" if key[-1] != "0" else "1")


def test_ts2021_websocket_get(lab: World, programs: dict[str, Path]) -> None:
    """TestTS2021WebSocketGET."""
    assert lab.server is not None
    host = lab.topology.add_host("wsget")
    key = _server_key(lab, host)
    run = [str(programs["native"]), f"-server={lab.server.url}", f"-ca={lab.server.ca_file}"]
    r = host.run([*run, f"-key={key}"], timeout=60)
    assert r.returncode == 0 and OK in r.stdout, r.stdout + r.stderr
    # The handshake is checked: against a key the server does not hold it fails.
    r = host.run([*run, f"-key={_wrong_key(key)}"], timeout=60)
    assert r.returncode != 0 and OK not in r.stdout, r.stdout + r.stderr


def test_ts2021_wasm_client_under_node(lab: World, programs: dict[str, Path]) -> None:
    """TestTS2021WASMClientUnderNode: the official clients mesh (checked at setup) and the
    js/wasm control dial under Node completes the handshake over wss://<server>/ts2021."""
    assert lab.server is not None
    host = lab.topology.add_host("wasm")
    key = _server_key(lab, host)
    # Node 20 has WebSocket behind a flag; it trusts the test CA through NODE_EXTRA_CA_CERTS.
    run = ["node", "--experimental-websocket", str(programs["launcher"]), str(programs["wasm"]),
           f"-server={lab.server.url}"]
    env = {"NODE_EXTRA_CA_CERTS": str(lab.server.ca_file)}
    r = host.run([*run, f"-key={key}"], timeout=90, env=env)
    assert r.returncode == 0 and OK in r.stdout, r.stdout + r.stderr
    r = host.run([*run, f"-key={_wrong_key(key)}"], timeout=90, env=env)
    assert r.returncode != 0 and OK not in r.stdout, r.stdout + r.stderr
