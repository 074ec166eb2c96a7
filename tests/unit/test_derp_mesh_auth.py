"""Mesh links verify the peer relay before the mesh key goes out (derp/mesh.py): a man in the
middle with an untrusted certificate, or with a trusted one but not the pinned DERP key,
never receives a ClientInfo it can open."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from derp import protocol as p
from derp.keys import generate_private_key
from derp.mesh import MeshLink, verifying_context
from derp.tls import client_ssl_context, ensure_self_signed, server_ssl_context
from tests.derp_mitm import MeshMitm
from tests.unit.test_derp_server import MESH_KEY, connect, start_relay


async def wait_until(cond: Callable[[], object]) -> None:
    for _ in range(100):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_untrusted_certificate_gets_no_mesh_key(tmp_path: Path) -> None:
    relay = await start_relay(tmp_path, mesh_key=MESH_KEY)
    cert, key = ensure_self_signed(tmp_path / "mitm", "127.0.0.1")
    mitm = await MeshMitm.start("127.0.0.1", 0, server_ssl_context(cert, key))
    # Default for a link without a pin: the system's CAs, which do not know this certificate.
    link = relay.server.add_mesh_peer(f"https://127.0.0.1:{mitm.port}/derp",
                                      retry_interval=0.05)
    await asyncio.sleep(1.0)  # ~20 attempts, each refused in the TLS handshake
    assert mitm.seen == [] and mitm.connections == 0 and not link.connected.is_set()
    # The same man in the middle without verification would have learned it:
    c = await p_client_info_reaches(mitm)
    assert c == MESH_KEY
    await link.close()
    mitm.close()
    await relay.stop()


async def p_client_info_reaches(mitm: MeshMitm) -> str:
    from derp.client import DerpClient, DerpClientError

    try:
        await DerpClient.connect(f"https://127.0.0.1:{mitm.port}/derp", generate_private_key(),
                                 ssl=client_ssl_context(None), mesh_key=MESH_KEY, timeout=2)
    except (DerpClientError, p.DerpProtocolError, TimeoutError, OSError):
        pass
    await wait_until(lambda: mitm.seen)
    return mitm.seen[-1][0]


async def test_trusted_certificate_but_wrong_key_gets_no_mesh_key(tmp_path: Path) -> None:
    """The attacker holds a certificate the relay trusts (a mis-issued one, a stolen key):
    the pinned DERP key still stops the mesh key."""
    cert, key = ensure_self_signed(tmp_path / "shared", "127.0.0.1")
    real_key = generate_private_key()
    peer = await start_relay(tmp_path, mesh_key=MESH_KEY, private_key=real_key)
    relay = await start_relay(tmp_path, mesh_key=MESH_KEY)
    mitm = await MeshMitm.start("127.0.0.1", 0, server_ssl_context(cert, key))
    pin = p.public_key_of(real_key)
    bad = relay.server.add_mesh_peer(f"https://127.0.0.1:{mitm.port}/derp",
                                     ssl=verifying_context(str(cert)), public_key=pin,
                                     retry_interval=0.05)
    await wait_until(lambda: mitm.connections >= 3)
    assert mitm.seen == [] and not bad.connected.is_set()
    # The real peer, with the pin, links and carries packets.
    good = relay.server.add_mesh_peer(peer.url, ssl=client_ssl_context(None), public_key=pin,
                                      retry_interval=0.05)
    await asyncio.wait_for(good.connected.wait(), 5)
    a, b = await connect(relay), await connect(peer)
    await wait_until(lambda: b.public_key in relay.server._forwarders)
    a.send(b.public_key, b"over the mesh")
    assert (await b.recv_packet(2)).data == b"over the mesh"
    for c in (a, b):
        await c.close()
    for link in (bad, good):
        await link.close()
    mitm.close()
    await peer.stop()
    await relay.stop()


def test_plain_http_mesh_needs_a_pin() -> None:
    class Srv:
        mesh_key = MESH_KEY

    with pytest.raises(ValueError, match="pinned"):
        MeshLink(Srv(), "http://127.0.0.1:1/derp")  # type: ignore[arg-type]
