"""Byte-level tests of the Noise IK handshake, records and key files.

The reference initiator below is written from the Noise spec and docs/protocol.md ("Noise handshake and records")
directly on `cryptography` + `hashlib` (not via noiseprotocol), so it checks our responder
independently.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import stat
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pyheadscale.noise import (
    MAX_PLAINTEXT,
    MAX_RECORD,
    HandshakeError,
    Initiator,
    KeyFileError,
    KeyFormatError,
    RecordAuthError,
    RecordLayer,
    RecordTooLargeError,
    RecordTypeError,
    ServerRefusedError,
    UnsupportedVersionError,
    error_frame,
    format_key,
    generate_private_key,
    load_or_create_private_key,
    nonce,
    parse_initiation,
    parse_key,
    public_key,
    respond,
)
from pyheadscale.noise.handshake import _static

# -- an independent reference initiator ---------------------------------------------------


def _h(*parts: bytes) -> bytes:
    d = hashlib.blake2s(digest_size=32)
    for p in parts:
        d.update(p)
    return d.digest()


def _hmac(k: bytes, m: bytes) -> bytes:
    return hmac.new(k, m, lambda: hashlib.blake2s(digest_size=32)).digest()


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    prk = _hmac(ck, ikm)
    o1 = _hmac(prk, b"\x01")
    return o1, _hmac(prk, o1 + b"\x02")


def _pub(k: X25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def _dh(k: X25519PrivateKey, pub: bytes) -> bytes:
    return k.exchange(X25519PublicKey.from_public_bytes(pub))


class RefInitiator:
    def __init__(self, machine: X25519PrivateKey, server_pub: bytes, version: int) -> None:
        self.s, self.rs, self.version = machine, server_pub, version
        self.e = X25519PrivateKey.generate()
        h = _h(b"Noise_IK_25519_ChaChaPoly_BLAKE2s")  # 33 bytes > 32: hashed
        ck = h
        h = _h(h, b"Tailscale Control Protocol v" + str(version).encode())
        h = _h(h, server_pub)
        epub = _pub(self.e)
        h = _h(h, epub)
        ck, k = _hkdf2(ck, _dh(self.e, server_pub))
        enc_s = ChaCha20Poly1305(k).encrypt(bytes(12), _pub(machine), h)
        h = _h(h, enc_s)
        ck, k = _hkdf2(ck, _dh(machine, server_pub))
        tag = ChaCha20Poly1305(k).encrypt(bytes(12), b"", h)
        h = _h(h, tag)
        self.h, self.ck = h, ck
        self.message = struct.pack(">HBH", version, 1, 96) + epub + enc_s + tag

    def finish(self, resp: bytes) -> tuple[bytes, bytes, bytes]:
        assert resp[:3] == b"\x02\x00\x30" and len(resp) == 51
        sepub, tag = resp[3:35], resp[35:51]
        h = _h(self.h, sepub)
        ck, _ = _hkdf2(self.ck, _dh(self.e, sepub))
        ck, k = _hkdf2(ck, _dh(self.s, sepub))
        ChaCha20Poly1305(k).decrypt(bytes(12), tag, h)  # raises if the server got it wrong
        h = _h(h, tag)
        k1, k2 = _hkdf2(ck, b"")
        return k1, k2, h  # k1: client->server, k2: server->client


@pytest.fixture
def server_key() -> bytes:
    return generate_private_key()


def test_handshake_against_reference_initiator(server_key: bytes) -> None:
    machine = X25519PrivateKey.generate()
    ref = RefInitiator(machine, public_key(server_key), 145)
    assert len(ref.message) == 101
    res = respond(server_key, ref.message)
    assert res.message[:3] == bytes([0x02, 0x00, 0x30]) and len(res.message) == 51
    assert res.version == 145
    assert res.peer_static == _pub(machine)
    k1, k2, h = ref.finish(res.message)
    assert res.handshake_hash == h
    assert res.rx_key == k1 and res.tx_key == k2


def test_low_order_client_static_key_refused(server_key: bytes) -> None:
    """A client whose (encrypted, authenticated) static key is a low-order point: DH with it
    is all zeros, which the server refuses instead of deriving keys from it."""
    server_pub = public_key(server_key)
    e = X25519PrivateKey.generate()
    h = ck = _h(b"Noise_IK_25519_ChaChaPoly_BLAKE2s")
    h = _h(_h(h, b"Tailscale Control Protocol v145"), server_pub)
    epub = _pub(e)
    h = _h(h, epub)
    ck, k = _hkdf2(ck, _dh(e, server_pub))
    enc_s = ChaCha20Poly1305(k).encrypt(bytes(12), bytes(32), h)
    h = _h(h, enc_s)
    ck, k = _hkdf2(ck, bytes(32))  # what DH with the all-zero point gives
    tag = ChaCha20Poly1305(k).encrypt(bytes(12), b"", h)
    with pytest.raises(HandshakeError):
        respond(server_key, struct.pack(">HBH", 145, 1, 96) + epub + enc_s + tag)


def test_versions_chosen_by_clients_do_not_grow_the_key_cache(server_key: bytes) -> None:
    """The version is the client's to pick before it is authenticated: handshakes cycling
    through versions must neither evict the server key's start state nor each cost one."""
    misses = _static.cache_info().misses
    for version in range(100, 140):
        res = respond(server_key, RefInitiator(X25519PrivateKey.generate(),
                                               public_key(server_key), version).message)
        assert res.version == version
    assert _static.cache_info().misses - misses <= 1  # this key's start state, once


