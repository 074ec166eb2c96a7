"""Policy document model: parsing (from HuJSON), with Headscale 0.29 semantics.

Parsing stops at the first structural problem (as Go's JSON decoder does); validation
(policy/validate.py) then collects every semantic problem. Each message keeps Headscale's
wording (the conformance corpus checks it as a substring) and is prefixed with the JSON path
it concerns, e.g. `acls[2].dst[0]: ...`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyheadscale.durations import go_duration_ns
from pyheadscale.gotext import goquote
from pyheadscale.policy import hujson
from pyheadscale.policy.errors import PolicyError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

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


class _ParseError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


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


def _principal(text: str) -> Alias | None:
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
    principal = _principal(text)
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


# ---------------------------------------------------------------------------- parsing


def _fields(obj: Any, path: str, known: dict[str, str],
            ignore_hash: bool = False) -> dict[str, Any]:
    """Map an object's members onto canonical field names (case-insensitive, as Go's
    MatchCaseInsensitiveNames) and refuse unknown members."""
    if not isinstance(obj, dict):
        raise _ParseError(path, f"cannot unmarshal {_jtype(obj)} into an object")
    out: dict[str, Any] = {}
    lower = {k.lower(): v for k, v in known.items()}
    for key, value in obj.items():
        if ignore_hash and key.startswith("#"):
            continue
        canon = known.get(key) or lower.get(key.lower())
        if canon is None:
            raise _ParseError(f"{path}.{key}" if path else key, f"unknown field {goquote(key)}")
        if canon in out:
            raise _ParseError(f"{path}.{key}", f"duplicate field {goquote(key)}")
        out[canon] = value
    return out


def _jtype(v: Any) -> str:
    """The JSON kind of a decoded value, as encoding/json names it in unmarshal errors."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


# The Go type encoding/json decodes each JSON kind into (interface{} targets), as %T prints it.
_GO_TYPES = {
    "null": "<nil>", "boolean": "bool", "number": "float64", "string": "string",
    "array": "[]interface {}", "object": "map[string]interface {}",
}


def _gotype(v: Any) -> str:
    return _GO_TYPES[_jtype(v)]


