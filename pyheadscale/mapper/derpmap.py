"""The DERP map: the embedded region, regions from derp.paths / derp.urls, and their merge.

Facts (Headscale ``derp/derp.go``, ``derp/server/derp_server.go``, ``derp-example.yaml``):

* Sources are merged by region ID, later overriding earlier: derp.urls, then derp.paths, then
  the embedded region (added last when automatically_add_embedded_derp_region).
* derp.paths files are YAML decoded by yaml.v3 into tailcfg.DERPMap, i.e. with lower-case Go
  field names (``regionid``, ``hostname``, ``stunport`` ...). URL bodies are tailcfg JSON (Go
  names, matched case-insensitively). Both spellings are accepted here.
* A ``null`` region (``1: null`` in derp-example.yaml, "disable region 1") removes that
  region; null values are never sent (the client drops them).
* The embedded node is named after the region ID, its host/port come from server_url and its
  STUN port from stun_listen_addr.

``omitDefaultRegions`` (a server-side notion; clients ignore it): when a derp.paths map sets
it, regions fetched from derp.urls (the "default" regions) are left out.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
import yaml

__all__ = [
    "DERPMapError",
    "embedded_region",
    "embedded_region_from_server_url",
    "server_url_port",
    "load_derp_map_file",
    "merge_derp_maps",
    "parse_derp_map",
    "parse_derp_map_json",
]


class DERPMapError(ValueError):
    """A DERP map source is malformed."""


# canonical Go name -> kind
_REGION_FIELDS: dict[str, str] = {
    "RegionID": "int",
    "RegionCode": "str",
    "RegionName": "str",
    "Latitude": "float",
    "Longitude": "float",
    "Avoid": "bool",
    "NoMeasureNoHome": "bool",
}
_NODE_FIELDS: dict[str, str] = {
    "Name": "str",
    "RegionID": "int",
    "HostName": "str",
    "CertName": "str",
    "IPv4": "str",
    "IPv6": "str",
    "STUNPort": "int",
    "STUNOnly": "bool",
    "DERPPort": "int",
    "InsecureForTests": "bool",
    "STUNTestIP": "str",
    "CanPort80": "bool",
}
# Fields sent even when zero (no omitempty in tailcfg/derpmap.go).
_REGION_ALWAYS = ("RegionID", "RegionCode", "RegionName")
_NODE_ALWAYS = ("Name", "RegionID", "HostName")


def _lower_keys(d: Mapping[Any, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise DERPMapError(f"{where}: key {k!r} is not a string")
        out[k.lower()] = v
    return out


def _typed(value: Any, kind: str, where: str) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DERPMapError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DERPMapError(f"{where} must be a number, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise DERPMapError(f"{where} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        # YAML turns bare IPs into strings, but a bare number (e.g. name: 900) into an int.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise DERPMapError(f"{where} must be a string, got {value!r}")
    return value


def _fields(
    raw: Mapping[Any, Any], spec: dict[str, str], always: tuple[str, ...], where: str
) -> dict[str, Any]:
    low = _lower_keys(raw, where)
    out: dict[str, Any] = {}
    for name, kind in spec.items():
        v = low.get(name.lower())
        if v is None:
            continue
        v = _typed(v, kind, f"{where}.{name}")
        if v or name in always:
            out[name] = v
    for name in always:
        out.setdefault(name, "" if spec[name] == "str" else 0)
    return out


def _region_id(key: Any, where: str) -> int:
    if isinstance(key, bool):
        raise DERPMapError(f"{where}: bad region key {key!r}")
    if isinstance(key, int):
        rid = key
    elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
        rid = int(key)
    else:
        raise DERPMapError(f"{where}: region key {key!r} is not an integer")
    if rid <= 0:
        raise DERPMapError(f"{where}: region ID must be positive, got {rid}")
    return rid


def _parse_node(raw: Any, region_id: int, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise DERPMapError(f"{where} must be an object")
    node = _fields(raw, _NODE_FIELDS, _NODE_ALWAYS, where)
    if not node["HostName"]:
        raise DERPMapError(f"{where}.HostName is required")
    if not node["RegionID"]:
        node["RegionID"] = region_id
    if not node["Name"]:
        raise DERPMapError(f"{where}.Name is required")
    for fam, cls in (("IPv4", ipaddress.IPv4Address), ("IPv6", ipaddress.IPv6Address)):
        v = node.get(fam)
        if v and v != "none":
            try:
                cls(v)
            except ValueError:
                raise DERPMapError(
                    f"{where}.{fam} {v!r} is not an {fam} address or 'none'"
                ) from None
    for port in ("STUNPort", "DERPPort"):
        v = node.get(port, 0)
        if not -1 <= v <= 65535:
            raise DERPMapError(f"{where}.{port} {v} out of range")
    return node


def _parse_region(raw: Any, rid: int, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise DERPMapError(f"{where} must be an object")
    region = _fields(raw, _REGION_FIELDS, _REGION_ALWAYS, where)
    if not region["RegionID"]:
        region["RegionID"] = rid
    elif region["RegionID"] != rid:
        raise DERPMapError(f"{where}: RegionID {region['RegionID']} differs from its key {rid}")
    nodes_raw = _lower_keys(raw, where).get("nodes") or []
    if not isinstance(nodes_raw, list):
        raise DERPMapError(f"{where}.Nodes must be a list")
    region["Nodes"] = [_parse_node(n, rid, f"{where}.Nodes[{i}]") for i, n in enumerate(nodes_raw)]
    return region


def parse_derp_map(data: Any, source: str = "DERP map") -> dict[str, Any]:
    """Validate a decoded tailcfg.DERPMap (YAML lower-case or JSON Go field names).

    Returns ``{"Regions": {"<id>": region | None}, ...}``; None marks a region to remove.
    """
    if data is None:
        return {"Regions": {}}
    if not isinstance(data, Mapping):
        raise DERPMapError(f"{source}: top level must be a mapping")
    low = _lower_keys(data, source)
    regions_raw = low.get("regions") or {}
    if not isinstance(regions_raw, Mapping):
        raise DERPMapError(f"{source}: regions must be a mapping of region ID to region")
    regions: dict[str, dict[str, Any] | None] = {}
    for key, raw in regions_raw.items():
        rid = _region_id(key, source)
        where = f"{source}: region {rid}"
        regions[str(rid)] = None if raw is None else _parse_region(raw, rid, where)
    out: dict[str, Any] = {"Regions": regions}
    omit = low.get("omitdefaultregions")
    if omit is not None:
        out["omitDefaultRegions"] = _typed(omit, "bool", f"{source}: omitDefaultRegions")
    home = low.get("homeparams")
    if home is not None:
        if not isinstance(home, Mapping):
            raise DERPMapError(f"{source}: HomeParams must be a mapping")
        scores_raw = _lower_keys(home, source).get("regionscore") or {}
        if not isinstance(scores_raw, Mapping):
            raise DERPMapError(f"{source}: HomeParams.RegionScore must be a mapping")
        out["HomeParams"] = {
            "RegionScore": {
                str(_region_id(k, source)): _typed(v, "float", f"{source}: RegionScore[{k}]")
                for k, v in scores_raw.items()
            }
        }
    return out


def load_derp_map_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a derp.paths file (YAML, which also covers JSON) into parse_derp_map form."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise DERPMapError(f"reading DERP map {name!r}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DERPMapError(f"DERP map {name!r}: invalid YAML: {e}") from None
    return parse_derp_map(data, f"DERP map {name!r}")


def parse_derp_map_json(body: bytes, source: str = "DERP map URL") -> dict[str, Any]:
    """Parse a derp.urls response body (tailcfg.DERPMap JSON)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise DERPMapError(f"{source}: invalid JSON: {e}") from None
    return parse_derp_map(data, source)


