"""The policy document parser: HuJSON text to a Policy, with Headscale 0.29 semantics.

Parsing stops at the first structural problem (as Go's JSON decoder does); validation
(policy/validate.py) then collects every semantic problem. Each message keeps Headscale's
wording (the conformance corpus checks it as a substring) and is prefixed with the JSON path
it concerns, e.g. `acls[2].dst[0]: ...`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pyheadscale.durations import go_duration_ns
from pyheadscale.gojson import json_kind
from pyheadscale.gotext import goquote
from pyheadscale.policy import hujson
from pyheadscale.policy.errors import PolicyError
from pyheadscale.policy.model import (
    ACL,
    Alias,
    Grant,
    IPNetwork,
    NodeAttr,
    Policy,
    PolicyTestEntry,
    SSHRule,
    SSHTestEntry,
    normalize_protocol,
    parse_alias,
    parse_alias_with_ports,
    parse_prefix,
    parse_principal,
    parse_protocol_port,
    tag_error,
)

T = TypeVar("T")


class _ParseError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _fields(obj: Any, path: str, known: dict[str, str],
            ignore_hash: bool = False) -> dict[str, Any]:
    """Map an object's members onto canonical field names (case-insensitive, as Go's
    MatchCaseInsensitiveNames) and refuse unknown members."""
    if not isinstance(obj, dict):
        raise _ParseError(path, f"cannot unmarshal {json_kind(obj)} into an object")
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


# The Go type encoding/json decodes each JSON kind into (interface{} targets), as %T prints it.
_GO_TYPES = {
    "null": "<nil>", "boolean": "bool", "number": "float64", "string": "string",
    "array": "[]interface {}", "object": "map[string]interface {}",
}


def _gotype(v: Any) -> str:
    return _GO_TYPES[json_kind(v)]


def _list(v: Any, path: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _ParseError(path, f"cannot unmarshal {json_kind(v)} into an array")
    return v


def _object(v: Any, path: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _ParseError(path, f"cannot unmarshal {json_kind(v)} into an object")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _ParseError(path, f"cannot unmarshal {json_kind(v)} into a string")
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
    v = _object(v, "groups")
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
    v = _object(v, "hosts")
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
    principal = parse_principal(text)
    if principal is None:
        raise _ParseError(path, f"invalid {what} format: {goquote(text)}")
    return principal


def _parse_tag_owners(v: Any) -> dict[str, list[Alias]]:
    v = _object(v, "tagOwners")
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
            raise _ParseError(f"{path}.app", f"cannot unmarshal {json_kind(raw)} into an object")
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
