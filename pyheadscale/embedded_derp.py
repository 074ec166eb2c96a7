"""The DERP relay and STUN server embedded in pyheadscale, and its DERP-map region.

As in Headscale, the relay's routes (``/derp``, ``/derp/probe``, ``/derp/latency-check``,
``/bootstrap-dns``, and ``/generate_204``) are served on the main listener, and when
server_url is https the DERP map points at server_url's host and port: the relay shares the
server's certificate (a file, ACME, or a TLS-terminating reverse proxy in front).

The separate listener (``derp.server.listen_addr``, a pyheadscale key) is the other mode; it
is also the default when server_url is plain http, because clients speak DERP only over TLS.
Without ``derp.server.tls_cert_path`` it makes a self-signed certificate and pins it in the
DERP map (``CertName: sha256-raw:...``, clients >= 1.82); older clients need a certificate
they trust (``derp.server.tls_cert_path``) or ``insecure_for_tests``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from derp.frontdoor import DoorLimits, Router
from derp.http import derp_router, serve_derp
from derp.keys import load_or_create_private_key
from derp.mesh import verifying_context
from derp.server import DerpServer
from derp.stun import serve_stun
from derp.tls import cert_name, ensure_self_signed, server_ssl_context
from pyheadscale.config import Config
from pyheadscale.mapper.derpmap import embedded_region, server_url_port
from pyheadscale.startup import failing_key
from pyheadscale.state.tailnet import Tailnet
from pyheadscale.tailcfg import KeyKind, parse_key

log = logging.getLogger("pyheadscale.derp")

BOOTSTRAP_TTL = 600.0
BOOTSTRAP_MAX_HOSTS = 64


def _hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class EmbeddedDerp:
    server: DerpServer  # set by start()

    def __init__(self, cfg: Config, tailnet: Tailnet, door_limits: DoorLimits | None = None,
                 *, mesh_key: str | None = None, node_name: str = "") -> None:
        """`door_limits` bound the relay's own listener; `mesh_key` (cluster mode, when
        derp.server.mesh_key_path is unset) is the region's shared key; `node_name` names this
        relay's node in a region of several instances."""
        self.cfg = cfg
        self.door_limits = door_limits
        self._mesh_key = mesh_key
        self.node_name = node_name
        # Cluster mode: the other instances' relays (instance id -> DERP node, mesh link).
        self._peer_nodes: dict[str, dict[str, Any]] = {}
        self._peer_links: dict[str, tuple[str, Any]] = {}
        self.srv_cfg = cfg.derp.server
        self.tailnet = tailnet
        self._listener: asyncio.base_events.Server | None = None
        self._stun: asyncio.DatagramTransport | None = None
        self.cert_pin: str | None = None
        self.port = 0
        self._derp_map: Callable[[], Mapping[str, Any]] = dict
        self._bootstrap: dict[str, list[str]] = {}
        self._bootstrap_at = float("-inf")
        self._resolving: asyncio.Task[None] | None = None

    @property
    def on_main_listener(self) -> bool:
        """The DERP map points at server_url (no separate listener)."""
        return not self.srv_cfg.listen_addr

    async def _verify(self, node_key: bytes, source_ip: str) -> bool:
        return self.tailnet.node_by_node_key(node_key) is not None

    async def start(self) -> None:
        """Read the keys, bind the listeners; a failure names its config key and leaves
        nothing bound."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.srv_cfg
        key_path = s.private_key_path or Path(self.cfg.data_dir) / "derp_server_private.key"
        # The mesh key (derper's 64-hex --mesh-psk-file format) also admits mesh peers and
        # probers (derpprobe --mesh-psk-file) past verify_clients, as in derper.
        mesh_key = self._mesh_key
        if s.mesh_key_path:
            with failing_key("derp.server.mesh_key_path", "cannot read the mesh key"):
                mesh_key = Path(s.mesh_key_path).read_text().strip()
        with failing_key("derp.server.private_key_path", "cannot read or create the DERP key"):
            private_key = load_or_create_private_key(key_path)
        self.server = DerpServer(private_key,
                                 verify_client=self._verify if s.verify_clients else None,
                                 mesh_key=mesh_key)
        if not s.listen_addr:  # on the main listener
            self.port = server_url_port(self.cfg.server_url)
        else:
            if s.tls_cert_path is not None and s.tls_key_path is not None:  # a checked pair
                cert, key = s.tls_cert_path, s.tls_key_path
            else:
                with failing_key("data_dir", "cannot create the relay's certificate"):
                    cert, key = ensure_self_signed(Path(self.cfg.data_dir) / "derp_certs",
                                                   s.hostname)
                self.cert_pin = cert_name(cert)
            with failing_key("derp.server.tls_cert_path", f"cannot load {cert} with {key}"):
                context = server_ssl_context(cert, key)
            host, self.port = _hostport(s.listen_addr)
            with failing_key("derp.server.listen_addr", f"cannot listen on {s.listen_addr}"):
                self._listener = await serve_derp(self.server, host, self.port, context,
                                                  bootstrap_dns=self._bootstrap_table,
                                                  limits=self.door_limits)
        stun_host, self.stun_port = _hostport(s.stun_listen_addr)
        with failing_key("derp.server.stun_listen_addr", f"cannot listen on {s.stun_listen_addr}"):
            self._stun = await serve_stun(stun_host, self.stun_port)
        for peer in s.mesh_with:
            # The mesh key is sealed to the key the peer presents: verify the peer first, by
            # its certificate (system CAs or mesh_ca_cert_path) and/or its pinned DERP key.
            url = peer.url if "://" in peer.url else f"https://{peer.url}/derp"
            pin = parse_key(KeyKind.NODE, peer.public_key) if peer.public_key else None
            ca = str(s.mesh_ca_cert_path) if s.mesh_ca_cert_path else None
            ctx = verifying_context(ca) if ca or pin is None else None
            self.server.add_mesh_peer(url, ssl=ctx, public_key=pin)

    def router(self, derp_map: Callable[[], Mapping[str, Any]]) -> Router:
        """The relay's routes for the main listener; /bootstrap-dns answers for the hosts of
        ``derp_map()``, the DERP map clients currently get (as Headscale does)."""
        self._derp_map = derp_map
        return derp_router(self.server, bootstrap_dns=self._bootstrap_table)

    def _bootstrap_table(self) -> dict[str, list[str]]:
        # The front door answers synchronously: serve the last resolution and refresh it in
        # the background when it is older than BOOTSTRAP_TTL.
        if (time.monotonic() - self._bootstrap_at > BOOTSTRAP_TTL
                and (self._resolving is None or self._resolving.done())):
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())
        return self._bootstrap

    async def _resolve(self) -> None:
        self._bootstrap_at = time.monotonic()
        hosts = sorted({str(n.get("HostName") or "")
                        for r in (self._derp_map().get("Regions") or {}).values()
                        for n in (r.get("Nodes") or ())} - {""})
        loop = asyncio.get_running_loop()
        table: dict[str, list[str]] = {}
        for host in hosts[:BOOTSTRAP_MAX_HOSTS]:
            try:
                infos = await asyncio.wait_for(loop.getaddrinfo(host, None), 5)
            except (OSError, TimeoutError):
                continue
            table[host] = sorted({str(i[4][0]) for i in infos})
        self._bootstrap = table

    # --- a region of several instances (cluster mode) --------------------------------------

    def cluster_info(self) -> dict[str, Any]:
        """What the other instances need: this relay's DERP node and where to mesh with it."""
        node = dict(self.region()["Nodes"][0], Name=self._cluster_node_name())
        host = node.get("HostName") or node.get("IPv4")
        return {"node": node, "key": self.server.public_key.hex(),
                "mesh_url": f"https://{host}:{self.port}/derp"}

    async def set_peers(self, peers: Mapping[str, Mapping[str, Any]]) -> bool:
        """The other live instances (id -> their cluster_info()): their nodes join this
        relay's region in the DERP map and this relay meshes with each. Returns whether the
        region changed."""
        nodes = {i: dict(p["node"]) for i, p in peers.items()
                 if isinstance(p.get("node"), dict) and p["node"].get("HostName")}
        changed = nodes != self._peer_nodes
        self._peer_nodes = nodes
        if self.server.mesh_key:
            for i in [i for i in self._peer_links if i not in peers]:
                _, link = self._peer_links.pop(i)
                await self.server.remove_mesh_peer(link)
            for i, p in peers.items():
                url = p.get("mesh_url")
                if not isinstance(url, str) or self._peer_links.get(i, ("",))[0] == url:
                    continue
                if i in self._peer_links:
                    await self.server.remove_mesh_peer(self._peer_links.pop(i)[1])
                # The database (which holds the mesh key too) told us this relay's address and
                # DERP key: pin that key, so the mesh key is only sealed to that relay.
                try:
                    pin = bytes.fromhex(str(p.get("key")))
                except ValueError:
                    pin = b""
                if len(pin) != 32:
                    log.warning("relay of instance %s: no valid DERP key shared, not meshed", i)
                    continue
                self._peer_links[i] = (url, self.server.add_mesh_peer(url, public_key=pin))
        return changed

    async def stop(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._stun is not None:
            self._stun.close()
        if "server" in vars(self):  # a start that failed early never made one
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
        region = embedded_region(
            host=s.hostname, derp_port=self.port, stun_port=self.stun_port,
            region_id=s.region_id, region_code=s.region_code, region_name=s.region_name,
            ipv4=ipv4, ipv6=ipv6, cert_sha256=pin, insecure_for_tests=s.insecure_for_tests)
        if self._peer_nodes:
            # Several instances: this relay first (its own clients home on it), then the
            # others' (clients fall back to them; the mesh carries packets between them).
            # A lone instance keeps the single-node region unchanged.
            region["Nodes"][0]["Name"] = self._cluster_node_name()
            region["Nodes"] += [dict(n, RegionID=s.region_id)
                                for _, n in sorted(self._peer_nodes.items())]
        return region

    def _cluster_node_name(self) -> str:
        """This relay's node name in a region of several instances (unique per instance)."""
        return f"{self.srv_cfg.region_id}-{self.node_name}"

    def describe(self) -> str:
        where = (f"the main listener ({urlsplit(self.cfg.server_url).netloc})"
                 if self.on_main_listener else
                 f"{self.srv_cfg.listen_addr} (TLS, "
                 f"{'self-signed, pinned' if self.cert_pin else 'configured certificate'})")
        # The public key is what other relays pin in their mesh_with.
        return (f"region {self.srv_cfg.region_id} ({self.srv_cfg.region_code}) on {where}, "
                f"STUN on {self.srv_cfg.stun_listen_addr}, "
                f"key nodekey:{self.server.public_key.hex()}")
