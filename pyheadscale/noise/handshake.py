"""Noise IK handshake of the Tailscale control protocol (control/controlbase/handshake.go).

The handshake itself is standard ``Noise_IK_25519_ChaChaPoly_BLAKE2s``: the server's side is
written out below (``respond``), the client's side (test client, load generators) is run by
the ``noiseprotocol`` package; this module adds Tailscale's framing around it:

* initiation (client -> server, 101 bytes): ``u16 BE version | 01 | u16 BE 96 | 96 B msg``
* response (server -> client, 51 bytes):   ``02 | u16 BE 48 | 48 B msg``
* error (server -> client, instead):       ``03 | u16 BE n | n B UTF-8 text``

The prologue is ``b"Tailscale Control Protocol v" + str(version)``, built from the version in
the initiation header.  Split keys: k1 encrypts client->server, k2 server->client.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
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
    return _respond(_static(bytes(private_key)), version, bytes(initiation[5:]))


# The responder's side of IK, written out with cryptography's primitives instead of run by
# ``noiseprotocol`` (which the Initiator below still uses, and tests/unit/test_noise.py
# checks this against, besides an independent initiator written there): every node's
# connection makes one, and the library's generic state machine took ~0.7 ms of the event
# loop per handshake, ~0.4 ms of it Python around the four X25519 exchanges. The steps are
# those of the Noise spec (revision 34, sections 5 and 7.5) for "<- s ... -> e, es, s, ss
# <- e, ee, se", as Tailscale's control protocol (its controlbase package) spells them out.
_ZERO_NONCE = bytes(12)  # every key of this handshake encrypts once, with nonce 0


def _hash(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF with two outputs over HMAC-BLAKE2s: (new chaining key, cipher key)."""
    prk = hmac.digest(ck, ikm, "blake2s")
    out1 = hmac.digest(prk, b"\x01", "blake2s")
    return out1, hmac.digest(prk, out1 + b"\x02", "blake2s")


@dataclass(frozen=True)
class _Static:
    key: X25519PrivateKey
    pub: bytes  # our public key
    ck: bytes  # the chaining key (and handshake hash) after initialization


# Keyed by the server's key alone (the current and, during a key change, the previous one):
# the version, which the client picks before anything is authenticated, goes into the hash
# per call (two small hashes), so initiations cycling through versions cannot evict entries
# or cost a public-key derivation each.
@functools.lru_cache(maxsize=2)
def _static(private_key: bytes) -> _Static:
    """What every handshake with this key starts from."""
    key = X25519PrivateKey.from_private_bytes(private_key)
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    h0 = _hash(PROTOCOL_NAME)  # longer than HASHLEN: hashed, and the chaining key starts equal
    return _Static(key, pub, h0)


def _respond(st: _Static, version: int, msg: bytes) -> HandshakeResult:
    # The prologue (it names the version), then the pre-message: our public key.
    h = _hash(_hash(st.ck, prologue(version)), st.pub)
    try:
        # -> e
        re = msg[:32]
        h = _hash(h, re)
        re_key = X25519PublicKey.from_public_bytes(re)
        # -> es: the chaining key and a cipher key from DH(s, re)
        ck, k = _hkdf2(st.ck, st.key.exchange(re_key))
        # -> s: the client's static key, encrypted and authenticated with the hash so far
        enc_s = msg[32:80]
        rs = ChaCha20Poly1305(k).decrypt(_ZERO_NONCE, enc_s, h)
        h = _hash(h, enc_s)
        rs_key = X25519PublicKey.from_public_bytes(rs)
        # -> ss, then the (empty) payload's tag
        ck, k = _hkdf2(ck, st.key.exchange(rs_key))
        tag = msg[80:96]
        payload = ChaCha20Poly1305(k).decrypt(_ZERO_NONCE, tag, h)
        h = _hash(h, tag)
    except Exception:  # InvalidTag, low-order points, ...: all mean a bad initiation
        raise HandshakeError("decrypting handshake initiation failed") from None
    if payload:
        raise HandshakeError("unexpected payload in handshake initiation")
    # <- e, ee, se, then the empty payload's tag
    e = X25519PrivateKey.generate()
    epub = e.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    h = _hash(h, epub)
    try:
        ck, _ = _hkdf2(ck, e.exchange(re_key))
        ck, k = _hkdf2(ck, e.exchange(rs_key))
    except ValueError:  # a low-order point gives an all-zero secret, which is refused
        raise HandshakeError("decrypting handshake initiation failed") from None
    tag = ChaCha20Poly1305(k).encrypt(_ZERO_NONCE, b"", h)
    h = _hash(h, tag)
    k1, k2 = _hkdf2(ck, b"")  # k1: initiator -> responder, k2: responder -> initiator
    return HandshakeResult(
        message=_MSG_HEADER.pack(MSG_RESPONSE, RESPONSE_PAYLOAD) + epub + tag,
        peer_static=rs,
        version=version,
        tx_key=k2,
        rx_key=k1,
        handshake_hash=h,
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
