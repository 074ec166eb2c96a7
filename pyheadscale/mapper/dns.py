"""tailcfg.DNSConfig from Headscale's ``dns:`` config section.

Facts (Headscale ``types/config.go dnsToTailcfgDNS``, ``app.go``, ``util/dns.go``; the
client side in docs/protocol.md, "Map streaming"):

* ``Proxied`` = magic_dns. The client itself routes the MagicDNS suffix (self name minus the
  first label) to 100.100.100.100, so base_domain is *not* added to Routes.
* With MagicDNS, the reverse zones of the IPv4/IPv6 prefixes are Routes with ``[]`` values
  (answered by quad-100); Headscale sends ``[]`` rather than null for them.
* nameservers.global -> ``Resolvers`` when override_local_dns, else ``FallbackResolvers``.
* nameservers.split -> ``Routes``. ``Domains`` = [base_domain] + search_domains, no trailing
  dots. ``ExtraRecords`` from config or from the extra_records_path JSON file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pyheadscale.config import DNSConfig, PrefixesConfig

__all__ = [
    "DNSSettings",
    "ExtraRecordsError",
    "build_dns_config",
    "load_extra_records",
    "normalize_extra_records",
    "reverse_zones_v4",
    "reverse_zones_v6",
]

log = logging.getLogger(__name__)


class ExtraRecordsError(ValueError):
    """An extra DNS record (inline or from the JSON file) is invalid."""


@dataclass(frozen=True)
class DNSSettings:
    """Plain values of Headscale's ``dns:`` section plus the IP prefixes.

    ``extra_records`` should already contain the records loaded from extra_records_path
    (the app watches the file and rebuilds the context).
    """

    magic_dns: bool = False
    override_local_dns: bool = False
    nameservers_global: tuple[str, ...] = ()
    nameservers_split: Mapping[str, Sequence[str]] = field(default_factory=dict)
    search_domains: tuple[str, ...] = ()
    extra_records: tuple[Mapping[str, Any], ...] = ()
    prefix_v4: ipaddress.IPv4Network | None = None
    prefix_v6: ipaddress.IPv6Network | None = None

    @classmethod
    def from_config(
        cls,
        dns_cfg: DNSConfig,
        prefixes: PrefixesConfig,
        file_records: Iterable[Mapping[str, Any]] = (),
    ) -> DNSSettings:
        """The config's ``dns`` section, its prefixes and the records of extra_records_path."""
        inline = [r.model_dump() for r in dns_cfg.extra_records]
        return cls(
            magic_dns=dns_cfg.magic_dns,
            override_local_dns=dns_cfg.override_local_dns,
            nameservers_global=tuple(dns_cfg.nameservers.global_),
            nameservers_split={k: tuple(v) for k, v in dns_cfg.nameservers.split.items()},
            search_domains=tuple(dns_cfg.search_domains),
            extra_records=tuple(normalize_extra_records([*inline, *file_records])),
            prefix_v4=prefixes.v4,
            prefix_v6=prefixes.v6,
        )


def _resolver(addr: str) -> dict[str, str] | None:
    """A dnstype.Resolver for an IP, ``IP:port``/``[v6]:port`` or a ``scheme://`` URL."""
    addr = addr.strip()
    if not addr:
        return None
    try:
        ipaddress.ip_address(addr)
        return {"Addr": addr}
    except ValueError:
        pass
    if "://" in addr:
        return {"Addr": addr}
    host, sep, port = addr.rpartition(":")
    if sep and port.isdigit():
        try:
            ipaddress.ip_address(host.strip("[]"))
            return {"Addr": addr}
        except ValueError:
            pass
    log.warning("invalid nameserver %r, ignoring", addr)
    return None


def _resolvers(addrs: Iterable[str]) -> list[dict[str, str]]:
    return [r for a in addrs if (r := _resolver(str(a))) is not None]


def reverse_zones_v4(prefix: ipaddress.IPv4Network) -> list[str]:
    """in-addr.arpa zones covering ``prefix`` (e.g. 100.64.0.0/10 -> 64..127.100.in-addr.arpa)."""
    octets = prefix.network_address.packed
    bits = prefix.prefixlen
    whole = bits // 8
    if whole >= 4:
        return [".".join(str(b) for b in reversed(octets)) + ".in-addr.arpa"]
    base = ".".join(str(b) for b in reversed(octets[:whole]))
    base = (base + "." if base else "") + "in-addr.arpa"
    first = octets[whole]
    count = 1 << (8 - bits % 8)
    return [f"{i}.{base}" for i in range(first, first + count)]


