"""DERP relay core: routing by node key, duplicate connections, PeerGone, stats, mesh.

The connections themselves (handshake, reading, the forwarding hot path, queues) are
``derp.conn.ClientConn``; docs/derp-relay.md explains how forwarding works and behaves under
load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import protocol as p
from .conn import READ_BUFFER, ST_RUN, ClientConn

__all__ = ["ClientConn", "DerpServer", "PacketForwarder", "Stats", "VerifyClient"]

log = logging.getLogger("derp.server")

VerifyClient = Callable[[bytes, str], Awaitable[bool]]

QUEUE_DEPTH = 32
WRITE_TIMEOUT = 2.0


class PacketForwarder(Protocol):
    """Something that can carry a packet to another relay of the region (a mesh link).

    ``packet`` may be a view of the shared receive buffer: copy it before returning."""

    def forward(self, src: bytes, dst: bytes, packet: bytes | memoryview) -> None: ...


@dataclass
class Stats:
    """Counters named after derper's expvars; drop reasons as in derp_packets_dropped."""

    packets_received: int = 0
    packets_sent: int = 0
    packets_forwarded_out: int = 0
    packets_forwarded_in: int = 0
    accepts: int = 0
    current_connections: int = 0
    home_connections: int = 0
    got_ping: int = 0
    sent_pong: int = 0
    peer_gone_disconnected_frames: int = 0
    peer_gone_not_here_frames: int = 0
    write_timeouts: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {
        "unknown_dest": 0, "unknown_dest_on_fwd": 0, "gone_disconnected": 0,
        "queue_head": 0, "queue_tail": 0, "write_error": 0, "dup_client": 0,
    })


class _DupSet:
    __slots__ = ("conns", "history")

    def __init__(self, conns: list[ClientConn], history: list[ClientConn]) -> None:
        self.conns = conns
        self.history = history


