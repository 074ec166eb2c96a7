"""Key/time encodings and request parsing (docs/protocol.md)."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pyheadscale import tailcfg
from pyheadscale.tailcfg import KeyKind, KeyParseError, RequestParseError, TimeParseError

RAW = bytes(range(32))
HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [
        (KeyKind.NODE, "nodekey:"),
        (KeyKind.MACHINE, "mkey:"),
        (KeyKind.DISCO, "discokey:"),
        (KeyKind.NL, "nlpub:"),
        (KeyKind.CHALLENGE, "chalpub:"),
    ],
)
def test_key_round_trip(kind, prefix):
    text = tailcfg.encode_key(kind, RAW)
    assert text == prefix + HEX
    assert tailcfg.parse_key(kind, text) == RAW
    # upper-case hex is accepted on input
    assert tailcfg.parse_key(kind, prefix + HEX.upper()) == RAW


def test_zero_key_keeps_prefix_and_null_is_zero():
    assert tailcfg.encode_key(KeyKind.NODE, None) == "nodekey:" + "0" * 64
    assert tailcfg.parse_key(KeyKind.NODE, None) == bytes(32)
    assert tailcfg.is_zero_key(tailcfg.parse_key(KeyKind.NODE, "nodekey:" + "0" * 64))


def test_tlpub_alias_for_nl_key():
    assert tailcfg.parse_key(KeyKind.NL, "tlpub:" + HEX) == RAW


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nodekey:",
        "mkey:" + HEX,
        "nodekey:" + HEX[:-2],
        "nodekey:" + HEX + "00",
        "nodekey:" + "g" * 64,
        "NODEKEY:" + HEX,
        42,
    ],
)
def test_bad_keys_raise_typed_error(text):
    with pytest.raises(KeyParseError):
        tailcfg.parse_key(KeyKind.NODE, text)


def test_encode_key_wrong_length():
    with pytest.raises(KeyParseError):
        tailcfg.encode_key(KeyKind.NODE, b"\x01" * 31)


def test_format_time():
    assert tailcfg.format_time(None) == "0001-01-01T00:00:00Z"
    assert tailcfg.format_time(datetime(2026, 8, 22, 16, 0, tzinfo=UTC)) == "2026-08-22T16:00:00Z"
    assert (
        tailcfg.format_time(datetime(2026, 8, 22, 15, 48, 56, 123400, tzinfo=UTC))
        == "2026-08-22T15:48:56.1234Z"
    )
    plus2 = timezone(timedelta(hours=2))
    assert tailcfg.format_time(datetime(2026, 8, 22, 18, 0, tzinfo=plus2)) == "2026-08-22T16:00:00Z"


def test_parse_time():
    assert tailcfg.parse_time("0001-01-01T00:00:00Z") is None
    assert tailcfg.parse_time(None) is None
    assert tailcfg.parse_time("1970-01-01T00:02:03Z") == datetime(1970, 1, 1, 0, 2, 3, tzinfo=UTC)
    assert tailcfg.parse_time("2026-08-22T15:48:56.123456789Z") == datetime(
        2026, 8, 22, 15, 48, 56, 123456, tzinfo=UTC
    )
    assert tailcfg.parse_time("2026-08-22T17:48:56+02:00") == datetime(
        2026, 8, 22, 15, 48, 56, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "text", ["", "2026-08-22", "2026-08-22T15:48:56", "2026-13-01T00:00:00Z", 5]
)
def test_parse_time_errors(text):
    with pytest.raises(TimeParseError):
        tailcfg.parse_time(text)


def test_stable_id():
    assert tailcfg.stable_node_id(7) == "7"
    with pytest.raises(tailcfg.TailcfgError):
        tailcfg.stable_node_id(0)


def _register_body(**over):
    body = {
        "Version": 145,
        "NodeKey": "nodekey:" + HEX,
        "OldNodeKey": "nodekey:" + "0" * 64,
        "NLKey": "nlpub:" + "ab" * 32,
        "Auth": {"AuthKey": "hskey-auth-abc-def"},
        "Expiry": "0001-01-01T00:00:00Z",
        "Followup": "",
        "Hostinfo": {"Hostname": "node1", "OS": "linux"},
        "NodeKeySignature": None,
    }
    body.update(over)
    return body


def test_parse_register_request_from_bytes():
    req = tailcfg.parse_register_request(tailcfg.dumps(_register_body()))
    assert req.version == 145
    assert req.node_key == RAW
    assert req.old_node_key is None
    assert req.nl_key == bytes([0xAB]) * 32
    assert req.auth_key == "hskey-auth-abc-def"
    assert req.expiry is None
    assert req.hostinfo["Hostname"] == "node1"
    assert not req.ephemeral


def test_parse_register_logout_expiry():
    req = tailcfg.parse_register_request(_register_body(Expiry="1970-01-01T00:02:03Z", Auth=None))
    assert req.expiry == datetime(1970, 1, 1, 0, 2, 3, tzinfo=UTC)
    assert req.auth_key is None


@pytest.mark.parametrize(
    ("over", "exc"),
    [
        ({"NodeKey": ""}, KeyParseError),
        ({"OldNodeKey": "mkey:" + HEX}, KeyParseError),
        ({"NodeKey": None}, RequestParseError),
        ({"Expiry": ""}, TimeParseError),
        ({"Version": "145"}, RequestParseError),
        ({"Hostinfo": []}, RequestParseError),
    ],
)
def test_register_request_errors(over, exc):
    with pytest.raises(exc):
        tailcfg.parse_register_request(_register_body(**over))


def test_request_not_json_or_not_object():
    with pytest.raises(RequestParseError):
        tailcfg.parse_register_request(b"{nope")
    with pytest.raises(RequestParseError):
        tailcfg.parse_map_request(b"[]")


def test_parse_map_request():
    body = {
        "Version": 145,
        "Compress": "zstd",
        "KeepAlive": True,
        "NodeKey": "nodekey:" + HEX,
        "DiscoKey": "discokey:" + "11" * 32,
        "Stream": True,
        "Hostinfo": {"NetInfo": {"PreferredDERP": 900}},
        "Endpoints": ["192.0.2.1:41641", "[2001:db8::1]:41641"],
        "EndpointTypes": [2, 1],
    }
    req = tailcfg.parse_map_request(body)
    assert req.stream and not req.omit_peers and not req.is_lite_update
    assert req.disco_key == b"\x11" * 32
    assert req.endpoints == ("192.0.2.1:41641", "[2001:db8::1]:41641")
    assert req.preferred_derp == 900
    lite = tailcfg.parse_map_request(
        {"NodeKey": "nodekey:" + HEX, "OmitPeers": True, "DiscoKey": "discokey:" + "0" * 64}
    )
    assert lite.is_lite_update
    assert lite.disco_key is None  # zero disco key must not overwrite a stored one


@pytest.mark.parametrize(
    ("over", "exc"),
    [
        ({"DiscoKey": ""}, KeyParseError),
        ({"DiscoKey": "nodekey:" + HEX}, KeyParseError),
        ({"Endpoints": ["nonsense"]}, RequestParseError),
        ({"Endpoints": ["2001:db8::1:41641"]}, RequestParseError),
        ({"Endpoints": "1.2.3.4:1"}, RequestParseError),
        ({"EndpointTypes": ["x"]}, RequestParseError),
        ({"Stream": "true"}, RequestParseError),
    ],
)
def test_map_request_errors(over, exc):
    body = {"NodeKey": "nodekey:" + HEX}
    body.update(over)
    with pytest.raises(exc):
        tailcfg.parse_map_request(body)
