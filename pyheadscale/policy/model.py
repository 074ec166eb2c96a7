"""Policy document model: aliases, ports, protocols and the parsed document's types, with
Headscale 0.29 semantics. The document parser is policy/parse.py.

Each message keeps Headscale's wording (the conformance corpus checks it as a substring).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from pyheadscale.gotext import goquote

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTOGROUPS = (
    "autogroup:internet",
    "autogroup:member",
    "autogroup:nonroot",
    "autogroup:tagged",
    "autogroup:self",
    "autogroup:danger-all",
)
AG_SRC = ("autogroup:member", "autogroup:tagged", "autogroup:danger-all")
AG_DST = ("autogroup:internet", "autogroup:member", "autogroup:tagged", "autogroup:self")
AG_SSH_SRC = ("autogroup:member", "autogroup:tagged")
AG_SSH_DST = ("autogroup:member", "autogroup:tagged", "autogroup:self")
AG_NODEATTRS = ("autogroup:member", "autogroup:tagged")

# Caps Headscale parses but refuses, pointing at the tracking issue.
UNSUPPORTED_NODE_ATTRS = {"funnel": "https://github.com/juanfont/headscale/issues/2527"}

# tailscale.com/ capability names allowed in grants' "app".
TAILSCALE_CAP_ALLOWLIST = frozenset(
    {
        "tailscale.com/cap/drive",
        "tailscale.com/cap/relay",
        "tailscale.com/cap/webui",
        "tailscale.com/cap/kubernetes",
        "tailscale.com/cap/tsidp",
        "tailscale.com/cap/secrets",
    }
)

PROTOCOLS = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
    "fc": 133,
}
_NUMBER_TO_PROTO = {
    1: "icmp",
    2: "igmp",
    4: "ipv4",
    6: "tcp",
    8: "egp",
    9: "igp",
    17: "udp",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    132: "sctp",
    133: "fc",
}

SSH_CHECK_PERIOD_DEFAULT = 12 * 3600.0
SSH_CHECK_PERIOD_MAX = 168 * 3600.0


# ---------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class Alias:
    """One policy alias. kind: user, group, tag, host, prefix, autogroup, wildcard."""

    kind: str
    text: str
    prefix: IPNetwork | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def gotype(self) -> str:
        return {
            "user": "*v2.Username",
            "group": "*v2.Group",
            "tag": "*v2.Tag",
            "host": "*v2.Host",
            "prefix": "*v2.Prefix",
            "autogroup": "*v2.AutoGroup",
            "wildcard": "v2.Asterix",
        }[self.kind]


WILDCARD = Alias("wildcard", "*")


def parse_prefix(text: str) -> IPNetwork:
    """netip.ParseAddr / ParsePrefix: bare address -> host prefix; host bits allowed."""
    if "/" not in text:
        a = ipaddress.ip_address(text)
        return ipaddress.ip_network(a)
    addr, _, bits = text.partition("/")
    if not bits.isdigit() or (len(bits) > 1 and bits[0] == "0"):
        raise ValueError(f"bad prefix {text!r}")
    a = ipaddress.ip_address(addr)
    if "%" in addr:
        raise ValueError("zone in prefix")
    n = int(bits)
    if n > a.max_prefixlen:
        raise ValueError("prefix length out of range")
    return ipaddress.ip_network((a, n), strict=False)


def tag_error(tag: str) -> str | None:
    if not tag.startswith("tag:"):
        return f"tag must start with 'tag:', got: {goquote(tag)}"
    rest = tag[4:]
    if not rest or not (("a" <= rest[0] <= "z") or ("A" <= rest[0] <= "Z")):
        return "tag names must start with a letter, after 'tag:'"
    return None


def parse_principal(text: str) -> Alias | None:
    """A user (has an @), group: or tag: alias, else None. Tag name rules are enforced where
    tags are defined (tagOwners keys, via), not here."""
    if "@" in text:
        return Alias("user", text)
    for kind in ("group", "tag"):
        if text.startswith(f"{kind}:"):
            return Alias(kind, text)
    return None


def parse_alias(text: str) -> Alias:
    try:
        return Alias("prefix", text, parse_prefix(text))
    except ValueError:
        pass
    if text == "*":
        return WILDCARD
    principal = parse_principal(text)
    if principal is not None:
        return principal
    if text.startswith("autogroup:"):
        if text not in AUTOGROUPS:
            raise ValueError(
                f"invalid autogroup: got {goquote(text)}, must be one of [{' '.join(AUTOGROUPS)}]"
            )
        return Alias("autogroup", text)
    if ":" not in text:
        return Alias("host", text)
    raise ValueError(f"invalid alias format: {goquote(text)}")


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int


ANY_PORT = PortRange(0, 65535)


def _parse_port(s: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise ValueError("invalid first integer")
    p = int(s)
    if p < 0 or p > 65535:
        raise ValueError("port number out of range")
    return p


def parse_port_range(spec: str) -> list[PortRange]:
    if spec == "*":
        return [ANY_PORT]
    out = []
    for part in spec.split(","):
        if "-" in part:
            pieces = [x for x in part.split("-") if x != ""]
            if len(pieces) != 2:
                raise ValueError("invalid port range format")
            first, last = _parse_port(pieces[0]), _parse_port(pieces[1])
            if first > last:
                raise ValueError("invalid port range: first port is greater than last port")
            out.append(PortRange(first, last))
        else:
            port = _parse_port(part)
            if port < 1:
                raise ValueError("first port must be >0, or use '*' for wildcard")
            out.append(PortRange(port, port))
    return out


def split_destination_and_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("square brackets are only valid around IPv6 addresses")
        host = text[1:close]
        try:
            ok = ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"square brackets are only valid around IPv6 addresses: {goquote(host)}"
            )
        rest = text[close + 1 :]
        if not rest or rest[0] not in ":/":
            raise ValueError(
                f"square brackets are only valid around IPv6 addresses: {goquote(text)}"
            )
        text = host + rest
    i = text.rfind(":")
    if i < 0:
        raise ValueError("input must contain a colon character separating destination and port")
    if i == 0:
        raise ValueError("input cannot start with a colon character")
    if i == len(text) - 1:
        raise ValueError("input cannot end with a colon character")
    return text[:i], text[i + 1 :]


@dataclass(frozen=True)
class AliasWithPorts:
    alias: Alias
    ports: tuple[PortRange, ...]


def parse_alias_with_ports(text: str) -> AliasWithPorts:
    if ":" not in text:
        raise ValueError("hostport must contain a colon")
    dest, ports_part = split_destination_and_port(text)
    try:
        ports = parse_port_range(ports_part)
    except ValueError as e:
        raise ValueError(f"dst={goquote(text)}: port range {goquote(ports_part)}: {e}") from None
    return AliasWithPorts(parse_alias(dest), tuple(ports))


@dataclass(frozen=True)
class ProtocolPort:
    protocol: str  # "" or "*" (any), a name from PROTOCOLS, or a decimal number
    ports: tuple[PortRange, ...]

    def iana(self) -> list[int] | None:
        return protocol_numbers(self.protocol)


def protocol_numbers(proto: str) -> list[int] | None:
    if proto in ("", "*"):
        return None
    if proto in PROTOCOLS:
        return [PROTOCOLS[proto]]
    return [int(proto)]


def normalize_protocol(raw: str) -> str:
    p = raw.lower()
    if p.isdigit() and 0 <= int(p) <= 255 and int(p) in _NUMBER_TO_PROTO and p == str(int(p)):
        p = _NUMBER_TO_PROTO[int(p)]
    if p == "" or p in PROTOCOLS:
        return p
    if p == "*":
        raise ValueError(
            'proto name "*" not known; use protocol number 0-255 or protocol name '
            "(icmp, tcp, udp, etc.)"
        )
    if p == "0" or (len(p) > 1 and p[0] == "0"):
        raise ValueError(f"leading 0 not permitted in protocol number: {goquote(p)}")
    if not re.fullmatch(r"[+-]?[0-9]+", p):
        raise ValueError(
            f"invalid protocol number: {goquote(p)} must be a known protocol name or valid "
            "protocol number 0-255"
        )
    n = int(p)
    if n < 0 or n > 255:
        raise ValueError(f"protocol number out of range (0-255): {n}")
    return str(n)


def parse_protocol_port(text: str) -> ProtocolPort:
    if text == "*":
        return ProtocolPort("*", (ANY_PORT,))
    if ":" not in text:
        try:
            return ProtocolPort("*", tuple(parse_port_range(text)))
        except ValueError as e:
            raise ValueError(f"port range {goquote(text)}: {e}") from None
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(
            "expected only one colon in Internet protocol and port type, got: "
            f"[{' '.join(parts)}]({len(parts)})"
        )
    proto = normalize_protocol(parts[0])
    try:
        ports = parse_port_range(parts[1])
    except ValueError as e:
        raise ValueError(f"port range {goquote(parts[1])}: {e}") from None
    return ProtocolPort(proto, tuple(ports))


# ---------------------------------------------------------------------------- documents


@dataclass
class ACL:
    action: str
    proto: str
    src: list[Alias]
    dst: list[AliasWithPorts]


@dataclass
class Grant:
    src: list[Alias]
    dst: list[Alias]
    ip: list[ProtocolPort] = field(default_factory=list)
    app: dict[str, list[Any]] | None = None
    via: list[str] = field(default_factory=list)


@dataclass
class NodeAttr:
    target: list[Alias]
    attr: list[str]
    ip_pool: list[IPNetwork]


@dataclass
class SSHRule:
    action: str
    src: list[Alias]
    dst: list[Alias]
    users: list[str]
    check_period: float | None = None  # seconds; None = unset
    check_always: bool = False
    accept_env: list[str] = field(default_factory=list)
    has_check_period: bool = False


@dataclass
class PolicyTestEntry:
    src: str
    proto: str
    accept: list[str]
    deny: list[str]


@dataclass
class SSHTestEntry:
    src: Alias | None
    dst: list[Alias]
    accept: list[str]
    deny: list[str]
    check: list[str]


@dataclass
class Policy:
    groups: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, IPNetwork] = field(default_factory=dict)
    tag_owners: dict[str, list[Alias]] = field(default_factory=dict)
    acls: list[ACL] | None = None
    grants: list[Grant] | None = None
    node_attrs: list[NodeAttr] = field(default_factory=list)
    auto_approve_routes: dict[IPNetwork, list[Alias]] = field(default_factory=dict)
    auto_approve_exit: list[Alias] = field(default_factory=list)
    ssh: list[SSHRule] = field(default_factory=list)
    tests: list[PolicyTestEntry] = field(default_factory=list)
    ssh_tests: list[SSHTestEntry] = field(default_factory=list)
    randomize_client_port: bool = False

    @property
    def allow_all(self) -> bool:
        """No acls and no grants at all (absent, not empty) means allow-all."""
        return self.acls is None and self.grants is None

    def all_grants(self) -> list[Grant]:
        """Grants followed by the ACLs rewritten as grants (Headscale's order)."""
        out = list(self.grants or [])
        for acl in self.acls or []:
            out.extend(acl_to_grants(acl))
        return out


def acl_to_grants(acl: ACL) -> list[Grant]:
    # autogroup:self destinations go last when the rule mixes them with other kinds.
    has_non_ag = any(d.alias.kind != "autogroup" for d in acl.dst)
    if has_non_ag:
        ordered = [d for d in acl.dst if d.alias.text != "autogroup:self"] + [
            d for d in acl.dst if d.alias.text == "autogroup:self"
        ]
    else:
        ordered = list(acl.dst)
    return [
        Grant(src=acl.src, dst=[d.alias], ip=[ProtocolPort(acl.proto, d.ports)]) for d in ordered
    ]
