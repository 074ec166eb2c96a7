"""Sans-IO DERP frame codec and NaCl-box handshake.

Nothing here touches a socket or a clock: functions take bytes and return bytes or typed
events.  Byte layouts: docs/protocol.md, "DERP"; all integers are
big-endian.  The server's hot path (derp.server) parses SendPacket inline for speed but uses
the limits defined here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
FRAME_HEADER_LEN = 5
KEY_LEN = 32
NONCE_LEN = 24
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_FRAME_SIZE = 10 << 20  # WriteFrame refuses anything larger
CLIENT_MAX_FRAME = 1 << 20  # the Go client's Recv limit
CLIENT_INFO_MIN = KEY_LEN + NONCE_LEN
CLIENT_INFO_MAX = 256 << 10
PING_MIN, PING_MAX = 8, 1000
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
DISCO_MIN_LEN = 6 + KEY_LEN + NONCE_LEN
KEEPALIVE_INTERVAL = 60.0
KEEPALIVE_JITTER = 5.0

_HDR = struct.Struct(">BI")
pack_header = _HDR.pack
unpack_header = _HDR.unpack_from


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0  # client-internal, never on the wire


class PeerPresentFlags(IntEnum):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


class DerpProtocolError(Exception):
    """Malformed or forbidden input; the connection that produced it must be closed."""


class FrameTooLarge(DerpProtocolError):
    pass


class HandshakeError(DerpProtocolError):
    pass


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME_SIZE:
        raise FrameTooLarge(f"frame of {len(payload)} bytes")
    return pack_header(ftype, len(payload)) + payload


def server_key_frame(server_public: bytes) -> bytes:
    _check_key(server_public)
    return encode_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def send_packet_frame(dst: bytes, packet: bytes) -> bytes:
    _check_key(dst)
    if len(packet) > MAX_PACKET_SIZE:
        raise FrameTooLarge("packet too big")
    return pack_header(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def recv_packet_frame(src: bytes, packet: bytes) -> bytes:
    _check_key(src)
    return pack_header(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet


def forward_packet_frame(src: bytes, dst: bytes, packet: bytes) -> bytes:
    _check_key(src)
    _check_key(dst)
    if len(packet) > MAX_PACKET_SIZE:
        raise FrameTooLarge("packet too big")
    return pack_header(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


KEEP_ALIVE_FRAME = pack_header(FrameType.KEEP_ALIVE, 0)
WATCH_CONNS_FRAME = pack_header(FrameType.WATCH_CONNS, 0)


def note_preferred_frame(preferred: bool) -> bytes:
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def peer_gone_frame(key: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    _check_key(key)
    return encode_frame(FrameType.PEER_GONE, key + bytes((reason,)))


def peer_present_frame(key: bytes, ip16: bytes = bytes(16), port: int = 0, flags: int = 1) -> bytes:
    """PeerPresent: key, 16-byte IP (IPv4 as ::ffff:a.b.c.d), 2-byte port, 1-byte flags."""
    _check_key(key)
    if len(ip16) != 16:
        raise ValueError("ip must be 16 bytes")
    return encode_frame(FrameType.PEER_PRESENT, key + ip16 + struct.pack(">HB", port, flags))


def close_peer_frame(key: bytes) -> bytes:
    _check_key(key)
    return encode_frame(FrameType.CLOSE_PEER, key)


def ping_frame(data: bytes) -> bytes:
    if len(data) != 8:
        raise ValueError("ping data must be 8 bytes")
    return encode_frame(FrameType.PING, data)


def pong_frame(data: bytes) -> bytes:
    if len(data) != 8:
        raise ValueError("pong data must be 8 bytes")
    return encode_frame(FrameType.PONG, data)


def health_frame(problem: str) -> bytes:
    return encode_frame(FrameType.HEALTH, problem.encode())


def restarting_frame(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return encode_frame(FrameType.RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))


def _check_key(key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ValueError("keys are 32 bytes")


def looks_like_disco(packet: bytes | memoryview) -> bool:
    return len(packet) >= DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC


def ipv6_mapped(ip: str) -> bytes:
    """16-byte form of an address; IPv4 becomes ::ffff:a.b.c.d as in PeerPresent."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return bytes(16)
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


