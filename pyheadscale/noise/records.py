"""Noise transport records as Tailscale frames them (control/controlbase/conn.go).

Each record is ``04 | u16 BE length | ciphertext`` with at most 4096 bytes on the wire.
The ChaCha20-Poly1305 nonce is 4 zero bytes followed by the record counter as a **big-endian**
u64 -- unlike the Noise spec (little-endian), so generic Noise libraries fail from record 1.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pyheadscale.noise.handshake import NoiseError

RECORD_TYPE = 0x04
HEADER_LEN = 3
TAG_LEN = 16
MAX_RECORD = 4096
MAX_CIPHERTEXT = MAX_RECORD - HEADER_LEN
MAX_PLAINTEXT = MAX_CIPHERTEXT - TAG_LEN  # 4077
# The counter value 2**64 - 1 is never used: the connection is dead before it.
MAX_COUNTER = 2**64 - 1

_HEADER = struct.Struct(">BH")


class RecordError(NoiseError):
    """A received record is invalid; the connection must be closed."""


class RecordTypeError(RecordError):
    """A record with a type other than 4 arrived after the handshake."""


class RecordTooLargeError(RecordError):
    """A record's length field exceeds the 4096-byte wire limit."""


class RecordAuthError(RecordError):
    """A record failed ChaCha20-Poly1305 authentication."""


class NonceExhaustedError(NoiseError):
    """The 64-bit record counter ran out (never happens in practice)."""


def nonce(counter: int) -> bytes:
    """The 12-byte AEAD nonce for record ``counter`` (big-endian, Tailscale style)."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class RecordLayer:
    """Encrypts outgoing and decrypts incoming records for one connection.

    ``seal`` must be called from a single ordered writer: the record sealed with counter N has
    to be the N-th record on the wire.  ``feed`` buffers partial records across calls.
    """

    def __init__(self, tx_key: bytes, rx_key: bytes) -> None:
        self._tx = ChaCha20Poly1305(tx_key)
        self._rx = ChaCha20Poly1305(rx_key)
        self.tx_counter = 0
        self.rx_counter = 0
        self._buf = bytearray()
        self._failed: RecordError | None = None

    def seal(self, data: bytes) -> bytes:
        """Encrypt ``data`` into as many records as needed (an empty input yields nothing)."""
        if len(data) <= MAX_PLAINTEXT:  # one record (most map frames): no copies
            return self._seal_one(data) if data else b""
        out = bytearray()
        view = memoryview(data)
        for i in range(0, len(view), MAX_PLAINTEXT):
            out += self._seal_one(bytes(view[i : i + MAX_PLAINTEXT]))
        return bytes(out)

    def seal_empty(self) -> bytes:
        """One zero-length record (16-byte ciphertext); peers must skip it."""
        return self._seal_one(b"")

    def _seal_one(self, chunk: bytes) -> bytes:
        if self.tx_counter >= MAX_COUNTER:
            raise NonceExhaustedError("transmit nonce exhausted")
        ct = self._tx.encrypt(nonce(self.tx_counter), chunk, None)
        self.tx_counter += 1
        return _HEADER.pack(RECORD_TYPE, len(ct)) + ct

    def feed(self, data: bytes) -> list[bytes]:
        """Consume wire bytes; return the plaintext of every complete non-empty record.

        Raises a ``RecordError`` subclass on the first bad record; the layer stays failed.
        """
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_LEN:
                typ, length = _HEADER.unpack_from(buf, pos)
                if typ != RECORD_TYPE:
                    raise RecordTypeError(f"unexpected record type {typ}")
                if length > MAX_CIPHERTEXT:
                    raise RecordTooLargeError(
                        f"record of {length + HEADER_LEN} bytes exceeds {MAX_RECORD}"
                    )
                if length < TAG_LEN:
                    raise RecordAuthError(f"record of {length} bytes is shorter than its tag")
                end = pos + HEADER_LEN + length
                if len(buf) < end:
                    break
                pt = self._open(bytes(buf[pos + HEADER_LEN : end]))
                pos = end
                if pt:
                    out.append(pt)
        except RecordError as e:
            self._failed = e
            self._buf = bytearray()
            raise
        del buf[:pos]
        return out

    def _open(self, ct: bytes) -> bytes:
        if self.rx_counter >= MAX_COUNTER:
            raise RecordAuthError("receive nonce exhausted")
        try:
            pt = self._rx.decrypt(nonce(self.rx_counter), ct, None)
        except InvalidTag:
            raise RecordAuthError(f"record {self.rx_counter} failed authentication") from None
        self.rx_counter += 1
        return pt

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete record waiting for more input."""
        return len(self._buf)
