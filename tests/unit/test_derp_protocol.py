"""Byte vectors for every DERP frame and the NaCl-box handshake (docs/protocol.md, "DERP")."""

from __future__ import annotations

import json

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from derp import protocol as p
from derp.keys import (
    KeyFileError,
    format_private_key,
    load_or_create_private_key,
    parse_private_key,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 132))


def test_constants_match_reference() -> None:
    assert p.MAGIC == bytes.fromhex("44455250f09f9491")
    assert p.MAGIC.decode() == "DERP\U0001f511"
    assert p.DISCO_MAGIC == bytes.fromhex("5453f09f92ac")
    assert (p.MAX_PACKET_SIZE, p.MAX_INFO_LEN, p.FRAME_HEADER_LEN) == (65536, 1 << 20, 5)
    assert (p.CLIENT_INFO_MIN, p.CLIENT_INFO_MAX) == (56, 262144)


def test_server_key_frame() -> None:
    f = p.server_key_frame(K1)
    assert len(f) == 45
    assert f == bytes.fromhex("0100000028") + bytes.fromhex("44455250f09f9491") + K1
    assert p.parse_server_key(f[5:]) == K1
    # extra future bytes are ignored, wrong magic / short is an error
    assert p.parse_server_key(f[5:] + b"future") == K1
    with pytest.raises(p.HandshakeError):
        p.parse_server_key(b"DERP\x00\x00\x00\x00" + K1)
    with pytest.raises(p.HandshakeError):
        p.parse_server_key(f[5:44])


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (lambda: p.send_packet_frame(K1, b"abc"), "0400000023" + K1.hex() + "616263"),
        (lambda: p.recv_packet_frame(K2, b"xy"), "0500000022" + K2.hex() + "7879"),
        (lambda: p.KEEP_ALIVE_FRAME, "0600000000"),
        (lambda: p.note_preferred_frame(True), "070000000101"),
        (lambda: p.note_preferred_frame(False), "070000000100"),
        (lambda: p.peer_gone_frame(K1), "0800000021" + K1.hex() + "00"),
        (lambda: p.peer_gone_frame(K1, p.PeerGoneReason.NOT_HERE),
         "0800000021" + K1.hex() + "01"),
        (lambda: p.peer_present_frame(K1, bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7]),
                                      41641, 0x02),
         "0900000033" + K1.hex() + "00000000000000000000ffffc0000207" + "a2a9" + "02"),
        (lambda: p.forward_packet_frame(K1, K2, b"z"), "0a00000041" + K1.hex() + K2.hex() + "7a"),
        (lambda: p.WATCH_CONNS_FRAME, "1000000000"),
        (lambda: p.close_peer_frame(K2), "1100000020" + K2.hex()),
        (lambda: p.ping_frame(b"12345678"), "1200000008" + b"12345678".hex()),
        (lambda: p.pong_frame(b"abcdefgh"), "1300000008" + b"abcdefgh".hex()),
        (lambda: p.health_frame("dup"), "1400000003" + b"dup".hex()),
        (lambda: p.restarting_frame(1000, 60000), "1500000008" + "000003e8" + "0000ea60"),
    ],
)
def test_frame_vectors(frame, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert frame().hex() == expected


def test_packet_size_limit() -> None:
    p.send_packet_frame(K1, bytes(65536))
    with pytest.raises(p.FrameTooLarge):
        p.send_packet_frame(K1, bytes(65537))


def test_decoder_incremental_and_limits() -> None:
    stream = p.send_packet_frame(K1, b"hello") + p.KEEP_ALIVE_FRAME + p.ping_frame(b"pppppppp")
    dec = p.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    assert got == [(4, K1 + b"hello"), (6, b""), (0x12, b"pppppppp")]
    assert dec.buffered == 0
    dec2 = p.FrameDecoder(max_frame=1024)
    with pytest.raises(p.FrameTooLarge):
        dec2.feed(b"\x05\x00\x00\x04\x01")  # 1025 bytes announced: refused before buffering


def test_decode_server_frames() -> None:
    assert p.decode_server_frame(5, K1 + b"pkt") == p.RecvPacket(K1, b"pkt")
    assert p.decode_server_frame(5, K1[:31]) is None
    # 32-byte PeerGone from old servers means Disconnected
    assert p.decode_server_frame(8, K1) == p.PeerGone(K1, 0)
    assert p.decode_server_frame(8, K1 + b"\x01") == p.PeerGone(K1, 1)
    # PeerPresent parses progressively: key; key+ip/port; all three
    assert p.decode_server_frame(9, K1) == p.PeerPresent(K1)
    ip = bytes(15) + b"\x01"
    assert p.decode_server_frame(9, K1 + ip + b"\x00\x50") == p.PeerPresent(K1, ip, 80, None)
    assert p.decode_server_frame(9, K1 + ip + b"\x00\x50\x08") == p.PeerPresent(K1, ip, 80, 8)
    assert p.decode_server_frame(0x15, bytes.fromhex("000003e80000ea60")) == \
        p.Restarting(1000, 60000)
    assert p.decode_server_frame(0x0E, b"??") == p.UnknownFrame(0x0E, b"??")


def test_disco_classification() -> None:
    assert p.looks_like_disco(p.DISCO_MAGIC + bytes(56))
    assert not p.looks_like_disco(p.DISCO_MAGIC + bytes(55))  # 61 < 62
    assert not p.looks_like_disco(b"\x04" + bytes(100))


def test_client_info_json_spelling() -> None:
    # the example tailscaled sends, byte for byte
    assert p.ClientInfo(can_ack_pings=True).to_json() == b'{"version":2,"CanAckPings":true}'
    mk = "ab" * 32
    d = json.loads(p.ClientInfo(mesh_key=mk, is_prober=True, app_name="x").to_json())
    assert d == {"meshKey": mk, "version": 2, "CanAckPings": False, "IsProber": True,
                 "AppName": "x"}


@pytest.mark.parametrize("raw", [
    b'{"MeshKey":"' + b"cd" * 32 + b'","Version":2}',
    b'{"meshKey":"' + b"cd" * 32 + b'","version":2,"canackpings":true,"Future":[1]}',
])
def test_client_info_case_insensitive(raw: bytes) -> None:
    ci = p.ClientInfo.from_json(raw)
    assert ci.mesh_key == "cd" * 32 and ci.version == 2


def test_client_info_edge_cases() -> None:
    assert p.ClientInfo.from_json(b"{}") == p.ClientInfo(version=0)
    for bad in (b'{"meshKey":"abc"}', b'{"meshKey":"' + b"zz" * 32 + b'"}', b"[1]",
                b'{"version":"2"}', b"not json", b'{"CanAckPings":1}'):
        with pytest.raises(p.HandshakeError):
            p.ClientInfo.from_json(bad)


def test_server_info_json() -> None:
    assert p.ServerInfo().to_json() == b'{"version":2}'
    si = p.ServerInfo.from_json(b'{"Version":2,"tokenbucketbytespersecond":5}')
    assert si.version == 2 and si.token_bucket_bytes_per_second == 5


def test_handshake_against_raw_pynacl() -> None:
    server = PrivateKey.generate()
    client = PrivateKey.generate()
    spub, cpub = bytes(server.public_key), bytes(client.public_key)
    # ClientInfo built by hand from the reference layout: key || nonce || tag || ct
    js = b'{"version":2,"CanAckPings":true}'
    sealed = Box(client, PublicKey(spub)).encrypt(js, b"\x07" * 24)
    frame = b"\x02" + (32 + len(sealed)).to_bytes(4, "big") + cpub + bytes(sealed)
    assert len(frame) == 109
    assert p.client_info_frame(bytes(client), spub, p.ClientInfo(can_ack_pings=True),
                               nonce=b"\x07" * 24) == frame
    key, info = p.open_client_info(bytes(server), frame[5:])
    assert key == cpub and info.can_ack_pings and info.version == 2
    # ServerInfo: nonce || box({"version":2}), 53-byte payload, 58 on the wire
    si = p.server_info_frame(bytes(server), cpub)
    assert len(si) == 58 and si[:5] == bytes.fromhex("0300000035")
    assert Box(client, PublicKey(spub)).decrypt(si[5:]) == b'{"version":2}'
    assert p.open_server_info(bytes(client), spub, si[5:]).version == 2


def test_handshake_failures() -> None:
    server = PrivateKey.generate()
    client = PrivateKey.generate()
    frame = p.client_info_frame(bytes(client), bytes(server.public_key), p.ClientInfo())
    tampered = bytearray(frame[5:])
    tampered[-1] ^= 1
    with pytest.raises(p.HandshakeError, match="cannot open"):
        p.open_client_info(bytes(server), bytes(tampered))
    with pytest.raises(p.HandshakeError, match="short"):
        p.open_client_info(bytes(server), bytes(55))
    with pytest.raises(p.HandshakeError, match="long"):
        p.open_client_info(bytes(server), bytes(262145))
    other = PrivateKey.generate()
    with pytest.raises(p.HandshakeError):
        p.open_client_info(bytes(other), frame[5:])


def test_key_file_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    raw = bytes(range(1, 33))
    text = "privkey:" + raw.hex()
    assert parse_private_key(text + "\n") == raw
    assert parse_private_key(json.dumps({"PrivateKey": text})) == raw
    assert parse_private_key('{"privatekey": "' + text + '", "Other": 1}') == raw
    for bad in ("nodekey:" + raw.hex(), "privkey:1234", '{"x":1}', "{bad"):
        with pytest.raises(KeyFileError):
            parse_private_key(bad)
    path = tmp_path / "sub" / "derper.key"
    k = load_or_create_private_key(path)
    assert json.loads(path.read_text()) == {"PrivateKey": format_private_key(k)}
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_private_key(path) == k