def embedded_region(
    *,
    host: str,
    derp_port: int,
    stun_port: int,
    region_id: int = 999,
    region_code: str = "headscale",
    region_name: str = "Headscale Embedded DERP",
    ipv4: str = "",
    ipv6: str = "",
    cert_sha256: str | bytes | None = None,
    insecure_for_tests: bool = False,
) -> dict[str, Any]:
    """The embedded DERP server's region (Headscale ``GenerateRegion``).

    ``cert_sha256`` pins a self-signed certificate as ``CertName: "sha256-raw:<hex>"``
    (clients >= 1.82 only, docs/protocol.md "DERP"); give the digest of the DER certificate.
    ``insecure_for_tests`` publishes ``InsecureForTests`` and no pin: clients before 1.82
    take the pin for a host name to verify, even when told not to verify.
    """
    node: dict[str, Any] = {
        "Name": str(region_id),
        "RegionID": region_id,
        "HostName": host,
    }
    if cert_sha256 and not insecure_for_tests:
        digest = cert_sha256.hex() if isinstance(cert_sha256, bytes) else cert_sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DERPMapError("cert_sha256 must be a SHA-256 digest (32 bytes / 64 hex)")
        node["CertName"] = "sha256-raw:" + digest
    if ipv4:
        node["IPv4"] = ipv4
    if ipv6:
        node["IPv6"] = ipv6
    if stun_port:
        node["STUNPort"] = stun_port
    if derp_port:
        node["DERPPort"] = derp_port
    if insecure_for_tests:
        node["InsecureForTests"] = True
    region = {
        "RegionID": region_id,
        "RegionCode": region_code,
        "RegionName": region_name,
        "Nodes": [node],
    }
    # Validate like any other source so a bad config fails here, not in the client.
    regions: dict[str, dict[str, Any]] = parse_derp_map(
        {"Regions": {region_id: region}}, "embedded DERP region")["Regions"]
    return regions[str(region_id)]