def reverse_zones_v6(prefix: ipaddress.IPv6Network) -> list[str]:
    """ip6.arpa zones covering ``prefix`` (nibble-aligned, split when not a multiple of 4)."""
    nibbles = prefix.network_address.exploded.replace(":", "")
    bits = prefix.prefixlen
    fixed = list(reversed(nibbles[: bits // 4]))
    tail = ".".join(fixed)
    if bits % 4 == 0:
        return [(tail + "." if tail else "") + "ip6.arpa"]
    # Headscale enumerates the partial nibble's low bits as hex digits 0..2^(bits%4)-1.
    return [f"{i:x}." + (tail + "." if tail else "") + "ip6.arpa" for i in range(1 << (bits % 4))]


def _strip_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


def build_dns_config(settings: DNSSettings, base_domain: str = "") -> dict[str, Any]:
    """The tailcfg.DNSConfig JSON object (never None: Headscale always sends one)."""
    cfg: dict[str, Any] = {}
    resolvers = _resolvers(settings.nameservers_global)
    if resolvers:
        cfg["FallbackResolvers" if not settings.override_local_dns else "Resolvers"] = resolvers

    routes: dict[str, list[dict[str, str]]] = {}
    for domain, servers in settings.nameservers_split.items():
        routes[_strip_dot(domain)] = _resolvers(servers)
    if settings.magic_dns:
        zones: list[str] = []
        if settings.prefix_v4 is not None:
            zones += reverse_zones_v4(settings.prefix_v4)
        if settings.prefix_v6 is not None:
            zones += reverse_zones_v6(settings.prefix_v6)
        for z in zones:
            routes[z] = []  # [] = answered by 100.100.100.100
    if routes:
        cfg["Routes"] = routes

    domains = [_strip_dot(base_domain)] if base_domain else []
    domains += [_strip_dot(d) for d in settings.search_domains if d]
    if domains:
        cfg["Domains"] = domains
    if settings.magic_dns:
        cfg["Proxied"] = True
    if settings.extra_records:
        cfg["ExtraRecords"] = [dict(r) for r in settings.extra_records]
    return cfg


def _field(rec: Mapping[str, Any], name: str) -> Any:
    # Go's encoding/json matches keys case-insensitively; Headscale's YAML uses lower case.
    for k, v in rec.items():
        if isinstance(k, str) and k.lower() == name:
            return v
    return None


def normalize_extra_records(records: Iterable[Any]) -> list[dict[str, str]]:
    """Validate records into tailcfg.DNSRecord form ``{"Name","Type"?,"Value"}``."""
    out: list[dict[str, str]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ExtraRecordsError(f"record {i}: must be an object with name/type/value")
        name, typ, value = _field(rec, "name"), _field(rec, "type"), _field(rec, "value")
        if not isinstance(name, str) or not name.strip("."):
            raise ExtraRecordsError(f"record {i}: name must be a non-empty string")
        if typ is None:
            typ = ""
        if not isinstance(typ, str) or typ.upper() not in ("", "A", "AAAA"):
            raise ExtraRecordsError(f"record {i} ({name}): type must be A or AAAA, got {typ!r}")
        if not isinstance(value, str):
            raise ExtraRecordsError(f"record {i} ({name}): value must be a string")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise ExtraRecordsError(f"record {i} ({name}): value {value!r} is not an IP") from None
        typ = typ.upper()
        if (typ == "A" and addr.version != 4) or (typ == "AAAA" and addr.version != 6):
            raise ExtraRecordsError(f"record {i} ({name}): {typ} record with {value!r}")
        entry = {"Name": name, "Value": value}
        if typ:
            entry = {"Name": name, "Type": typ, "Value": value}
        out.append(entry)
    return out


def load_extra_records(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read Headscale's extra_records_path file: a JSON array of DNSRecord objects.

    Raises ExtraRecordsError for a missing/unreadable file, invalid JSON, a wrong shape or an
    empty file (likely caught mid-write; Headscale skips that update), so the caller keeps the
    previous records.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExtraRecordsError(f"reading extra records file {os.fspath(path)!r}: {e}") from None
    if not data.strip():
        raise ExtraRecordsError(f"extra records file {os.fspath(path)!r} is empty")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ExtraRecordsError(
            f"extra records file {os.fspath(path)!r}: invalid JSON: {e}"
        ) from None
    if parsed is None:
        return []
    if not isinstance(parsed, list):
        raise ExtraRecordsError(f"extra records file {os.fspath(path)!r}: expected a JSON array")
    try:
        return normalize_extra_records(parsed)
    except ExtraRecordsError as e:
        raise ExtraRecordsError(f"extra records file {os.fspath(path)!r}: {e}") from None
