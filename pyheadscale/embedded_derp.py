"""The DERP relay and STUN server embedded in pyheadscale, and its DERP-map region.

The relay always has its own TLS listener (`derp.server.listen_addr`, a pyheadscale key): our
main port is aiohttp, which would lose the bytes a `Derp-Fast-Start` client sends before the
101 (derp.md §1.2). Without a configured certificate it makes a self-signed one and pins it in
the DERP map (`CertName: sha256-raw:...`, clients >= 1.82); older clients need a certificate
they trust (`derp.server.tls_cert_path`) or `insecure_for_tests`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

from derp.http import serve_derp
from derp.keys import load_or_create_private_key
from derp.server import DerpServer
from derp.stun import serve_stun
from derp.tls import cert_name, ensure_self_signed, server_ssl_context
from pyheadscale.mapper.derpmap import embedded_region
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.derp")


def _hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class EmbeddedDerp:
    def __init__(self, cfg: Any, tailnet: Tailnet) -> None:
        self.cfg = cfg
        self.srv_cfg = cfg.derp.server
        self.tailnet = tailnet
        self._listener: asyncio.base_events.Server | None = None
        self._stun: asyncio.DatagramTransport | None = None
        self.cert_pin: str | None = None

    async def _verify(self, node_key: bytes, source_ip: str) -> bool:
        return self.tailnet.node_by_node_key(node_key) is not None

    async def start(self) -> None:
        s = self.srv_cfg
        key_path = s.private_key_path or Path(self.cfg.data_dir) / "derp_server_private.key"
        # The mesh key (derper's 64-hex --mesh-psk-file format) also admits mesh peers and
        # probers (derpprobe --mesh-psk-file) past verify_clients, as in derper.
        mesh_key = Path(s.mesh_key_path).read_text().strip() if s.mesh_key_path else None
        self.server = DerpServer(load_or_create_private_key(key_path),
                                 verify_client=self._verify if s.verify_clients else None,
                                 mesh_key=mesh_key)
        if s.tls_cert_path:
            cert, key = s.tls_cert_path, s.tls_key_path
        else:
            cert, key = ensure_self_signed(Path(self.cfg.data_dir) / "derp_certs", s.hostname)
            self.cert_pin = cert_name(cert)
        host, self.port = _hostport(s.listen_addr)
        self._listener = await serve_derp(self.server, host, self.port,
                                          server_ssl_context(cert, key))
        stun_host, self.stun_port = _hostport(s.stun_listen_addr)
        self._stun = await serve_stun(stun_host, self.stun_port)
        for peer in s.mesh_with:
            # "host:port" or a full URL. TLS is not verified on mesh links (as python -m derp
            # does): the mesh key, not the certificate, is what authenticates the peer.
            url = peer if "://" in peer else f"https://{peer}/derp"
            self.server.add_mesh_peer(url)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._stun is not None:
            self._stun.close()
        await self.server.close()

    def region(self) -> dict[str, Any]:
        s = self.srv_cfg
        ipv4 = str(s.ipv4) if s.ipv4 else ""
        ipv6 = str(s.ipv6) if s.ipv6 else ""
        try:
            literal = ipaddress.ip_address(s.hostname)
        except ValueError:
            literal = None
        if literal is not None:
            # An IP host name needs no DNS; "none" stops clients trying the other family.
            ipv4 = ipv4 or (str(literal) if literal.version == 4 else "none")
            ipv6 = ipv6 or (str(literal) if literal.version == 6 else "none")
        pin = self.cert_pin.removeprefix("sha256-raw:") if self.cert_pin else None
        return embedded_region(
            host=s.hostname, derp_port=self.port, stun_port=self.stun_port,
            region_id=s.region_id, region_code=s.region_code, region_name=s.region_name,
            ipv4=ipv4, ipv6=ipv6, cert_sha256=pin, insecure_for_tests=s.insecure_for_tests)

    def describe(self) -> str:
        tls = "self-signed, pinned" if self.cert_pin else "configured certificate"
        return (f"region {self.srv_cfg.region_id} ({self.srv_cfg.region_code}) on "
                f"{self.srv_cfg.listen_addr} (TLS, {tls}), STUN on {self.srv_cfg.stun_listen_addr}")