def test_handshake_noiseprotocol_initiator_transcript(server_key: bytes) -> None:
    machine = generate_private_key()
    ini = Initiator(machine, public_key(server_key), 130)
    init = ini.initiation()
    assert init[:5] == bytes([0x00, 130, 0x01, 0x00, 0x60])
    res = respond(server_key, init)
    cli = ini.finish(res.message)
    assert cli.handshake_hash == res.handshake_hash
    assert (cli.tx_key, cli.rx_key) == (res.rx_key, res.tx_key)
    assert res.peer_static == public_key(machine)


def test_prologue_comes_from_the_header(server_key: bytes) -> None:
    init = bytearray(Initiator(generate_private_key(), public_key(server_key), 130).initiation())
    init[1] = 131  # same ciphertext, different version -> prologue mismatch
    with pytest.raises(HandshakeError, match="decrypting"):
        respond(server_key, bytes(init))


def test_wrong_server_key_fails(server_key: bytes) -> None:
    init = Initiator(generate_private_key(), public_key(generate_private_key()), 130).initiation()
    with pytest.raises(HandshakeError):
        respond(server_key, init)


@pytest.mark.parametrize(
    ("msg", "err"),
    [
        (b"\x00\x82\x01\x00\x60" + bytes(95), "wrong handshake initiation size"),
        (b"\x00\x82\x02\x00\x60" + bytes(96), "unexpected handshake message type"),
        (b"\x00\x82\x01\x00\x5f" + bytes(96), "wrong handshake initiation length"),
        (b"", "wrong handshake initiation size"),
    ],
)
def test_initiation_validation(server_key: bytes, msg: bytes, err: str) -> None:
    with pytest.raises(HandshakeError) as ei:
        parse_initiation(msg)
    assert str(ei.value) == err
    with pytest.raises(HandshakeError):
        respond(server_key, msg)


def test_garbage_initiations_only_raise_handshake_error(server_key: bytes) -> None:
    for i in range(20):
        body = os.urandom(96) if i else bytes(96)  # all-zero = low-order point
        with pytest.raises(HandshakeError):
            respond(server_key, b"\x00\x82\x01\x00\x60" + body)


def test_min_version(server_key: bytes) -> None:
    init = Initiator(generate_private_key(), public_key(server_key), 100).initiation()
    with pytest.raises(UnsupportedVersionError, match="unsupported client version 100"):
        respond(server_key, init, min_version=113)
    assert respond(server_key, init, min_version=100).version == 100


def test_error_frame_and_client_side_refusal(server_key: bytes) -> None:
    assert error_frame("no") == b"\x03\x00\x02no"
    assert len(error_frame("x" * 70000)) == 3 + 65535
    ini = Initiator(generate_private_key(), public_key(server_key), 130)
    with pytest.raises(ServerRefusedError, match="go away"):
        ini.finish(error_frame("go away"))


# -- records ------------------------------------------------------------------------------


def _pair(server_key: bytes) -> tuple[RecordLayer, RecordLayer]:
    ini = Initiator(generate_private_key(), public_key(server_key), 130)
    res = respond(server_key, ini.initiation())
    return res.records(), ini.finish(res.message).records()


def _ref_record(key: bytes, counter: int, pt: bytes, endian: str = "big") -> bytes:
    n = b"\0\0\0\0" + counter.to_bytes(8, endian)  # type: ignore[arg-type]
    ct = ChaCha20Poly1305(key).encrypt(n, pt, None)
    return bytes([4]) + len(ct).to_bytes(2, "big") + ct


def test_nonce_is_big_endian() -> None:
    assert nonce(0) == bytes(12)
    assert nonce(1) == bytes(11) + b"\x01"
    assert nonce(0x0102) == bytes(10) + b"\x01\x02"


def test_records_both_directions(server_key: bytes) -> None:
    server, client = _pair(server_key)
    for i in range(5):
        msg = bytes([i]) * (i * 1000 + 1)
        assert server.feed(client.seal(msg)) == [msg]
        assert client.feed(server.seal(msg)) == [msg]
    assert server.rx_counter == 5 and server.tx_counter == 5


def test_feed_reference_records_big_endian_and_little_endian_fails() -> None:
    k_in, k_out = os.urandom(32), os.urandom(32)
    layer = RecordLayer(k_out, k_in)
    wire = _ref_record(k_in, 0, b"zero") + _ref_record(k_in, 1, b"one")
    assert layer.feed(wire) == [b"zero", b"one"]
    le = RecordLayer(k_out, k_in)
    assert le.feed(_ref_record(k_in, 0, b"zero", "little")) == [b"zero"]  # same at 0
    with pytest.raises(RecordAuthError):
        le.feed(_ref_record(k_in, 1, b"one", "little"))


