"""One DERP connection after the HTTP upgrade: handshake, then the forwarding hot path.

``ClientConn`` is an asyncio.BufferedProtocol.  It parses each read as it arrives and routes a
SendPacket straight into the destination's output buffer: while that connection is writable,
its RecvPacket frames are collected in one list that goes out as a single ``transport.write``
when the read that produced them has been routed (or as soon as it holds FLUSH_PACKETS), so a
TLS record and a syscall carry many packets.  The reader never waits on a slow receiver: when
a transport's buffer is full (``pause_writing``) packets go to bounded deques (32 data + 32
disco, as derper's queues) that drop from the head, and a write timeout (2 s, 30 s for mesh
peers) closes the stalled connection, as derper does.  docs/derp-relay.md has the reasons.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from . import protocol as p

if TYPE_CHECKING:
    from .server import DerpServer, VerifyClient

log = logging.getLogger("derp.server")

MESH_WRITE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0
WRITE_HIGH_WATER = 256 << 10

_HDR = struct.Struct(">BI")
_HDR_PACK = _HDR.pack
_HDR_UNPACK = _HDR.unpack_from
_RECV = p.FrameType.RECV_PACKET
# A writable connection's pending packets are written once there are this many (~85 KiB),
# whatever is left of the read that produced them.
FLUSH_PACKETS = 64
_PREFIX_CACHE_MAX = 64
# An incomplete frame longer than this waits in a buffer of its own that the transport reads
# the rest into, instead of being copied into and out of the shared buffer on every read
# (quadratic for a client that trickles a big frame).
_BIG_FRAME = 16 << 10
# At most this much is read from one connection at a time (~96 packets): enough to spread a
# read's fixed cost, small enough that one busy sender does not hold up the others for long.
_READ_CHUNK = 128 << 10
# The receive buffer the server shares among its connections (reads are handled one at a
# time): a read behind the start of an incomplete small frame.
READ_BUFFER = _READ_CHUNK + _BIG_FRAME + 64
_SEND_MAX = p.KEY_LEN + p.MAX_PACKET_SIZE
_FWD_MAX = 2 * p.KEY_LEN + p.MAX_PACKET_SIZE
_DISCO0 = p.DISCO_MAGIC[0]
_DISCO = p.DISCO_MAGIC
_DISCO_MIN = p.DISCO_MIN_LEN

ST_HANDSHAKE, ST_VERIFY, ST_RUN, ST_CLOSED = range(4)


class ClientConn(asyncio.BufferedProtocol):
    """One DERP connection after the HTTP upgrade (handshake, then frame loop).

    A BufferedProtocol: the transport reads (and decrypts) straight into the server's shared
    receive buffer, so no read allocates; nothing may point into that buffer once
    ``buffer_updated`` returns (packets for a paused receiver are copied, writable receivers
    are flushed before it returns).
    """

    def __init__(self, server: DerpServer, peer_ip: str, peer_port: int, not_ideal: bool) -> None:
        self.server = server
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.not_ideal = not_ideal
        self.key = b""
        self.info: p.ClientInfo | None = None
        self.can_mesh = False
        self.is_dup = False
        self.preferred = False
        self.heard_from: set[bytes] = set()
        self.transport: Any = None
        self._state = ST_HANDSHAKE
        self._pending = b""  # unparsed bytes (a partial frame) that precede the next read
        self._pending_len = 0  # how much of _pending get_buffer put in front of the read
        self._partial: bytearray | None = None  # an incomplete big frame, filled in place
        self._partial_len = 0  # bytes of _partial received so far
        self._skip = 0
        depth = server.queue_depth
        # While writable, frames go straight into _out (written once the read that produced
        # them is routed); while the transport is paused they wait in these head-drop queues.
        self._out: list[Any] = []  # bytes and memoryviews, joined by flush
        self._nout = 0  # packets in _out
        self._data: deque[tuple[bytes, Any]] = deque(maxlen=depth)
        self._disco: deque[tuple[bytes, Any]] = deque(maxlen=depth)
        self._ctrl: list[bytes] = []
        self._prefix: dict[int, bytes] = {}  # frame length -> RecvPacket header + our key
        self._pong_pending = False
        self._dirty = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._wtimer: asyncio.TimerHandle | None = None
        self._nh_tokens = 3.0
        self._nh_last = 0.0
        self._verify_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        loop = self.server._loop_get()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        try:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        except (AttributeError, NotImplementedError):
            pass

    def start(self, transport: Any, prefix: bytes = b"", surplus: bytes = b"") -> None:
        """Attach to a transport: write ``prefix`` (the 101 response) + ServerKey in one write,
        then parse ``surplus`` (bytes that arrived after the request head)."""
        self.connection_made(transport)
        transport.write(prefix + self.server.server_key_frame)
        if surplus:
            self.data_received(surplus)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == ST_CLOSED and self.transport is None:
            return
        self._state = ST_CLOSED
        self._cancel_timers()
        if self._verify_task is not None:
            self._verify_task.cancel()
        self._data.clear()
        self._disco.clear()
        self._ctrl.clear()
        self._out = []
        self._nout = 0
        self.transport = None
        self.server._unregister(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._paused = True
        if self._wtimer is None and self._state == ST_RUN:
            timeout = MESH_WRITE_TIMEOUT if self.can_mesh else self.server.write_timeout
            if timeout > 0:
                self._wtimer = self.server._loop_get().call_later(timeout, self._write_timeout)

    def resume_writing(self) -> None:
        self._paused = False
        if self._wtimer is not None:
            self._wtimer.cancel()
            self._wtimer = None
        if (self._data or self._disco or self._ctrl) and not self._dirty:
            self._dirty = True
            self.server._mark_dirty(self)

    def _write_timeout(self) -> None:
        self._wtimer = None
        self.server.stats.write_timeouts += 1
        self.abort()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self._state in (ST_HANDSHAKE, ST_VERIFY):
            self.abort()

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._wtimer is not None:
            self._wtimer.cancel()
            self._wtimer = None

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            # flush what is queued, then close
            self.flush()
            t.close()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()

    # ----------------------------------------------------------------------------- reading

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._partial is not None:
            return memoryview(self._partial)[self._partial_len:]
        view = self.server._read_view
        if self._state == ST_VERIFY:
            return view[:_READ_CHUNK]  # what waits for the verdict is kept in _pending
        k = self._pending_len = len(self._pending)
        if k:
            view[:k] = self._pending
        return view[k:k + _READ_CHUNK]

    def buffer_updated(self, nbytes: int) -> None:
        frame = self._partial
        if frame is not None:
            self._partial_len += nbytes
            if self._partial_len == len(frame):
                self._partial = None
                self._feed(frame, len(frame))
            return
        if self._state == ST_VERIFY:
            held = self._pending + self.server._read_buf[:nbytes]
            self._feed(held, len(held))
            return
        self._pending = b""
        self._feed(self.server._read_buf, self._pending_len + nbytes)

    def data_received(self, data: bytes) -> None:
        """For writers that hand over bytes (the WebSocket wrapper, bytes read with the head):
        copied in as if the transport had read them."""
        view = memoryview(data)
        while view and self.transport is not None and not self.transport.is_closing():
            buf = self.get_buffer(len(view))
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            self.buffer_updated(k)
            view = view[k:]

    def _keep(self, data: bytes | bytearray, off: int, n: int) -> None:
        """Keep data[off:n], the start of a frame, until the rest arrives."""
        if n - off >= 5:
            size = 5 + p.unpack_header(data, off)[1]
            if size > _BIG_FRAME:
                self._partial = bytearray(size)
                self._partial[:n - off] = data[off:n]
                self._partial_len = n - off
                return
        self._pending = bytes(data[off:n])

    def _feed(self, data: bytes | bytearray, n: int) -> None:
        """Act on data[:n], everything not yet consumed on this connection."""
        st = self._state
        if st == ST_RUN:
            self._process(data, n)
        elif st == ST_HANDSHAKE:
            self._handshake(data, n)
        elif st == ST_VERIFY:
            if n > 4 * p.MAX_PACKET_SIZE:
                self.abort()  # a client may pipeline, but not without bound
                return
            self._pending = bytes(data[:n])

    def _handshake(self, data: bytes | bytearray, n: int) -> None:
        if n < 5:
            self._pending = bytes(data[:n])
            return
        ftype, flen = p.unpack_header(data, 0)
        if ftype != p.FrameType.CLIENT_INFO or flen < p.CLIENT_INFO_MIN or \
                flen > p.CLIENT_INFO_MAX:
            self.abort()
            return
        end = 5 + flen
        if n < end:
            self._keep(data, 0, n)
            return
        try:
            key, info = p.open_client_info(self.server.private_key, bytes(data[5:end]))
        except p.DerpProtocolError:
            self.abort()
            return
        self.key = key
        self.info = info
        rest = bytes(data[end:n])
        srv = self.server
        if srv.mesh_key and info.mesh_key and hmac.compare_digest(
                info.mesh_key.encode(), srv.mesh_key.encode()):
            self.can_mesh = True
        if self.can_mesh or srv.verify_client is None:
            self._admit(rest)
            return
        self._state = ST_VERIFY
        self._pending = rest
        self._verify_task = srv._loop_get().create_task(self._verify(srv.verify_client))

    async def _verify(self, verify: VerifyClient) -> None:
        try:
            ok = await verify(self.key, self.peer_ip)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("verify_client raised; refusing %s", self.key.hex()[:16], exc_info=True)
            ok = False
        self._verify_task = None
        if self._state != ST_VERIFY:
            return
        if not ok:
            log.info("refused client nodekey:%s from %s", self.key.hex(), self.peer_ip)
            self.abort()
            return
        rest = self._pending
        self._pending = b""
        self._admit(rest)

    def _admit(self, rest: bytes) -> None:
        srv = self.server
        if self._timer is not None:
            self._timer.cancel()
        self.transport.write(p.server_info_frame(srv.private_key, self.key))
        self._state = ST_RUN
        srv._register(self)
        loop = srv._loop_get()
        self._timer = loop.call_later(
            p.KEEPALIVE_INTERVAL + random.random() * p.KEEPALIVE_JITTER, self._keepalive)
        if rest:
            self._process(rest, len(rest))

    def _keepalive(self) -> None:
        if self._state != ST_RUN:
            return
        self.enqueue_ctrl(p.KEEP_ALIVE_FRAME)
        self._timer = self.server._loop_get().call_later(
            p.KEEPALIVE_INTERVAL + random.random() * p.KEEPALIVE_JITTER, self._keepalive)

    def _process(self, data: bytes | bytearray, n: int) -> None:
        """Parse and act on every complete frame in ``data[:n]``; keep the remainder."""
        off = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return
            off = self._skip
            self._skip = 0
        srv = self.server
        if self.is_dup:
            srv._make_active(self)
        active = srv._active
        key = self.key
        prefixes = self._prefix
        mv = memoryview(data)
        npk = 0
        touched: list[ClientConn] = []  # receivers to flush once this read is routed
        try:
            while n - off >= 5:
                ftype, flen = _HDR_UNPACK(data, off)
                end = off + 5 + flen
                if ftype == 4:  # SendPacket, the hot path
                    if flen < 32 or flen > _SEND_MAX:
                        self.abort()
                        return
                    if end > n:
                        break
                    npk += 1
                    dst = mv[off + 5:off + 37].tobytes()
                    c = active.get(dst)
                    if c is not None and not c._paused:
                        # inline enqueue_packet for a writable receiver: RecvPacket has the same
                        # length as the SendPacket, so its header + our key is cached per length
                        if key not in c.heard_from:
                            srv._note_heard(c, key)
                        pfx = prefixes.get(flen)
                        if pfx is None:
                            pfx = self._new_prefix(flen)
                        if not c._nout:
                            touched.append(c)
                        c._out += (pfx, mv[off + 37:end])
                        c._nout += 1
                        if c._nout >= FLUSH_PACKETS:
                            c.flush()
                    elif c is not None:
                        c.enqueue_packet(key, mv[off + 37:end])
                    else:
                        srv._route_slow(self, dst, mv[off + 37:end])
                    off = end
                    continue
                if ftype in _HANDLED:
                    if flen > _HANDLED[ftype]:
                        self.abort()
                        return
                    if end > n:
                        break
                    if not self._control(ftype, bytes(data[off + 5:end])):
                        return
                    off = end
                    continue
                # unknown (or client-side) type: discard its payload, streaming if needed
                if end > n:
                    self._skip = end - n
                    off = n
                    break
                off = end
            srv.stats.packets_received += npk
            if off < n and self._state == ST_RUN:
                self._keep(data, off, n)
        finally:
            # Write what this read produced now rather than after every other socket's read
            # in this loop iteration: the first packet of a burst is not held back by the rest.
            for c in touched:
                c.flush()

    def _new_prefix(self, flen: int) -> bytes:
        if len(self._prefix) >= _PREFIX_CACHE_MAX:
            self._prefix.clear()  # a client cycling through sizes must not grow this
        pfx = self._prefix[flen] = _HDR_PACK(_RECV, flen) + self.key
        return pfx

    def _control(self, ftype: int, payload: bytes) -> bool:
        """Handle a non-SendPacket frame; False means the connection was closed."""
        n = len(payload)
        srv = self.server
        if ftype == 0x12:  # Ping
            if n < p.PING_MIN:
                self.abort()
                return False
            srv.stats.got_ping += 1
            if not self._pong_pending:
                self._pong_pending = True
                self.enqueue_ctrl(b"\x13\x00\x00\x00\x08" + payload[:8])
            return True
        if ftype == 0x07:  # NotePreferred
            if n != 1:
                self.abort()
                return False
            pref = payload[0] != 0
            if pref != self.preferred:
                self.preferred = pref
                srv.stats.home_connections += 1 if pref else -1
            return True
        if ftype == 0x0A:  # ForwardPacket
            if not self.can_mesh or n < 64:
                self.abort()
                return False
            srv.deliver_forwarded(payload[:32], payload[32:64], memoryview(payload)[64:])
            return True
        if ftype == 0x10:  # WatchConns
            if not self.can_mesh or n != 0:
                self.abort()
                return False
            if self not in srv._watchers:
                srv._watchers.add(self)
                for c in srv._active.values():
                    self.enqueue_ctrl(c.present_frame())
            return True
        if ftype == 0x11:  # ClosePeer
            if not self.can_mesh or n != 32:
                self.abort()
                return False
            srv.close_peer(payload)
            return True
        return True

    # ----------------------------------------------------------------------------- writing

    def enqueue_packet(self, src: bytes, pkt: Any) -> None:
        """Send RecvPacket(src, pkt) soon; while paused, queue it (head-drop when full).
        Never blocks.  (ClientConn._process inlines the writable case.)"""
        if self._state != ST_RUN:
            self.server.stats.dropped["gone_disconnected"] += 1
            return
        if src not in self.heard_from:
            self.server._note_heard(self, src)
        if self._paused:
            if len(pkt) >= _DISCO_MIN and pkt[0] == _DISCO0 and pkt[:6] == _DISCO:
                q = self._disco
            else:
                q = self._data
            if len(q) == q.maxlen:
                self.server.stats.dropped["queue_head"] += 1
            q.append((src, bytes(pkt)))  # pkt may be a view of the shared receive buffer
            return
        self._out += (_HDR_PACK(_RECV, 32 + len(pkt)), src, pkt)
        self._nout += 1
        if self._nout >= FLUSH_PACKETS:
            self.flush()
        elif not self._dirty:
            self._dirty = True
            self.server._mark_dirty(self)

    def enqueue_ctrl(self, frame: bytes) -> None:
        if self._state != ST_RUN:
            return
        if self._paused:
            self._ctrl.append(frame)
            return
        self._out.append(frame)
        if not self._dirty:
            self._dirty = True
            self.server._mark_dirty(self)

    def flush(self) -> None:
        self._dirty = False
        t = self.transport
        if t is None or self._paused:
            return
        if self._ctrl or self._disco or self._data:
            self._out[:0] = self._backlog()  # what waited out a pause goes first
        out = self._out
        if not out:
            return
        if self._pong_pending:
            self._pong_pending = False
            self.server.stats.sent_pong += 1
        npk = self._nout
        self._out = []
        self._nout = 0
        self.server.stats.packets_sent += npk
        try:
            t.write(b"".join(out))
        except Exception:
            self.server.stats.dropped["write_error"] += npk
            self.abort()

    def _backlog(self) -> list[Any]:
        """Frames queued while paused, in order: control, disco, data."""
        parts: list[Any] = self._ctrl[:]
        self._ctrl.clear()
        for q in (self._disco, self._data):
            self._nout += len(q)
            for src, pkt in q:
                parts += (_HDR_PACK(_RECV, 32 + len(pkt)), src, pkt)
            q.clear()
        return parts

    def present_frame(self) -> bytes:
        flags = 0
        if self.can_mesh:
            flags |= p.PeerPresentFlags.IS_MESH_PEER
        if self.info is not None and self.info.is_prober:
            flags |= p.PeerPresentFlags.IS_PROBER
        if self.not_ideal:
            flags |= p.PeerPresentFlags.NOT_IDEAL
        return p.peer_present_frame(self.key, p.ipv6_mapped(self.peer_ip),
                                    self.peer_port & 0xFFFF, flags or 1)

    def maybe_not_here(self, dst: bytes) -> None:
        """PeerGone(NotHere) for a disco packet to an unknown key, 1/s burst 3."""
        now = self.server._loop_get().time()
        self._nh_tokens = min(3.0, self._nh_tokens + (now - self._nh_last))
        self._nh_last = now
        if self._nh_tokens >= 1.0:
            self._nh_tokens -= 1.0
            self.server.stats.peer_gone_not_here_frames += 1
            self.enqueue_ctrl(p.peer_gone_frame(dst, p.PeerGoneReason.NOT_HERE))


# frame type -> max payload for the frames the server acts on (besides SendPacket)
_HANDLED: dict[int, int] = {
    0x07: 1,
    0x0A: _FWD_MAX,
    0x10: 0,
    0x11: 32,
    0x12: p.PING_MAX,
}