def _list(v: Any, path: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _ParseError(path, f"cannot unmarshal {_jtype(v)} into an array")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _ParseError(path, f"cannot unmarshal {_jtype(v)} into a string")
    return v


def _each(v: Any, path: str, parse: Callable[[str], T]) -> list[T]:
    """Parse every string of a JSON array; a parser's ValueError is reported at its element."""
    out = []
    for i, item in enumerate(_list(v, path)):
        p = f"{path}[{i}]"
        try:
            out.append(parse(_str(item, p)))
        except ValueError as e:
            raise _ParseError(p, str(e)) from None
    return out


def _aliases(v: Any, path: str) -> list[Alias]:
    return _each(v, path, lambda text: parse_alias(text.strip()))


def _parse_groups(v: Any) -> dict[str, list[str]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _ParseError("groups", f"cannot unmarshal {_jtype(v)} into an object")
    for key in v:
        if not key.startswith("group:"):
            raise _ParseError(
                f"groups[{goquote(key)}]", f"group must start with 'group:', got: {goquote(key)}"
            )
    raw: dict[str, list[str]] = {}
    for key, value in v.items():
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise _ParseError(
                        f"groups[{goquote(key)}]",
                        f"invalid group member type: group {goquote(key)} expected string "
                        f"but got {_gotype(item)}",
                    )
            raw[key] = list(value)
        elif isinstance(value, str):
            raise _ParseError(
                f"groups[{goquote(key)}]",
                f"group value must be an array of users: group {goquote(key)} got string: "
                f"{goquote(value)}",
            )
        else:
            raise _ParseError(
                f"groups[{goquote(key)}]",
                f"group value must be an array of users: group {goquote(key)} got {_gotype(value)}",
            )
    for key in sorted(raw, reverse=True):
        for u in raw[key]:
            if u.startswith("group:"):
                raise _ParseError(
                    f"groups[{goquote(key)}]",
                    f"groups[{goquote(key)}]: {goquote(u)}: group members cannot be recursive",
                )
    for key, members in raw.items():
        for u in members:
            if "@" not in u:
                raise _ParseError(
                    f"groups[{goquote(key)}]", f"username must contain @, got: {goquote(u)}"
                )
    return raw


def _parse_hosts(v: Any) -> dict[str, IPNetwork]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _ParseError("hosts", f"cannot unmarshal {_jtype(v)} into an object")
    out = {}
    for key, value in v.items():
        p = f"hosts[{goquote(key)}]"
        value = _str(value, p)
        if "@" in key or ":" in key:
            raise _ParseError(p, f"invalid hostname: {goquote(key)}")
        try:
            out[key] = parse_prefix(value)
        except ValueError:
            raise _ParseError(
                p,
                f"hostname contains invalid IP address: hostname {goquote(key)} address "
                f"{goquote(value)}",
            ) from None
    return out


def _owner(text: str, path: str, what: str) -> Alias:
    principal = _principal(text)
    if principal is None:
        raise _ParseError(path, f"invalid {what} format: {goquote(text)}")
    return principal


def _parse_tag_owners(v: Any) -> dict[str, list[Alias]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _ParseError("tagOwners", f"cannot unmarshal {_jtype(v)} into an object")
    out = {}
    for key, value in v.items():
        p = f"tagOwners[{goquote(key)}]"
        err = tag_error(key)
        if err:
            raise _ParseError(p, f"tagOwners[{goquote(key)}]: {err}")
        out[key] = [
            _owner(_str(o, f"{p}[{i}]"), f"{p}[{i}]", "owner")
            for i, o in enumerate(_list(value, p))
        ]
    return out


def _parse_acl(obj: Any, path: str) -> ACL:
    f = _fields(
        obj,
        path,
        {"action": "action", "proto": "proto", "src": "src", "dst": "dst"},
        ignore_hash=True,
    )
    action = ""
    if "action" in f:
        action = _str(f["action"], f"{path}.action")
        if action != "accept":
            raise _ParseError(
                f"{path}.action", f"action={goquote(action)} is not supported: invalid ACL action"
            )
    proto = ""
    if "proto" in f:
        try:
            proto = normalize_protocol(_str(f["proto"], f"{path}.proto"))
        except ValueError as e:
            raise _ParseError(f"{path}.proto", str(e)) from None
    src = _aliases(f.get("src"), f"{path}.src")
    dst = _each(f.get("dst"), f"{path}.dst", parse_alias_with_ports)
    return ACL(action, proto, src, dst)


def _parse_grant(obj: Any, path: str) -> Grant:
    f = _fields(obj, path, {"src": "src", "dst": "dst", "ip": "ip", "app": "app", "via": "via"})
    src = _aliases(f.get("src"), f"{path}.src")
    dst = _aliases(f.get("dst"), f"{path}.dst")
    ips = _each(f.get("ip"), f"{path}.ip", parse_protocol_port)
    app = None
    if f.get("app") is not None:
        raw = f["app"]
        if not isinstance(raw, dict):
            raise _ParseError(f"{path}.app", f"cannot unmarshal {_jtype(raw)} into an object")
        app = {}
        for k, vals in raw.items():
            if vals is not None and not isinstance(vals, list):
                raise _ParseError(f"{path}.app[{goquote(k)}]", "cannot unmarshal into an array")
            app[k] = list(vals or [])
    via = []
    for i, x in enumerate(_list(f.get("via"), f"{path}.via")):
        p = f"{path}.via[{i}]"
        if not isinstance(x, str) or tag_error(x):
            raise _ParseError(p, "via can only be a tag")
        via.append(x)
    return Grant(src, dst, ips, app, via)


def _parse_node_attr(obj: Any, path: str) -> NodeAttr:
    f = _fields(obj, path, {"target": "target", "attr": "attr", "ipPool": "ipPool"})
    target = _aliases(f.get("target"), f"{path}.target")
    attrs = [
        _str(a, f"{path}.attr[{i}]") for i, a in enumerate(_list(f.get("attr"), f"{path}.attr"))
    ]
    pools = []
    for i, x in enumerate(_list(f.get("ipPool"), f"{path}.ipPool")):
        p = f"{path}.ipPool[{i}]"
        try:
            if "/" not in _str(x, p):
                raise ValueError
            pools.append(parse_prefix(x))
        except ValueError:
            raise _ParseError(p, f"{goquote(str(x))}: invalid prefix") from None
    return NodeAttr(target, attrs, pools)


def _parse_ssh(obj: Any, path: str) -> SSHRule:
    f = _fields(
        obj,
        path,
        {
            "action": "action",
            "src": "src",
            "dst": "dst",
            "users": "users",
            "checkPeriod": "checkPeriod",
            "acceptEnv": "acceptEnv",
        },
    )
    action = ""
    if f.get("action") is not None:
        action = _str(f["action"], f"{path}.action").strip()
        if action not in ("", "accept", "check"):
            raise _ParseError(f"{path}.action", f"{goquote(action)} is not a valid action")
    src = _aliases(f.get("src"), f"{path}.src")
    for i, a in enumerate(src):
        if a.kind not in ("user", "group", "tag", "autogroup"):
            raise _ParseError(f"{path}.src[{i}]", f"alias not supported for SSH source: {a.gotype}")
    dst = _aliases(f.get("dst"), f"{path}.dst")
    for i, a in enumerate(dst):
        if a.kind == "wildcard":
            raise _ParseError(
                f"{path}.dst[{i}]",
                "wildcard (*) is not supported as SSH destination; use 'autogroup:member' for "
                "user-owned devices, 'autogroup:tagged' for tagged devices, or specific "
                "tags/users",
            )
        if a.kind not in ("user", "tag", "autogroup", "host"):
            raise _ParseError(
                f"{path}.dst[{i}]", f"alias not supported for SSH destination: {a.gotype}"
            )
    users = [
        _str(u, f"{path}.users[{i}]").strip()
        for i, u in enumerate(_list(f.get("users"), f"{path}.users"))
    ]
    rule = SSHRule(action, src, dst, users)
    if "checkPeriod" in f and f["checkPeriod"] is not None:
        raw = _str(f["checkPeriod"], f"{path}.checkPeriod")
        rule.has_check_period = True
        if raw == "always":
            rule.check_always = True
        else:
            try:
                rule.check_period = go_duration_ns(raw) / 1e9
            except ValueError as e:
                raise _ParseError(f"{path}.checkPeriod", str(e)) from None
    rule.accept_env = [
        _str(e, f"{path}.acceptEnv[{i}]")
        for i, e in enumerate(_list(f.get("acceptEnv"), f"{path}.acceptEnv"))
    ]
    return rule


def _parse_auto_approvers(v: Any) -> tuple[dict[IPNetwork, list[Alias]], list[Alias]]:
    if v is None:
        return {}, []
    f = _fields(v, "autoApprovers", {"routes": "routes", "exitNode": "exitNode"})
    routes: dict[IPNetwork, list[Alias]] = {}
    raw_routes = f.get("routes")
    if raw_routes is not None:
        if not isinstance(raw_routes, dict):
            raise _ParseError("autoApprovers.routes", "cannot unmarshal into an object")
        for key, approvers in raw_routes.items():
            p = f"autoApprovers.routes[{goquote(key)}]"
            try:
                if "/" not in key:
                    raise ValueError
                net = parse_prefix(key)
            except ValueError:
                raise _ParseError(p, f"netip.ParsePrefix({goquote(key)}): invalid prefix") from None
            routes[net] = [
                _owner(_str(a, f"{p}[{i}]"), f"{p}[{i}]", "auto approver")
                for i, a in enumerate(_list(approvers, p))
            ]
    exit_ = [
        _owner(
            _str(a, f"autoApprovers.exitNode[{i}]"), f"autoApprovers.exitNode[{i}]", "auto approver"
        )
        for i, a in enumerate(_list(f.get("exitNode"), "autoApprovers.exitNode"))
    ]
    return routes, exit_


def _parse_test(obj: Any, path: str) -> PolicyTestEntry:
    f = _fields(obj, path, {"src": "src", "proto": "proto", "accept": "accept", "deny": "deny"})
    proto = ""
    if f.get("proto") is not None:
        try:
            proto = normalize_protocol(_str(f["proto"], f"{path}.proto"))
        except ValueError as e:
            raise _ParseError(f"{path}.proto", str(e)) from None
    src = _str(f["src"], f"{path}.src") if f.get("src") is not None else ""
    accept = [_str(x, f"{path}.accept[{i}]") for i, x in enumerate(_list(f.get("accept"), path))]
    deny = [_str(x, f"{path}.deny[{i}]") for i, x in enumerate(_list(f.get("deny"), path))]
    return PolicyTestEntry(src, proto, accept, deny)


def _parse_ssh_test(obj: Any, path: str) -> SSHTestEntry:
    f = _fields(
        obj,
        path,
        {"src": "src", "dst": "dst", "accept": "accept", "deny": "deny", "check": "check"},
    )
    src_text = _str(f["src"], f"{path}.src").strip() if f.get("src") is not None else ""
    src = None
    if src_text:
        try:
            src = parse_alias(src_text)
        except ValueError as e:
            raise _ParseError(f"{path}.src", str(e)) from None
    dst = _aliases(f.get("dst"), f"{path}.dst")

    def users(key: str) -> list[str]:
        return [
            _str(x, f"{path}.{key}[{i}]").strip()
            for i, x in enumerate(_list(f.get(key), f"{path}.{key}"))
        ]

    return SSHTestEntry(src, dst, users("accept"), users("deny"), users("check"))


_TOP = {
    "groups": "groups",
    "hosts": "hosts",
    "tagOwners": "tagOwners",
    "acls": "acls",
    "grants": "grants",
    "nodeAttrs": "nodeAttrs",
    "autoApprovers": "autoApprovers",
    "ssh": "ssh",
    "tests": "tests",
    "sshTests": "sshTests",
    "randomizeClientPort": "randomizeClientPort",
}


def _build(doc: Any) -> Policy:
    if doc is None:
        return Policy()
    f = _fields(doc, "", _TOP)
    pol = Policy()
    for key, value in f.items():  # document order, like Go's decoder
        if key == "groups":
            pol.groups = _parse_groups(value)
        elif key == "hosts":
            pol.hosts = _parse_hosts(value)
        elif key == "tagOwners":
            pol.tag_owners = _parse_tag_owners(value)
        elif key == "acls":
            if value is not None:
                pol.acls = [_parse_acl(a, f"acls[{i}]") for i, a in enumerate(_list(value, "acls"))]
        elif key == "grants":
            if value is not None:
                pol.grants = [
                    _parse_grant(g, f"grants[{i}]") for i, g in enumerate(_list(value, "grants"))
                ]
        elif key == "nodeAttrs":
            pol.node_attrs = [
                _parse_node_attr(n, f"nodeAttrs[{i}]")
                for i, n in enumerate(_list(value, "nodeAttrs"))
            ]
        elif key == "autoApprovers":
            pol.auto_approve_routes, pol.auto_approve_exit = _parse_auto_approvers(value)
        elif key == "ssh":
            pol.ssh = [_parse_ssh(s, f"ssh[{i}]") for i, s in enumerate(_list(value, "ssh"))]
        elif key == "tests":
            pol.tests = [_parse_test(t, f"tests[{i}]") for i, t in enumerate(_list(value, "tests"))]
        elif key == "sshTests":
            pol.ssh_tests = [
                _parse_ssh_test(t, f"sshTests[{i}]") for i, t in enumerate(_list(value, "sshTests"))
            ]
        elif key == "randomizeClientPort":
            if value is not None and not isinstance(value, bool):
                raise _ParseError("randomizeClientPort", "cannot unmarshal into a boolean")
            pol.randomize_client_port = bool(value)
    return pol


def parse_policy(
    text: str | bytes | None, *, idp_group: Callable[[str], bool] | None = None
) -> Policy | None:
    """Parse and validate a policy document. None/empty input means "no policy" (allow-all).
    Raises PolicyError (HuJSONError for syntax) naming where each problem is.
    idp_group: with IdP groups enabled, tells which undefined `group:` names are accepted."""
    if text is None or (isinstance(text, str | bytes) and len(text.strip()) == 0):
        return None
    doc = hujson.loads(text)
    try:
        pol = _build(doc)
    except _ParseError as e:
        where = f"{e.path}: " if e.path else ""
        raise PolicyError(f"parsing policy: {where}{e.message}") from None
    from pyheadscale.policy.validate import validate  # validate.py imports this module

    errs = validate(pol, idp_group)
    if errs:
        raise PolicyError("; ".join(errs), errs)
    return pol
