"""Noise IK handshake of the Tailscale control protocol (control/controlbase/handshake.go).

The handshake itself is standard ``Noise_IK_25519_ChaChaPoly_BLAKE2s`` and is run by the
``noiseprotocol`` package; this module adds Tailscale's framing around it:

* initiation (client -> server, 101 bytes): ``u16 BE version | 01 | u16 BE 96 | 96 B msg``
* response (server -> client, 51 bytes):   ``02 | u16 BE 48 | 48 B msg``
* error (server -> client, instead):       ``03 | u16 BE n | n B UTF-8 text``

The prologue is ``b"Tailscale Control Protocol v" + str(version)``, built from the version in
the initiation header.  Split keys: k1 encrypts client->server, k2 server->client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from noise.connection import Keypair, NoiseConnection

if TYPE_CHECKING:
    from pyheadscale.noise.records import RecordLayer

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 0x01
MSG_RESPONSE = 0x02
MSG_ERROR = 0x03

INITIATION_SIZE = 101
INITIATION_PAYLOAD = 96
RESPONSE_SIZE = 51
RESPONSE_PAYLOAD = 48
MAX_ERROR_TEXT = 0xFFFF

_INIT_HEADER = struct.Struct(">HBH")
_MSG_HEADER = struct.Struct(">BH")


class NoiseError(Exception):
    """Base class of every error raised by the Noise layer."""


class HandshakeError(NoiseError):
    """The handshake cannot complete.  ``str(err)`` is safe to send in an error frame."""


class UnsupportedVersionError(HandshakeError):
    """The client's capability version is below the server's minimum."""

    def __init__(self, version: int, minimum: int) -> None:
        super().__init__(
            f"unsupported client version {version}: this server requires capability "
            f"version {minimum} or newer, please upgrade Tailscale"
        )
        self.version = version
        self.minimum = minimum


class ServerRefusedError(HandshakeError):
    """The server answered the initiation with an error frame (type 3)."""


@dataclass(frozen=True)
class HandshakeResult:
    """Outcome of a completed handshake, from the point of view of one side."""

    message: bytes  # responder: the 51-byte framed response to send; initiator: b""
    peer_static: bytes  # the other side's static public key (server: client machine key)
    version: int  # protocol (capability) version from the initiation header
    tx_key: bytes  # key for records this side sends
    rx_key: bytes  # key for records this side receives
    handshake_hash: bytes

    def records(self) -> RecordLayer:
        from pyheadscale.noise.records import RecordLayer

        return RecordLayer(self.tx_key, self.rx_key)


def prologue(version: int) -> bytes:
    return PROLOGUE_PREFIX + str(version).encode("ascii")


def error_frame(text: str) -> bytes:
    """A type-3 handshake error frame carrying ``text`` (truncated to 65535 bytes)."""
    raw = text.encode("utf-8")[:MAX_ERROR_TEXT]
    return _MSG_HEADER.pack(MSG_ERROR, len(raw)) + raw


def parse_initiation(initiation: bytes) -> int:
    """Validate the initiation framing like the reference server; return its version."""
    if len(initiation) != INITIATION_SIZE:
        raise HandshakeError("wrong handshake initiation size")
    version, typ, length = _INIT_HEADER.unpack_from(initiation)
    if typ != MSG_INITIATION:
        raise HandshakeError("unexpected handshake message type")
    if length != INITIATION_PAYLOAD:
        raise HandshakeError("wrong handshake initiation length")
    return int(version)


def _new(initiator: bool, version: int) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue(version))
    return conn


def _split(conn: NoiseConnection) -> tuple[bytes, bytes, bytes]:
    proto: Any = conn.noise_protocol
    return (
        bytes(proto.cipher_state_encrypt.k),
        bytes(proto.cipher_state_decrypt.k),
        bytes(conn.get_handshake_hash()),
    )


def respond(private_key: bytes, initiation: bytes, min_version: int = 0) -> HandshakeResult:
    """Answer a client's 101-byte initiation with the server's static ``private_key``.

    Raises ``HandshakeError`` (or ``UnsupportedVersionError``) with a message suitable for
    ``error_frame``.  Never raises anything else for bad input.
    """
    version = parse_initiation(initiation)
    if version < min_version:
        raise UnsupportedVersionError(version, min_version)
    if len(private_key) != 32:
        raise ValueError("server private key must be 32 bytes")
    conn = _new(False, version)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, bytes(private_key))
    conn.start_handshake()
    try:
        payload = conn.read_message(bytes(initiation[5:]))
    except Exception:  # InvalidTag, low-order points, ...: all mean a bad initiation
        raise HandshakeError("decrypting handshake initiation failed") from None
    if payload:
        raise HandshakeError("unexpected payload in handshake initiation")
    # The handshake state (holding rs) is discarded once the handshake finishes.
    peer = bytes(conn.noise_protocol.handshake_state.rs.public_bytes)
    msg = bytes(conn.write_message(b""))
    if len(msg) != RESPONSE_PAYLOAD or not conn.handshake_finished:
        raise HandshakeError("internal error: bad handshake response")
    tx, rx, hh = _split(conn)
    return HandshakeResult(
        message=_MSG_HEADER.pack(MSG_RESPONSE, RESPONSE_PAYLOAD) + msg,
        peer_static=peer,
        version=version,
        tx_key=tx,
        rx_key=rx,
        handshake_hash=hh,
    )


class Initiator:
    """Client side of the handshake (for the test client and load generators)."""

    def __init__(self, machine_private_key: bytes, server_public_key: bytes, version: int) -> None:
        if not 0 <= version <= 0xFFFF:
            raise ValueError("version must fit in 16 bits")
        self.version = version
        self.server_public_key = bytes(server_public_key)
        self._conn = _new(True, version)
        self._conn.set_keypair_from_private_bytes(Keypair.STATIC, bytes(machine_private_key))
        self._conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, self.server_public_key)
        self._conn.start_handshake()
        self._initiation: bytes | None = None

    def initiation(self) -> bytes:
        """The 101-byte framed initiation (computed once)."""
        if self._initiation is None:
            msg = bytes(self._conn.write_message(b""))
            self._initiation = _INIT_HEADER.pack(self.version, MSG_INITIATION, len(msg)) + msg
        return self._initiation

    @staticmethod
    def reply_length(header: bytes) -> int:
        """Given the first 3 bytes of the server's reply, how many bytes follow."""
        typ, length = _MSG_HEADER.unpack(header[:3])
        if typ == MSG_RESPONSE:
            if length != RESPONSE_PAYLOAD:
                raise HandshakeError(f"unexpected handshake response length {length}")
        elif typ != MSG_ERROR:
            raise HandshakeError(f"unexpected handshake response type {typ}")
        return int(length)

    def finish(self, reply: bytes) -> HandshakeResult:
        """Process the server's whole reply (51-byte response or error frame)."""
        self.initiation()
        if len(reply) < 3:
            raise HandshakeError("short handshake response")
        length = self.reply_length(reply[:3])
        if len(reply) != 3 + length:
            raise HandshakeError("wrong handshake response size")
        if reply[0] == MSG_ERROR:
            raise ServerRefusedError(reply[3:].decode("utf-8", "replace"))
        try:
            payload = self._conn.read_message(bytes(reply[3:]))
        except Exception:
            raise HandshakeError("decrypting handshake response failed") from None
        if payload or not self._conn.handshake_finished:
            raise HandshakeError("unexpected handshake response payload")
        tx, rx, hh = _split(self._conn)
        return HandshakeResult(
            message=b"",
            peer_static=self.server_public_key,
            version=self.version,
            tx_key=tx,
            rx_key=rx,
            handshake_hash=hh,
        )
