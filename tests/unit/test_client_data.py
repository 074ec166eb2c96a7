"""Client data is decoded as Tailscale's Go types are, with caps (pyheadscale.gojson/hostinfo).

Go's own encoding/json on tailcfg (tests/gocheck, built for the oldest and newest pinned
client versions) is the judge: a Hostinfo is refused exactly when Go refuses it (or when one of
our caps refuses it), and what we keep decodes in both Go versions to what Go made of the
original.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson
import pytest

from pyheadscale import tailcfg
from pyheadscale.gojson import DecodeError, go_fold
from pyheadscale.hostinfo import HOSTINFO, HOSTINFO_MAX_BYTES, decode_hostinfo
from pyheadscale.state.persist import stored_endpoints, stored_hostinfo
from tests.fuzz.gen import struct
from tests.gocheck.oracle import GoDecoder

REAL_HOSTINFO = {
    "IPNVersion": "1.102.5-t1234", "FrontendLogID": "", "BackendLogID": "abc", "OS": "linux",
    "OSVersion": "6.1.0-18-amd64", "Container": False, "Distro": "debian",
    "DistroVersion": "12.5", "DistroCodeName": "bookworm", "Desktop": False,
    "Hostname": "web-1", "Machine": "x86_64", "GoArch": "amd64", "GoArchVar": "v1",
    "GoVersion": "go1.26.1", "RoutableIPs": ["10.0.0.0/24", "0.0.0.0/0", "::/0"],
    "RequestTags": ["tag:web"], "Services": [{"Proto": "peerapi4", "Port": 63497},
                                             {"Proto": "tcp", "Port": 22, "Description": "sshd"}],
    "NetInfo": {"MappingVariesByDestIP": False, "WorkingIPv6": False, "OSHasIPv6": True,
                "WorkingUDP": True, "WorkingICMPv4": True, "HavePortMap": False, "UPnP": None,
                "PreferredDERP": 999, "LinkType": "wired",
                "DERPLatency": {"999-v4": 0.0012}, "FirewallMode": "ipt-default"},
    "sshHostKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO"], "Userspace": False,
    "UserspaceRouter": False, "AppConnector": False,
}
CAP_REFUSALS = ("longer than", "limit", "control characters")


def without_empty_prefixes(hi: dict[str, object]) -> dict[str, object]:
    """We drop empty (zero) prefixes from RoutableIPs where Go keeps them as ""."""
    routes = [r for r in hi.get("RoutableIPs") or () if r]  # type: ignore[attr-defined]
    return {**hi, "RoutableIPs": routes} if routes else {
        k: v for k, v in hi.items() if k != "RoutableIPs"}


@pytest.fixture(scope="module")
def go_new() -> Iterator[GoDecoder]:
    with GoDecoder("newest") as g:
        yield g


@pytest.fixture(scope="module")
def go_old() -> Iterator[GoDecoder]:
    with GoDecoder("oldest") as g:
        yield g


def test_a_real_hostinfo_is_kept_as_go_reads_it(go_new: GoDecoder) -> None:
    hi = decode_hostinfo(REAL_HOSTINFO)
    ok, want, _ = go_new.decode("hostinfo", REAL_HOSTINFO)
    assert ok
    assert go_new.decode("hostinfo", hi)[1] == want
    assert hi["NetInfo"]["PreferredDERP"] == 999 and hi["Services"][1]["Description"] == "sshd"
    assert "FrontendLogID" not in hi and hi["NetInfo"]["UPnP"] is None  # zero omitted, unset kept


def test_hostile_hostinfos_agree_with_go(go_new: GoDecoder, go_old: GoDecoder) -> None:
    rng = random.Random(0x48_0571)
    refused = accepted = 0
    for _ in range(3000):
        doc = struct(rng, HOSTINFO)
        ni = next((v for k, v in doc.items() if go_fold(k) == "NETINFO"), None)
        if isinstance(ni, dict):  # newest Go dropped HairPinning; only the oldest types it
            for k in [k for k in ni if go_fold(k) == "HAIRPINNING"]:
                del ni[k]
        go_ok, go_out, go_err = go_new.decode("hostinfo", doc)
        try:
            ours = decode_hostinfo(doc)
        except DecodeError as e:
            refused += 1
            assert not go_ok or any(r in str(e) for r in CAP_REFUSALS), (doc, str(e))
            continue
        accepted += 1
        assert go_ok, (doc, go_err)
        assert go_new.decode("hostinfo", ours)[1] == without_empty_prefixes(go_out), doc
        assert go_old.decode("hostinfo", ours)[0], ours
    assert refused > 300 and accepted > 300


def test_wrong_types_are_refused_with_the_field_path() -> None:
    with pytest.raises(DecodeError, match=r"Hostinfo\.OS: cannot decode JSON number into Go "
                                          r"string"):
        decode_hostinfo({"OS": 5})
    with pytest.raises(DecodeError, match=r"Services\[0\]\.Port: 70000 overflows Go uint16"):
        decode_hostinfo({"Services": [{"Proto": "tcp", "Port": 70000}]})
    with pytest.raises(DecodeError, match=r"NetInfo\.PreferredDERP"):
        decode_hostinfo({"NetInfo": {"PreferredDERP": 1.5}})
    with pytest.raises(DecodeError, match="opt.Bool"):
        decode_hostinfo({"Container": "true"})
    with pytest.raises(DecodeError, match="netip.Prefix"):
        decode_hostinfo({"RoutableIPs": ["10.0.0.0/33"]})


def test_keys_match_as_in_go_and_unknown_keys_go() -> None:
    hi = decode_hostinfo(orjson.loads(
        b'{"hostname":"a","HOSTNAME":null,"\xc5\xbfshHostKeys":["k"],"Junk":[[[]]],'
        b'"RoutableIPs":["1.2.3.4/24",""],"NetInfo":{}}'))
    assert hi == {"Hostname": "a", "sshHostKeys": ["k"], "RoutableIPs": ["1.2.3.4/24"],
                  "NetInfo": {}}


def test_caps() -> None:
    with pytest.raises(DecodeError, match="limit"):
        decode_hostinfo({"RequestTags": [f"tag:t{i}" for i in range(65)]})
    with pytest.raises(DecodeError, match="longer than 255"):
        decode_hostinfo({"Hostname": "h" * 256})
    with pytest.raises(DecodeError, match="control characters"):
        decode_hostinfo({"Hostname": "evil\nname"})
    big = {"Services": [{"Proto": "tcp", "Port": i, "Description": "d" * 128}
                        for i in range(1, 500)]}
    with pytest.raises(DecodeError, match=f"limit {HOSTINFO_MAX_BYTES}"):
        decode_hostinfo(big)


def test_requests_refuse_poisoned_hostinfo() -> None:
    body = {"Version": 113, "NodeKey": "nodekey:" + "11" * 32,
            "Hostinfo": {"Hostname": "x", "OS": ["padding"] * 1000}}
    with pytest.raises(tailcfg.RequestParseError, match=r"Hostinfo\.OS"):
        tailcfg.parse_map_request(body)
    with pytest.raises(tailcfg.RequestParseError, match=r"Hostinfo\.OS"):
        tailcfg.parse_register_request(body)
    body["Hostinfo"] = {"Hostname": "x", "Padding": "p" * 500_000, "OS": "linux"}
    assert tailcfg.parse_map_request(body).hostinfo == {"Hostname": "x", "OS": "linux"}
    with pytest.raises(tailcfg.RequestParseError, match="Endpoints.*limit"):
        tailcfg.parse_map_request({**body, "Endpoints": ["1.2.3.4:1"] * 129})


def test_map_request_endpoints_are_canonical() -> None:
    mr = tailcfg.parse_map_request({"Version": 113, "NodeKey": "nodekey:" + "11" * 32,
                                    "Endpoints": ["1.2.3.4:080", "[2001:DB8::1]:5", ""]})
    assert mr.endpoints == ("1.2.3.4:80", "[2001:db8::1]:5")


def test_stored_rows_lose_only_what_clients_cannot_decode(go_old: GoDecoder) -> None:
    raw = {"Hostname": "n1", "OS": 5, "RoutableIPs": ["10.0.0.0/8", "bad"],
           "Services": "nope", "Padding": "x" * 1000}
    hi = stored_hostinfo(1, raw)
    assert hi == {"Hostname": "n1", "RoutableIPs": ["10.0.0.0/8"]}
    assert go_old.decode("hostinfo", hi)[0]
    assert stored_hostinfo(1, "not an object") == {}
    huge = {"Hostname": "n2", "sshHostKeys": ["k" * 8000] * 16, "OS": "linux"}
    assert stored_hostinfo(2, huge) == {"Hostname": "n2", "OS": "linux"}
    assert stored_endpoints(["1.2.3.4:1", 5, "nonsense", "[::1]:2"]) == ("1.2.3.4:1", "[::1]:2")