# ---------------------------------------------------------------------------------------------
# Decoding


class FrameDecoder:
    """Incremental frame splitter: feed bytes, get (type, payload) pairs.

    Frames larger than ``max_frame`` raise FrameTooLarge before their payload is buffered,
    so a hostile length cannot make us allocate.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = CLIENT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        off = 0
        n = len(buf)
        while n - off >= FRAME_HEADER_LEN:
            ftype, flen = unpack_header(buf, off)
            if flen > self.max_frame:
                raise FrameTooLarge(f"frame type {ftype:#x} of {flen} bytes")
            end = off + FRAME_HEADER_LEN + flen
            if end > n:
                break
            out.append((ftype, bytes(buf[off + FRAME_HEADER_LEN : end])))
            off = end
        if off:
            del buf[:off]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


# Typed events for what a client receives -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: bytes


@dataclass(frozen=True, slots=True)
class ServerInfoFrame:
    payload: bytes  # nonce + box, opened by ClientHandshake


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    ip16: bytes | None = None
    port: int | None = None
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    type: int
    payload: bytes


ServerEvent = (
    ServerKey
    | ServerInfoFrame
    | RecvPacket
    | KeepAlive
    | PeerGone
    | PeerPresent
    | Ping
    | Pong
    | Health
    | Restarting
    | UnknownFrame
)


def decode_server_frame(ftype: int, payload: bytes) -> ServerEvent | None:
    """Interpret a server->client frame as the Go client does; None means 'skip it'."""
    n = len(payload)
    if ftype == FrameType.RECV_PACKET:
        if n < KEY_LEN:
            return None
        return RecvPacket(payload[:KEY_LEN], payload[KEY_LEN:])
    if ftype == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if ftype == FrameType.PEER_GONE:
        if n < KEY_LEN:
            return None
        reason = payload[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED
        return PeerGone(payload[:KEY_LEN], reason)
    if ftype == FrameType.PEER_PRESENT:
        if n < KEY_LEN:
            return None
        key = payload[:KEY_LEN]
        if n < KEY_LEN + 18:
            return PeerPresent(key)
        ip16 = payload[32:48]
        port = int.from_bytes(payload[48:50], "big")
        flags = payload[50] if n > 50 else None
        return PeerPresent(key, ip16, port, flags)
    if ftype == FrameType.PING:
        if n < 8:
            return None
        return Ping(payload[:8])
    if ftype == FrameType.PONG:
        if n < 8:
            return None
        return Pong(payload[:8])
    if ftype == FrameType.HEALTH:
        return Health(payload.decode("utf-8", "replace"))
    if ftype == FrameType.RESTARTING:
        if n < 8:
            return None
        a, b = struct.unpack_from(">II", payload)
        return Restarting(a, b)
    if ftype == FrameType.SERVER_KEY:
        if n < 40 or payload[:8] != MAGIC:
            return None
        return ServerKey(payload[8:40])
    if ftype == FrameType.SERVER_INFO:
        return ServerInfoFrame(payload)
    return UnknownFrame(ftype, payload)


def parse_server_key(payload: bytes) -> bytes:
    """Payload of the first frame: magic + 32-byte key (+ ignored extra bytes)."""
    if len(payload) < 40:
        raise HandshakeError("short server key frame")
    if payload[:8] != MAGIC:
        raise HandshakeError("bad server key magic")
    return bytes(payload[8:40])


# ---------------------------------------------------------------------------------------------
# Handshake JSON


def _ci_get(obj: dict[str, Any], name: str) -> Any:
    """Go's encoding/json matches keys case-insensitively; exact match wins."""
    if name in obj:
        return obj[name]
    low = name.lower()
    for k, v in obj.items():
        if k.lower() == low:
            return v
    return None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A handshake frame's JSON object, or HandshakeError naming the frame."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HandshakeError(f"{what} JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HandshakeError(f"{what} JSON is not an object")
    return obj


