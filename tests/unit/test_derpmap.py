"""DERP map parsing and merging (Headscale derp/derp.go,
derp/server/derp_server.go GenerateRegion, derp-example.yaml)."""

import hashlib
import json

import pytest

from pyheadscale.mapper.derpmap import (
    DERPMapError,
    embedded_region,
    embedded_region_from_server_url,
    load_derp_map_file,
    merge_derp_maps,
    parse_derp_map,
    parse_derp_map_json,
)

# Headscale's derp-example.yaml format: yaml.v3 lower-case Go field names.
HEADSCALE_YAML = """\
regions:
  1: null # Disable DERP region with ID 1
  900:
    regionid: 900
    regioncode: custom
    regionname: My Region
    nodes:
      - name: 900a
        regionid: 900
        hostname: myderp.example.com
        ipv4: 198.51.100.1
        ipv6: 2001:db8::1
        stunport: 0
        stunonly: false
        derpport: 0
"""

URL_MAP = {
    "Regions": {
        "1": {
            "RegionID": 1,
            "RegionCode": "nyc",
            "RegionName": "New York City",
            "Nodes": [
                {
                    "Name": "1f",
                    "RegionID": 1,
                    "HostName": "derp1f.example.net",
                    "IPv4": "203.0.113.1",
                    "IPv6": "2001:db8:1::1",
                    "CanPort80": True,
                }
            ],
        },
        "2": {
            "RegionID": 2,
            "RegionCode": "sfo",
            "RegionName": "San Francisco",
            "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": "derp2.example.net"}],
        },
    }
}


def test_yaml_headscale_format(tmp_path):
    p = tmp_path / "derp.yaml"
    p.write_text(HEADSCALE_YAML)
    m = load_derp_map_file(p)
    assert m["Regions"]["1"] is None
    assert m["Regions"]["900"] == {
        "RegionID": 900,
        "RegionCode": "custom",
        "RegionName": "My Region",
        "Nodes": [
            {
                "Name": "900a",
                "RegionID": 900,
                "HostName": "myderp.example.com",
                "IPv4": "198.51.100.1",
                "IPv6": "2001:db8::1",
                # zero ports / false flags are omitted, as Go's omitempty does
            }
        ],
    }


def test_json_file_and_url_body(tmp_path):
    p = tmp_path / "derp.json"
    p.write_text(json.dumps(URL_MAP))
    from_file = load_derp_map_file(p)
    from_url = parse_derp_map_json(json.dumps(URL_MAP).encode())
    assert from_file == from_url
    assert from_url["Regions"]["1"]["Nodes"][0]["CanPort80"] is True


def test_merge_later_overrides_and_null_removes():
    url = parse_derp_map(URL_MAP)
    path = parse_derp_map(
        {
            "regions": {
                1: None,
                2: {
                    "regioncode": "mine",
                    "regionname": "Mine",
                    "nodes": [{"name": "2x", "hostname": "h.example"}],
                },
            }
        }
    )
    merged = merge_derp_maps([url], [path])
    assert list(merged["Regions"]) == ["2"]  # region 1 removed, no null value sent
    assert merged["Regions"]["2"]["RegionCode"] == "mine"
    assert merged["Regions"]["2"]["Nodes"][0]["RegionID"] == 2  # filled from the region
    assert None not in merged["Regions"].values()
    assert "omitDefaultRegions" not in merged


def test_merge_embedded_last_wins():
    emb = embedded_region(
        host="127.0.0.1",
        derp_port=3340,
        stun_port=3478,
        region_id=2,
        region_code="headscale",
        region_name="Headscale Embedded DERP",
    )
    merged = merge_derp_maps([parse_derp_map(URL_MAP)], [], emb)
    assert merged["Regions"]["2"]["RegionCode"] == "headscale"
    assert merged["Regions"]["1"]["RegionCode"] == "nyc"


def test_omit_default_regions_drops_url_regions():
    path = parse_derp_map(
        {
            "omitDefaultRegions": True,
            "Regions": {
                "900": {
                    "RegionID": 900,
                    "RegionCode": "test",
                    "RegionName": "Test",
                    "Nodes": [{"Name": "900a", "HostName": "127.0.0.1"}],
                }
            },
        }
    )
    merged = merge_derp_maps([parse_derp_map(URL_MAP)], [path])
    assert list(merged["Regions"]) == ["900"]
    assert merged["omitDefaultRegions"] is True


def test_embedded_region_shape_matches_headscale_and_spec():
    digest = hashlib.sha256(b"der-cert").hexdigest()
    r = embedded_region_from_server_url(
        "http://127.0.0.1:8080",
        "0.0.0.0:3478",
        ipv4="127.0.0.1",
        ipv6="none",
        cert_sha256=digest,
    )
    assert r == {
        "RegionID": 999,
        "RegionCode": "headscale",
        "RegionName": "Headscale Embedded DERP",
        "Nodes": [
            {
                "Name": "999",
                "RegionID": 999,
                "HostName": "127.0.0.1",
                "CertName": "sha256-raw:" + digest,
                "IPv4": "127.0.0.1",
                "IPv6": "none",
                "STUNPort": 3478,
                "DERPPort": 8080,
            }
        ],
    }
    # Told to skip verification, clients get no pin: v1.80 takes it for a host name to match.
    insecure = embedded_region_from_server_url(
        "http://127.0.0.1:8080", "0.0.0.0:3478", ipv4="127.0.0.1", ipv6="none",
        cert_sha256=digest, insecure_for_tests=True)["Nodes"][0]
    assert insecure["InsecureForTests"] is True and "CertName" not in insecure
    https = embedded_region_from_server_url("https://hs.example.com", "[::]:3478")
    assert https["Nodes"][0]["DERPPort"] == 443
    assert "CertName" not in https["Nodes"][0]
    assert "InsecureForTests" not in https["Nodes"][0]


def test_merged_map_is_json_with_string_region_keys():
    emb = embedded_region(host="127.0.0.1", derp_port=3340, stun_port=3478, region_id=900)
    merged = merge_derp_maps((), (), emb)
    assert json.loads(json.dumps(merged))["Regions"]["900"]["Nodes"][0]["Name"] == "900"


@pytest.mark.parametrize(
    "data",
    [
        ["not", "a", "map"],
        {"regions": {"abc": {}}},
        {"regions": {0: {"nodes": []}}},
        {"regions": {900: {"regionid": 901}}},
        {"regions": {900: {"nodes": [{"name": "a"}]}}},  # HostName missing
        {"regions": {900: {"nodes": [{"name": "a", "hostname": "h", "ipv4": "bogus"}]}}},
        {"regions": {900: {"nodes": [{"name": "a", "hostname": "h", "derpport": "443"}]}}},
        {"regions": {900: {"nodes": "x"}}},
        {"regions": {900: {"nodes": [{"name": "a", "hostname": "h", "stunport": 70000}]}}},
    ],
)
def test_bad_maps_raise(data):
    with pytest.raises(DERPMapError):
        parse_derp_map(data)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("regions: [unclosed")
    with pytest.raises(DERPMapError, match="YAML"):
        load_derp_map_file(p)
    with pytest.raises(DERPMapError, match="reading"):
        load_derp_map_file(tmp_path / "missing.yaml")


def test_bad_embedded_cert_hash():
    with pytest.raises(DERPMapError):
        embedded_region(host="h", derp_port=1, stun_port=1, cert_sha256="abc")