class DerpServer:
    """A DERP relay, independent of how connections arrive.

    ``private_key`` is the 32-byte Curve25519 DERP key (keep it distinct from the Noise key).
    ``verify_client(node_key_raw32, source_ip)`` decides admission; a refused client is
    closed after its ClientInfo, without a ServerInfo.  Clients presenting ``mesh_key`` (64 hex
    chars) are trusted mesh peers: never verified, allowed ForwardPacket/WatchConns/ClosePeer.

    Serve it with ``derp.http.serve_derp(server, host, port, ssl_context)``; connect it to the
    other relays of its region with ``add_mesh_peer(url)``.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        verify_client: VerifyClient | None = None,
        mesh_key: str | None = None,
        queue_depth: int = QUEUE_DEPTH,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        if len(private_key) != 32:
            raise ValueError("DERP private key must be 32 bytes")
        self.private_key = bytes(private_key)
        self.public_key = p.public_key_of(self.private_key)
        self.verify_client = verify_client
        if mesh_key is not None:
            mesh_key = mesh_key.strip().lower()
            if len(mesh_key) != 64 or not all(c in "0123456789abcdef" for c in mesh_key):
                raise ValueError("mesh key must be 64 hex characters")
        self.mesh_key = mesh_key or None
        self.queue_depth = queue_depth
        self.write_timeout = write_timeout
        self.stats = Stats()
        self.server_key_frame = p.server_key_frame(self.public_key)
        # key -> active connection (the routing fast path)
        self._active: dict[bytes, ClientConn] = {}
        # key -> every live connection of that key, only for keys with >= 2 connections
        self._dups: dict[bytes, _DupSet] = {}
        self._all: set[ClientConn] = set()
        # key -> forwarders (mesh links) that announced it, earliest first
        self._forwarders: dict[bytes, list[PacketForwarder]] = {}
        self._watchers: set[ClientConn] = set()
        # src key -> {dst key: dst connection that received from src}: PeerGone on src's exit
        self._sent_to: dict[bytes, dict[bytes, ClientConn]] = {}
        self._dirty: list[ClientConn] = []
        self._flush_pending = False
        self._read_buf = bytearray(READ_BUFFER)
        self._read_view = memoryview(self._read_buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mesh_links: list[Any] = []

    # ----------------------------------------------------------------------------- connections

    def new_connection(self, peer_ip: str = "", peer_port: int = 0, *,
                       not_ideal: bool = False) -> ClientConn:
        """A protocol object for one upgraded connection (the HTTP layer calls this)."""
        return ClientConn(self, peer_ip, peer_port, not_ideal)

    def connection_count(self) -> int:
        return len(self._all)

    def is_connected(self, key: bytes) -> bool:
        return key in self._active or key in self._dups

    def _loop_get(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _register(self, c: ClientConn) -> None:
        key = c.key
        self._all.add(c)
        self.stats.accepts += 1
        self.stats.current_connections = len(self._all)
        cur = self._active.get(key)
        dup = self._dups.get(key)
        if dup is not None:
            dup.conns.append(c)
            c.is_dup = True
            self._active[key] = c
        elif cur is not None:
            cur.is_dup = True
            c.is_dup = True
            self._dups[key] = _DupSet([cur, c], [cur])
            self._active[key] = c
        else:
            self._active[key] = c
        if self._watchers:
            frame = c.present_frame()
            for w in self._watchers:
                w.enqueue_ctrl(frame)

    def _unregister(self, c: ClientConn) -> None:
        if c not in self._all:
            return
        self._all.discard(c)
        self._watchers.discard(c)
        self.stats.current_connections = len(self._all)
        if c.preferred:
            self.stats.home_connections -= 1
        key = c.key
        dup = self._dups.get(key)
        gone = False
        if dup is not None:
            if c in dup.conns:
                dup.conns.remove(c)
            hist: list[ClientConn] = []
            for h in dup.history:
                if h in dup.conns and (not hist or hist[-1] is not h):
                    hist.append(h)
            dup.history = hist
            if len(dup.conns) == 1:
                only = dup.conns[0]
                only.is_dup = False
                del self._dups[key]
                self._active[key] = only
            elif self._active.get(key) is c:
                if hist:
                    self._active[key] = hist[-1]
                else:
                    del self._active[key]
        elif self._active.get(key) is c:
            del self._active[key]
            gone = True
        # the sender side of PeerGone: this connection no longer wants notices
        for src in c.heard_from:
            m = self._sent_to.get(src)
            if m is not None and m.get(key) is c:
                del m[key]
                if not m:
                    del self._sent_to[src]
        if gone:
            if self._watchers:
                frame = p.peer_gone_frame(key, p.PeerGoneReason.DISCONNECTED)
                for w in self._watchers:
                    w.enqueue_ctrl(frame)
            if not self._forwarders.get(key):
                self._peer_gone_from_region(key)

    def _peer_gone_from_region(self, key: bytes) -> None:
        watchers = self._sent_to.pop(key, None)
        if not watchers:
            return
        frame = p.peer_gone_frame(key, p.PeerGoneReason.DISCONNECTED)
        for dconn in watchers.values():
            if dconn._state == ST_RUN:
                dconn.heard_from.discard(key)
                dconn.enqueue_ctrl(frame)
                self.stats.peer_gone_disconnected_frames += 1

    def _note_heard(self, dst: ClientConn, src: bytes) -> None:
        dst.heard_from.add(src)
        self._sent_to.setdefault(src, {})[dst.key] = dst

    def _make_active(self, c: ClientConn) -> None:
        """lastWriterIsActive: any frame read from a duplicate makes it the active one."""
        dup = self._dups.get(c.key)
        if dup is None:
            c.is_dup = False
            return
        if self._active.get(c.key) is not c:
            self._active[c.key] = c
        if not dup.history or dup.history[-1] is not c:
            dup.history.append(c)
            if len(dup.history) > 64:
                del dup.history[:32]

    def close_peer(self, key: bytes) -> int:
        """Close every connection of ``key``; returns how many were closed."""
        conns = [c for c in self._all if c.key == key]
        for c in conns:
            c.close()
        return len(conns)

    # ------------------------------------------------------------------------------ routing

    def _route_slow(self, src_conn: ClientConn, dst: bytes, pkt: memoryview) -> None:
        fws = self._forwarders.get(dst)
        if fws:
            self.stats.packets_forwarded_out += 1
            try:
                fws[0].forward(src_conn.key, dst, pkt)
            except Exception:  # a broken mesh link must not kill the sender's reader
                log.debug("mesh forward failed", exc_info=True)
            return
        if dst in self._dups:
            self.stats.dropped["dup_client"] += 1
            return
        self.stats.dropped["unknown_dest"] += 1
        if p.looks_like_disco(pkt):
            src_conn.maybe_not_here(dst)

    def deliver_forwarded(self, src: bytes, dst: bytes, pkt: bytes | memoryview) -> None:
        """A packet that came from a mesh peer: local delivery only, never re-forwarded."""
        c = self._active.get(dst)
        if c is None:
            self.stats.dropped["unknown_dest_on_fwd"] += 1
            return
        self.stats.packets_forwarded_in += 1
        c.enqueue_packet(src, pkt)

    def _mark_dirty(self, c: ClientConn) -> None:
        self._dirty.append(c)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop_get().call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_pending = False
        dirty = self._dirty
        self._dirty = []
        for c in dirty:
            c.flush()

    # --------------------------------------------------------------------------------- mesh

    def add_packet_forwarder(self, key: bytes, fw: PacketForwarder) -> None:
        lst = self._forwarders.setdefault(key, [])
        if fw not in lst:
            lst.append(fw)

    def remove_packet_forwarder(self, key: bytes, fw: PacketForwarder) -> None:
        lst = self._forwarders.get(key)
        if not lst or fw not in lst:
            return
        lst.remove(fw)
        if not lst:
            del self._forwarders[key]
            if not self.is_connected(key):
                self._peer_gone_from_region(key)

    def add_mesh_peer(self, url: str, *, ssl: Any = None, retry_interval: float = 5.0,
                      server_hostname: str | None = None, public_key: bytes | None = None) -> Any:
        """Start a mesh link to another relay of the region (``http(s)://host[:port]/derp``).

        The link authenticates with this server's own DERP key and the mesh key, sends
        WatchConns and learns which keys live there; packets for them go out as ForwardPacket.
        The peer is verified first (derp/mesh.py): by ``ssl`` (default: the system's CAs and
        the host name) or, with ``public_key``, by its pinned DERP key.
        Returns the ``MeshLink`` (call ``await link.close()`` to stop it).  Requires mesh_key.
        """
        from .mesh import MeshLink

        if not self.mesh_key:
            raise ValueError("add_mesh_peer needs a mesh_key")
        link = MeshLink(self, url, ssl=ssl, retry_interval=retry_interval,
                        server_hostname=server_hostname, public_key=public_key)
        self._mesh_links.append(link)
        link.start()
        return link

    async def remove_mesh_peer(self, link: Any) -> None:
        """Stop a link made by add_mesh_peer (the other relay left the region)."""
        if link in self._mesh_links:
            self._mesh_links.remove(link)
        await link.close()

    async def close(self) -> None:
        """Stop mesh links and close every client connection."""
        for link in self._mesh_links:
            await link.close()
        self._mesh_links.clear()
        for c in list(self._all):
            c.close()
        for c in list(self._all):
            self._unregister(c)
