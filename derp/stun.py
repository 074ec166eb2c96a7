"""Tailscale's STUN subset (RFC 5389 Binding only): sans-IO codec + asyncio UDP server.

Only requests as Tailscale sends them are answered (SOFTWARE "tailnode", FINGERPRINT last and
correct); anything else is silently ignored, as net/stun does.  The answer is a bare
XOR-MAPPED-ADDRESS (docs/protocol.md, "STUN").
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import logging
import os
import struct
from typing import Any

log = logging.getLogger("derp.stun")

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
BINDING_REQUEST = b"\x00\x01"
BINDING_SUCCESS = b"\x01\x01"
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_MAPPED_ADDRESS = 0x0001
FINGERPRINT_XOR = 0x5354554E
SOFTWARE = b"tailnode"
HEADER_LEN = 20
TXID_LEN = 12
DEFAULT_PORT = 3478


class StunError(ValueError):
    """Not a (valid Tailscale) STUN message."""


def is_stun(data: bytes) -> bool:
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE


def _fingerprint(data: bytes) -> int:
    return (binascii.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def build_binding_request(txid: bytes) -> bytes:
    """The 40-byte request Tailscale clients send: SOFTWARE first, FINGERPRINT last."""
    if len(txid) != TXID_LEN:
        raise ValueError("transaction id is 12 bytes")
    body = BINDING_REQUEST + b"\x00\x14" + MAGIC_COOKIE + txid
    body += struct.pack(">HH", ATTR_SOFTWARE, len(SOFTWARE)) + SOFTWARE
    return body + struct.pack(">HHI", ATTR_FINGERPRINT, 4, _fingerprint(body))


def _attrs(data: bytes) -> list[tuple[int, int, int]]:
    """(type, value offset, value length) for each TLV after the header."""
    out = []
    off = HEADER_LEN
    n = len(data)
    while off < n:
        if n - off < 4:
            raise StunError("truncated attribute header")
        atype, alen = struct.unpack_from(">HH", data, off)
        if off + 4 + alen > n:
            raise StunError("truncated attribute")
        out.append((atype, off + 4, alen))
        off += 4 + ((alen + 3) & ~3)
    return out


def parse_binding_request(data: bytes) -> bytes:
    """Return the transaction id of a valid Tailscale binding request, else StunError."""
    if not is_stun(data):
        raise StunError("not STUN")
    if data[0:2] != BINDING_REQUEST:
        raise StunError("not a binding request")
    attrs = _attrs(data)
    if not any(t == ATTR_SOFTWARE and data[o:o + ln] == SOFTWARE for t, o, ln in attrs):
        raise StunError("not from tailnode")
    if not attrs:
        raise StunError("no attributes")
    t, o, ln = attrs[-1]
    if t != ATTR_FINGERPRINT or ln != 4:
        raise StunError("no fingerprint")
    want = _fingerprint(data[:o - 4])
    if struct.unpack_from(">I", data, o)[0] != want:
        raise StunError("bad fingerprint")
    return bytes(data[8:20])


def build_binding_response(txid: bytes, ip: str, port: int) -> bytes:
    """Binding Success with XOR-MAPPED-ADDRESS only; ::ffff:a.b.c.d is answered as IPv4."""
    if len(txid) != TXID_LEN:
        raise ValueError("transaction id is 12 bytes")
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    raw = addr.packed
    key = MAGIC_COOKIE + txid
    xaddr = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    fam = 1 if addr.version == 4 else 2
    value = bytes((0, fam)) + struct.pack(">H", port ^ 0x2112) + xaddr
    attr = struct.pack(">HH", ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return BINDING_SUCCESS + struct.pack(">H", len(attr)) + MAGIC_COOKIE + txid + attr


def parse_binding_response(data: bytes) -> tuple[bytes, str, int]:
    """(txid, ip, port) from a binding success, as the Go client parses it."""
    if not is_stun(data) or data[0:2] != BINDING_SUCCESS:
        raise StunError("not a binding success")
    txid = bytes(data[8:20])
    fallback: tuple[str, int] | None = None
    for t, o, ln in _attrs(data):
        v = data[o:o + ln]
        if t in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            ip, port = _decode_addr(v, MAGIC_COOKIE + txid)
            return txid, ip, port
        if t == ATTR_MAPPED_ADDRESS and fallback is None:
            fallback = _decode_addr(v, None)
    if fallback is None:
        raise StunError("no mapped address")
    return txid, fallback[0], fallback[1]


def _decode_addr(v: bytes, xor: bytes | None) -> tuple[str, int]:
    if len(v) < 4:
        raise StunError("short address")
    fam = v[1]
    port = struct.unpack_from(">H", v, 2)[0]
    raw = v[4:]
    want = 4 if fam == 1 else 16 if fam == 2 else -1
    if len(raw) != want:
        raise StunError("bad address length")
    if xor is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, xor, strict=False))
    addr = ipaddress.ip_address(raw)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), port


class StunServerProtocol(asyncio.DatagramProtocol):
    """Answers valid Tailscale binding requests from the socket they arrived on."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0
        self.ignored = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            txid = parse_binding_request(data)
            resp = build_binding_response(txid, addr[0], addr[1])
        except (StunError, ValueError):
            self.ignored += 1
            return
        if self.transport is not None:
            self.transport.sendto(resp, addr)
            self.answered += 1

    def error_received(self, exc: Exception) -> None:
        log.debug("stun socket error: %s", exc)


async def serve_stun(host: str, port: int = DEFAULT_PORT) -> asyncio.DatagramTransport:
    """Bind UDP host:port and answer STUN; close the returned transport to stop."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        StunServerProtocol, local_addr=(host, port), reuse_port=False)
    return transport
