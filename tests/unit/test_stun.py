"""STUN codec vectors (docs/protocol.md, "STUN") and a live round trip on 127.0.0.1."""

from __future__ import annotations

import asyncio
import binascii
import struct

import pytest

from derp import stun

TXID = bytes.fromhex("2360b11e3ec68ffa93e08007")


def test_request_layout() -> None:
    req = stun.build_binding_request(TXID)
    assert len(req) == 40
    assert req[:20] == bytes.fromhex("000100142112a442") + TXID
    assert req[20:32] == bytes.fromhex("80220008") + b"tailnode"
    assert req[32:36] == bytes.fromhex("80280004")
    crc = (binascii.crc32(req[:32]) & 0xFFFFFFFF) ^ 0x5354554E
    assert req[36:] == struct.pack(">I", crc)
    assert stun.parse_binding_request(req) == TXID


def test_google_1_response_vector() -> None:
    resp = stun.build_binding_response(TXID, "72.69.33.45", 59028)
    assert resp.hex() == "0101000c2112a4422360b11e3ec68ffa93e08007002000080001c7866957856f"
    assert stun.parse_binding_response(resp) == (TXID, "72.69.33.45", 59028)


def test_mapped_v4_is_answered_as_v4_and_v6_is_44_bytes() -> None:
    assert stun.build_binding_response(TXID, "::ffff:72.69.33.45", 59028) == \
        stun.build_binding_response(TXID, "72.69.33.45", 59028)
    r6 = stun.build_binding_response(TXID, "2001:db8::1", 41641)
    assert len(r6) == 44
    assert r6[2:4] == b"\x00\x18" and r6[20:26] == bytes.fromhex("002000140002")
    assert struct.unpack(">H", r6[26:28])[0] == 41641 ^ 0x2112
    xor_key = bytes.fromhex("2112a442") + TXID
    ip = bytes(a ^ b for a, b in zip(r6[28:44], xor_key, strict=True))
    assert ip == bytes.fromhex("20010db8000000000000000000000001")
    assert stun.parse_binding_response(r6) == (TXID, "2001:db8::1", 41641)


def test_response_parser_fallbacks() -> None:
    # non-standard 0x8020 and plain MAPPED-ADDRESS are accepted by the Go client
    base = bytes.fromhex("0101000c2112a442") + TXID
    alt = base + bytes.fromhex("802000080001c7866957856f")
    assert stun.parse_binding_response(alt) == (TXID, "72.69.33.45", 59028)
    plain = base + bytes.fromhex("0001000800011f90c0000201")
    assert stun.parse_binding_response(plain) == (TXID, "192.0.2.1", 8080)


def _with_fp(body: bytes) -> bytes:
    return body + struct.pack(">HHI", 0x8028, 4,
                              (binascii.crc32(body) & 0xFFFFFFFF) ^ 0x5354554E)


@pytest.mark.parametrize("mutate", [
    lambda r: r[:36] + bytes(4),                                     # bad fingerprint
    lambda r: b"\x01" + r[1:],                                       # top bits / type
    lambda r: r[:4] + b"\x00\x00\x00\x00" + r[8:],                   # no magic cookie
    lambda r: _with_fp(r[:24] + b"tailnodX"),                        # wrong SOFTWARE
    lambda r: r[:32],                                                # no FINGERPRINT
    lambda r: r[:32] + r[32:] + bytes.fromhex("80220000"),           # FINGERPRINT not last
    lambda r: r[:30],                                                # truncated TLV
    lambda r: bytes.fromhex("0101") + r[2:],                         # a response
    lambda r: r[:10],
])
def test_request_rejections(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(stun.StunError):
        stun.parse_binding_request(mutate(stun.build_binding_request(TXID)))


async def test_live_round_trip() -> None:
    transport = await stun.serve_stun("127.0.0.1", 0)
    port = transport.get_extra_info("sockname")[1]
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.put_nowait((data, addr))

    ct, _ = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0),
                                                remote_addr=("127.0.0.1", port))
    try:
        my_port = ct.get_extra_info("sockname")[1]
        ct.sendto(b"\x00\x01junk that is not stun at all")
        ct.sendto(stun.build_binding_request(TXID))
        data, addr = await asyncio.wait_for(got.get(), 2)
        assert addr == ("127.0.0.1", port)
        assert len(data) == 32
        assert stun.parse_binding_response(data) == (TXID, "127.0.0.1", my_port)
        assert got.empty()
    finally:
        ct.close()
        transport.close()