def test_sealed_records_decrypt_with_big_endian_nonces_only() -> None:
    k_out = os.urandom(32)
    layer = RecordLayer(k_out, os.urandom(32))
    r0, r1 = layer.seal(b"first"), layer.seal(b"second")
    aead = ChaCha20Poly1305(k_out)
    assert r0[:3] == b"\x04\x00\x15" and aead.decrypt(bytes(12), r0[3:], None) == b"first"
    assert aead.decrypt(bytes(11) + b"\x01", r1[3:], None) == b"second"
    with pytest.raises(InvalidTag):
        aead.decrypt(b"\0\0\0\0" + (1).to_bytes(8, "little"), r1[3:], None)


def test_seal_fragments_at_4077(server_key: bytes) -> None:
    server, client = _pair(server_key)
    data = os.urandom(10240)
    wire = server.seal(data)
    sizes = []
    pos = 0
    while pos < len(wire):
        assert wire[pos] == 4
        n = int.from_bytes(wire[pos + 1 : pos + 3], "big")
        sizes.append(3 + n)
        pos += 3 + n
    assert MAX_PLAINTEXT == 4077 and MAX_RECORD == 4096
    assert sizes == [4096, 4096, 3 + 10240 - 2 * 4077 + 16]
    assert b"".join(client.feed(wire)) == data
    assert server.seal(b"") == b""


def test_byte_by_byte_and_empty_records_skipped(server_key: bytes) -> None:
    server, client = _pair(server_key)
    wire = client.seal(b"a") + client.seal_empty() + client.seal(b"b" * 5000)
    out: list[bytes] = []
    for i in range(len(wire)):
        out += server.feed(wire[i : i + 1])
    assert out == [b"a", b"b" * 4077, b"b" * 923]
    assert server.rx_counter == 4 and server.buffered == 0


def test_truncated_record_waits(server_key: bytes) -> None:
    server, client = _pair(server_key)
    wire = client.seal(b"hello")
    assert server.feed(wire[:-1]) == []
    assert server.buffered == len(wire) - 1
    assert server.feed(wire[-1:]) == [b"hello"]


def test_bad_type(server_key: bytes) -> None:
    server, client = _pair(server_key)
    wire = bytearray(client.seal(b"x"))
    wire[0] = 3
    with pytest.raises(RecordTypeError):
        server.feed(bytes(wire))
    with pytest.raises(RecordTypeError):  # stays failed
        server.feed(client.seal(b"y"))


def test_oversized_length_field(server_key: bytes) -> None:
    server, _ = _pair(server_key)
    with pytest.raises(RecordTooLargeError):
        server.feed(b"\x04" + (4094).to_bytes(2, "big"))  # 4097 bytes on the wire
    ok, _ = _pair(server_key)
    assert ok.feed(b"\x04" + (4093).to_bytes(2, "big")) == []  # exactly 4096: allowed


def test_tampered_and_garbage_records(server_key: bytes) -> None:
    server, client = _pair(server_key)
    wire = bytearray(client.seal(b"secret"))
    wire[-1] ^= 1
    with pytest.raises(RecordAuthError):
        server.feed(bytes(wire))
    server2, _ = _pair(server_key)
    with pytest.raises(RecordAuthError):
        server2.feed(b"\x04\x00\x20" + os.urandom(32))
    server3, _ = _pair(server_key)
    with pytest.raises(RecordAuthError):
        server3.feed(b"\x04\x00\x05abcde")  # shorter than the tag


# -- keys ---------------------------------------------------------------------------------


def test_key_file_created_0600_and_reused(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "sub", "noise_private.key")
    k1 = load_or_create_private_key(path)
    text = pathlib.Path(path).read_text()
    assert text == "privkey:" + k1.hex() and len(text) == 8 + 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_private_key(path) == k1


def test_key_file_headscale_format_with_newline(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "k")
    raw = bytes(range(32))
    with open(path, "w") as f:
        f.write("privkey:" + raw.hex().upper() + "\n")
    assert load_or_create_private_key(path) == raw


@pytest.mark.parametrize(
    "content", ["", "privkey:abc", "nodekey:" + "00" * 32, "privkey:" + "zz" * 32]
)
def test_malformed_key_file(tmp_path: os.PathLike[str], content: str) -> None:
    path = os.path.join(tmp_path, "k")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(KeyFileError, match="malformed"):
        load_or_create_private_key(path)
    assert pathlib.Path(path).read_text() == content  # never overwritten


def test_key_text_format() -> None:
    raw = bytes(range(32))
    assert format_key("mkey:", raw) == "mkey:000102030405060708090a0b0c0d0e0f" + (
        "101112131415161718191a1b1c1d1e1f"
    )
    assert parse_key("mkey:", format_key("mkey:", raw).upper().replace("MKEY:", "mkey:")) == raw
    for bad in ("", "mkey:", "nodekey:" + "00" * 32, "mkey:" + "00" * 31):
        with pytest.raises(KeyFormatError):
            parse_key("mkey:", bad)
    # RFC 7748 §6.1 test vector for the X25519 base-point multiplication.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert public_key(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