def server_url_port(server_url: str) -> int:
    """server_url's port, 443/80 by scheme when it has none (Headscale's GenerateRegion)."""
    u = urlsplit(server_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise DERPMapError(f"server_url {server_url!r} is not an http(s) URL")
    try:
        return u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise DERPMapError(f"server_url {server_url!r} has a bad port") from None


def embedded_region_from_server_url(
    server_url: str, stun_listen_addr: str, **kw: Any
) -> dict[str, Any]:
    """Host and DERP port from server_url (default 443/80 by scheme), STUN port from the listen addr."""
    port = server_url_port(server_url)
    host = urlsplit(server_url).hostname or ""
    _, sep, stun = stun_listen_addr.rpartition(":")
    if not sep or not stun.isdigit():
        raise DERPMapError(f"stun_listen_addr {stun_listen_addr!r} has no port")
    return embedded_region(host=host, derp_port=port, stun_port=int(stun), **kw)


def merge_derp_maps(
    url_maps: Iterable[Mapping[str, Any]] = (),
    path_maps: Iterable[Mapping[str, Any]] = (),
    embedded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge parsed maps: urls, then paths, then the embedded region; later wins by region ID.

    Inputs are ``parse_derp_map`` results. A None region removes that ID. The result is
    tailcfg.DERPMap JSON with no null regions; an empty ``Regions`` is the caller's error to
    report (Headscale refuses to start without a region).
    """
    url_maps = list(url_maps)
    path_maps = list(path_maps)
    omit_defaults = any(m.get("omitDefaultRegions") for m in path_maps)
    sources = ([] if omit_defaults else url_maps) + path_maps
    regions: dict[str, dict[str, Any]] = {}
    home: dict[str, Any] | None = None
    for m in sources:
        for rid, region in (m.get("Regions") or {}).items():
            if region is None:
                regions.pop(str(rid), None)
            else:
                regions[str(rid)] = _copy_region(region)
        if m.get("HomeParams") is not None:
            home = m["HomeParams"]
    if embedded is not None:
        regions[str(embedded["RegionID"])] = _copy_region(embedded)
    out: dict[str, Any] = {"Regions": dict(sorted(regions.items(), key=lambda kv: int(kv[0])))}
    if home is not None:
        out["HomeParams"] = {"RegionScore": dict(home.get("RegionScore") or {})}
    if omit_defaults:
        out["omitDefaultRegions"] = True
    return out


def _copy_region(region: Mapping[str, Any]) -> dict[str, Any]:
    r = dict(region)
    r["Nodes"] = [dict(n) for n in region.get("Nodes") or []]
    return r
