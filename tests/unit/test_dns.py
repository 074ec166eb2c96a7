"""DNSConfig from Headscale's dns section (docs/protocol.md, "Map streaming"; Headscale
types/config.go dnsToTailcfgDNS and app.go reverse-zone routes)."""

import ipaddress
import json

import pytest

from pyheadscale.config import DNSConfig, PrefixesConfig
from pyheadscale.mapper.dns import (
    DNSSettings,
    ExtraRecordsError,
    build_dns_config,
    load_extra_records,
    reverse_zones_v4,
    reverse_zones_v6,
)

V4 = ipaddress.IPv4Network("100.64.0.0/10")
V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")


def test_reverse_zones_match_client_magicdns_zones():
    # The client routes 64..127.100.in-addr.arpa and 0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa
    v4 = reverse_zones_v4(V4)
    assert len(v4) == 64
    assert v4[0] == "64.100.in-addr.arpa" and v4[-1] == "127.100.in-addr.arpa"
    assert reverse_zones_v6(V6) == ["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa"]
    assert reverse_zones_v4(ipaddress.IPv4Network("10.1.2.3/32")) == ["3.2.1.10.in-addr.arpa"]
    assert reverse_zones_v4(ipaddress.IPv4Network("192.168.0.0/16")) == [
        f"{i}.168.192.in-addr.arpa" for i in range(256)
    ]


def test_magic_dns_on_with_override():
    s = DNSSettings(
        magic_dns=True,
        override_local_dns=True,
        nameservers_global=("1.1.1.1", "2606:4700:4700::1111", "https://dns.example/dns-query"),
        search_domains=("corp.example.",),
        prefix_v4=V4,
        prefix_v6=V6,
    )
    cfg = build_dns_config(s, "tail.example.com")
    assert cfg["Proxied"] is True
    assert cfg["Resolvers"] == [
        {"Addr": "1.1.1.1"},
        {"Addr": "2606:4700:4700::1111"},
        {"Addr": "https://dns.example/dns-query"},
    ]
    assert "FallbackResolvers" not in cfg
    assert cfg["Domains"] == ["tail.example.com", "corp.example"]  # no trailing dots
    routes = cfg["Routes"]
    # reverse zones answered by quad-100: [] not null
    assert routes["64.100.in-addr.arpa"] == []
    assert routes["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa"] == []
    # the client routes its own MagicDNS suffix; Headscale adds no base-domain route
    assert "tail.example.com" not in routes
    assert all(not k.endswith(".") for k in routes)


def test_magic_dns_off_uses_fallback_and_no_reverse_routes():
    s = DNSSettings(
        magic_dns=False,
        override_local_dns=False,
        nameservers_global=("1.1.1.1",),
        prefix_v4=V4,
        prefix_v6=V6,
    )
    cfg = build_dns_config(s, "tail.example.com")
    assert "Proxied" not in cfg
    assert cfg["FallbackResolvers"] == [{"Addr": "1.1.1.1"}]
    assert "Resolvers" not in cfg
    assert "Routes" not in cfg
    assert cfg["Domains"] == ["tail.example.com"]


def test_empty_settings_give_empty_object():
    assert build_dns_config(DNSSettings()) == {}


def test_split_dns_routes():
    s = DNSSettings(
        magic_dns=True,
        nameservers_split={
            "corp.example.com": ("10.0.0.53", "10.0.0.54:5353"),
            "lab.example.": ("bogus name",),
        },
    )
    cfg = build_dns_config(s, "ts.example")
    assert cfg["Routes"]["corp.example.com"] == [{"Addr": "10.0.0.53"}, {"Addr": "10.0.0.54:5353"}]
    # an invalid nameserver is dropped; the route remains, handled by quad-100
    assert cfg["Routes"]["lab.example"] == []


def test_inline_extra_records_and_from_config():
    dns = DNSConfig.model_validate({
        "magic_dns": True,
        "base_domain": "ts.example",
        "override_local_dns": False,
        "nameservers": {"global": ["9.9.9.9"], "split": {}},
        "search_domains": [],
        "extra_records": [{"name": "grafana.ts.example", "type": "A", "value": "100.64.0.5"}],
    })
    s = DNSSettings.from_config(
        dns,
        PrefixesConfig.model_validate({"v4": "100.64.0.0/10"}),
        file_records=[{"Name": "db.ts.example", "Value": "fd7a::5"}],
    )
    cfg = build_dns_config(s, "ts.example")
    assert cfg["ExtraRecords"] == [
        {"Name": "grafana.ts.example", "Type": "A", "Value": "100.64.0.5"},
        {"Name": "db.ts.example", "Value": "fd7a::5"},
    ]
    assert cfg["FallbackResolvers"] == [{"Addr": "9.9.9.9"}]
    assert "64.100.in-addr.arpa" in cfg["Routes"]


def test_load_extra_records_file(tmp_path):
    p = tmp_path / "records.json"
    p.write_text(
        json.dumps(
            [
                {"name": "a.ts.example", "type": "A", "value": "100.64.0.10"},
                {"Name": "b.ts.example", "Type": "AAAA", "Value": "fd7a:115c:a1e0::10"},
            ]
        )
    )
    assert load_extra_records(p) == [
        {"Name": "a.ts.example", "Type": "A", "Value": "100.64.0.10"},
        {"Name": "b.ts.example", "Type": "AAAA", "Value": "fd7a:115c:a1e0::10"},
    ]


@pytest.mark.parametrize(
    ("content", "msg"),
    [
        ("", "empty"),
        ("{nope", "invalid JSON"),
        ('{"name": "x"}', "array"),
        ('[{"name": "x.ts", "type": "A", "value": "fd7a::1"}]', "A record"),
        ('[{"name": "x.ts", "type": "CNAME", "value": "1.2.3.4"}]', "type"),
        ('[{"name": "x.ts", "value": "not-an-ip"}]', "not an IP"),
        ('[{"type": "A", "value": "1.2.3.4"}]', "name"),
    ],
)
def test_load_extra_records_errors(tmp_path, content, msg):
    p = tmp_path / "records.json"
    p.write_text(content)
    with pytest.raises(ExtraRecordsError, match=msg):
        load_extra_records(p)


def test_load_extra_records_missing_file(tmp_path):
    with pytest.raises(ExtraRecordsError, match="reading"):
        load_extra_records(tmp_path / "absent.json")