@dataclass(slots=True)
class ClientInfo:
    mesh_key: str = ""  # 64 lowercase hex chars when set
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        if self.mesh_key:
            d["meshKey"] = self.mesh_key
        if self.version:
            d["version"] = self.version
        d["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            d["IsProber"] = True
        if self.app_name:
            d["AppName"] = self.app_name
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfo:
        obj = _json_object(raw, "client info")
        mesh = _ci_get(obj, "meshKey")
        version = _ci_get(obj, "version")
        acks = _ci_get(obj, "CanAckPings")
        prober = _ci_get(obj, "IsProber")
        app = _ci_get(obj, "AppName")
        if mesh is None or mesh == "":
            mesh = ""
        elif not isinstance(mesh, str) or len(mesh) != 64 or not _is_hex(mesh):
            raise HandshakeError("meshKey must be 64 hex characters")
        if version is None:
            version = 0
        elif isinstance(version, bool) or not isinstance(version, int):
            raise HandshakeError("version must be an integer")
        for v in (acks, prober):
            if v is not None and not isinstance(v, bool):
                raise HandshakeError("boolean field has wrong type")
        if app is not None and not isinstance(app, str):
            raise HandshakeError("AppName must be a string")
        return cls(mesh.lower(), version, bool(acks), bool(prober), app or "")


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class ServerInfo:
    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        if self.version:
            d["version"] = self.version
        if self.token_bucket_bytes_per_second:
            d["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            d["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        obj = _json_object(raw, "server info")
        vals = [_ci_get(obj, k) for k in ("version", "TokenBucketBytesPerSecond",
                                          "TokenBucketBytesBurst")]
        for v in vals:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise HandshakeError("server info field has wrong type")
        return cls(*(v or 0 for v in vals))


# ---------------------------------------------------------------------------------------------
# Handshake crypto (crypto_box_curve25519xsalsa20poly1305, nonce || tag || ciphertext)


def public_key_of(private_key: bytes) -> bytes:
    return bytes(PrivateKey(private_key).public_key)


def seal(private_key: bytes, peer_public: bytes, msg: bytes, nonce: bytes | None = None) -> bytes:
    box = Box(PrivateKey(private_key), PublicKey(peer_public))
    return bytes(box.encrypt(msg, nonce))


def open_box(private_key: bytes, peer_public: bytes, sealed: bytes) -> bytes:
    if len(sealed) < NONCE_LEN + 16:
        raise HandshakeError("sealed box too short")
    try:
        box = Box(PrivateKey(private_key), PublicKey(peer_public))
        return bytes(box.decrypt(bytes(sealed)))
    except (CryptoError, ValueError, TypeError):
        raise HandshakeError("msgbox: cannot open") from None


def client_info_frame(
    client_private: bytes, server_public: bytes, info: ClientInfo, nonce: bytes | None = None
) -> bytes:
    """ClientInfo: client public key || nonce || box(JSON)."""
    pub = public_key_of(client_private)
    sealed = seal(client_private, server_public, info.to_json(), nonce)
    return encode_frame(FrameType.CLIENT_INFO, pub + sealed)


def open_client_info(server_private: bytes, payload: bytes) -> tuple[bytes, ClientInfo]:
    """Server side: returns (client node key, ClientInfo). Raises HandshakeError."""
    if len(payload) < CLIENT_INFO_MIN:
        raise HandshakeError("short client info")
    if len(payload) > CLIENT_INFO_MAX:
        raise HandshakeError("long client info")
    client_pub = bytes(payload[:KEY_LEN])
    raw = open_box(server_private, client_pub, payload[KEY_LEN:])
    return client_pub, ClientInfo.from_json(raw)


def server_info_frame(
    server_private: bytes, client_public: bytes, info: ServerInfo | None = None,
    nonce: bytes | None = None,
) -> bytes:
    sealed = seal(server_private, client_public, (info or ServerInfo()).to_json(), nonce)
    return encode_frame(FrameType.SERVER_INFO, sealed)


def open_server_info(client_private: bytes, server_public: bytes, payload: bytes) -> ServerInfo:
    if len(payload) < NONCE_LEN:
        raise HandshakeError("short server info")
    if len(payload) > NONCE_LEN + MAX_INFO_LEN:
        raise HandshakeError("long server info")
    return ServerInfo.from_json(open_box(client_private, server_public, payload))
