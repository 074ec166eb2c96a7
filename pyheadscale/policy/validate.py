"""Policy validation: every semantic problem of a parsed policy, with Headscale 0.29's wording.

Split from model.py (parsing): parsing stops at the first structural problem, validation
then collects all semantic ones. Each message keeps Headscale's wording (the conformance
corpus checks it as a substring) and is prefixed with the JSON path it concerns.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from pyheadscale.durations import format_go_duration_ns
from pyheadscale.gotext import goquote
from pyheadscale.policy.model import (
    AG_DST,
    AG_NODEATTRS,
    AG_SRC,
    AG_SSH_DST,
    AG_SSH_SRC,
    ANY_PORT,
    SSH_CHECK_PERIOD_MAX,
    TAILSCALE_CAP_ALLOWLIST,
    UNSUPPORTED_NODE_ATTRS,
    Alias,
    AliasWithPorts,
    Policy,
    SSHRule,
    parse_alias_with_ports,
)


def validate(pol: Policy, idp_group: Callable[[str], bool] | None = None) -> list[str]:
    errs: list[str] = []

    def group_ok(a: Alias, path: str, prefix: str = "") -> None:
        # idp_group: names IdP groups may take (policy/idpgroups.py); None keeps Headscale's.
        if a.text not in pol.groups and not (idp_group is not None and idp_group(a.text)):
            errs.append(f"{path}: {prefix}group not defined in policy: {goquote(a.text)}")

    def tag_ok(a: Alias | str, path: str, fmt: str = "{e}") -> None:
        t = a.text if isinstance(a, Alias) else a
        if t not in pol.tag_owners:
            errs.append(f"{path}: " + fmt.format(e=f"tag not found: {goquote(t)}", t=goquote(t)))

    def host_ok(a: Alias, path: str) -> None:
        if a.text not in pol.hosts:
            errs.append(f"{path}: host not defined in policy: {goquote(a.text)}")

    internet_dst_only = "autogroup:internet can only be used in ACL destinations"

    def autogroup_ok(
        a: Alias, path: str, allowed: tuple[str, ...], unsupported: str, refused: dict[str, str]
    ) -> None:
        # refused: autogroups with a message of their own; any other outside `allowed` gets
        # Headscale's "<unsupported>: X, can be [...]".
        if a.text in refused:
            errs.append(f"{path}: {refused[a.text]}")
        elif a.text not in allowed:
            errs.append(
                f"{path}: {unsupported}: {goquote(a.text)}, can be [{' '.join(allowed)}]"
            )

    def owner_ok(a: Alias, path: str, tag_fmt: str = "{e}") -> None:
        if a.kind == "group":
            group_ok(a, path)
        elif a.kind == "tag":
            tag_ok(a, path, tag_fmt)

    def check_src(a: Alias, path: str) -> None:
        if a.kind == "host":
            host_ok(a, path)
        elif a.kind == "autogroup":
            autogroup_ok(a, path, AG_SRC, "autogroup not supported for ACL sources", {
                "autogroup:internet": internet_dst_only,
                "autogroup:self": '"autogroup:self" not valid on the src side of a rule',
            })
        else:
            owner_ok(a, path, "src={e}")

    def check_dst(a: Alias, path: str, tag_fmt: str = "{e}") -> None:
        if a.kind == "host":
            host_ok(a, path)
        elif a.kind == "autogroup":
            autogroup_ok(a, path, AG_DST, "autogroup not supported for ACL destinations",
                         {"autogroup:danger-all": "cannot use autogroup:danger-all as a dst"})
        else:
            owner_ok(a, path, tag_fmt)

    self_src_err = "autogroup:self can only be used with users, groups, or supported autogroups"

    def self_dst_ok(srcs: list[Alias], base: str, kinds: tuple[str, ...]) -> None:
        # autogroup:self in a destination needs every source to be a user-like principal.
        for s in srcs:
            if s.kind not in kinds and s.text != "autogroup:member":
                errs.append(f"{base}.src: {self_src_err}")
                break

    for i, acl in enumerate(pol.acls or []):
        base = f"acls[{i}]"
        for j, s in enumerate(acl.src):
            check_src(s, f"{base}.src[{j}]")
        for j, awp in enumerate(acl.dst):
            check_dst(awp.alias, f"{base}.dst[{j}]", "dst={t}: {e}")
        if acl.proto not in ("", "tcp", "udp", "sctp"):
            for awp in acl.dst:
                if any(pr != ANY_PORT for pr in awp.ports):
                    errs.append(
                        f"{base}: protocol does not support specific ports: {goquote(acl.proto)}, "
                        'only "*" is allowed'
                    )
                    break
        if any(d.alias.text == "autogroup:self" for d in acl.dst):
            self_dst_ok(acl.src, base, ("user", "group", "wildcard"))

    for i, rule in enumerate(pol.ssh):
        base = f"ssh[{i}]"
        if rule.action == "":
            errs.append(f"{base}.action: action must be specified")
        if not rule.users:
            errs.append(f"{base}.users: users must be specified")
        for j, u in enumerate(rule.users):
            if u in ("", "*"):
                errs.append(f"{base}.users[{j}]: user {goquote(u)} is not valid")
        for e in rule.accept_env:
            if e == "":
                errs.append(f"{base}.acceptEnv: acceptEnv values cannot be empty")
        for j, s in enumerate(rule.src):
            p = f"{base}.src[{j}]"
            if s.kind == "autogroup":
                autogroup_ok(s, p, AG_SSH_SRC, "autogroup not supported for SSH sources",
                             {"autogroup:internet": internet_dst_only})
            else:
                owner_ok(s, p)
        for j, d in enumerate(rule.dst):
            p = f"{base}.dst[{j}]"
            if d.kind == "autogroup":
                autogroup_ok(d, p, AG_SSH_DST, "autogroup not supported for SSH destinations",
                             {"autogroup:internet": internet_dst_only})
            elif d.kind == "tag":
                tag_ok(d, p)
            elif d.kind == "host":
                errs.append(f"{p}: invalid dst {goquote(d.text)}")
        combo = _ssh_combination_error(rule)
        if combo:
            errs.append(f"{base}: {combo}")
        if rule.has_check_period:
            if rule.action != "check":
                errs.append(f'{base}.checkPeriod: checkPeriod is only valid with action "check"')
            elif not rule.check_always and rule.check_period is not None:
                period = format_go_duration_ns(round(rule.check_period * 1e9))
                if rule.check_period < 0:
                    errs.append(f"{base}.checkPeriod: checkPeriod {period} must be a positive duration")
                elif rule.check_period > SSH_CHECK_PERIOD_MAX:
                    errs.append(f"{base}.checkPeriod: checkPeriod {period} is above the max (168h)")

    for i, g in enumerate(pol.grants or []):
        base = f"grants[{i}]"
        if not g.ip and not g.app:
            errs.append(f"{base}: ip and app can not both be empty")
        for cap in g.app or {}:
            if "://" in cap:
                errs.append(f"{base}.app: capability name must have the form {{domain}}/{{path}}")
            elif cap.startswith("tailscale.com/") and cap not in TAILSCALE_CAP_ALLOWLIST:
                errs.append(f"{base}.app: capability name must not be in the tailscale.com domain")
        if g.app and any(d.text == "autogroup:internet" for d in g.dst):
            errs.append(f"{base}.dst: cannot use app grants with autogroup:internet")
        for j, d in enumerate(g.dst):
            if d.kind == "prefix" and d.prefix is not None and d.prefix.prefixlen == 0:
                errs.append(
                    f"{base}.dst[{j}]: dst {goquote(str(d.prefix))}: to allow all IP addresses, "
                    'use "*" or "autogroup:internet"'
                )
                break
        for j, s in enumerate(g.src):
            check_src(s, f"{base}.src[{j}]")
        for j, d in enumerate(g.dst):
            check_dst(d, f"{base}.dst[{j}]")
        for j, v in enumerate(g.via):
            if v not in pol.tag_owners:
                errs.append(f"{base}.via[{j}]: tag {goquote(v)} not found")
        if any(d.text == "autogroup:self" for d in g.dst):
            self_dst_ok(g.src, base, ("user", "group"))

    for i, na in enumerate(pol.node_attrs):
        base = f"nodeAttrs[{i}]"
        for j, t in enumerate(na.target):
            p = f"{base}.target[{j}]"
            if t.kind == "host":
                host_ok(t, p)
            elif t.kind == "autogroup":
                autogroup_ok(t, p, AG_NODEATTRS,
                             "nodeAttrs target does not support this autogroup", {})
            else:
                owner_ok(t, p)
        for attr in na.attr:
            if attr in UNSUPPORTED_NODE_ATTRS:
                errs.append(
                    f"{base}.attr: nodeAttrs uses a feature headscale does not yet support: "
                    f"{goquote(attr)} tracked in {UNSUPPORTED_NODE_ATTRS[attr]}"
                )
        if na.ip_pool:
            errs.append(
                f"{base}.ipPool: nodeAttrs ipPool requires the IP allocator "
                "(https://github.com/juanfont/headscale/issues/2912)"
            )
        for pool in na.ip_pool:
            cgnat = ipaddress.IPv4Network("100.64.0.0/10")
            if pool.version != 4 or not pool.subnet_of(cgnat):
                errs.append(
                    f"{base}.ipPool: nodeAttrs ipPool must be within 100.64.0.0/10: "
                    f"{goquote(str(pool))}"
                )
                continue
            for reserved in ("100.100.100.0/24", "100.115.92.0/23"):
                if pool.overlaps(ipaddress.IPv4Network(reserved)):
                    errs.append(
                        f"{base}.ipPool: nodeAttrs ipPool must not overlap reserved Tailscale "
                        f"ranges: {goquote(str(pool))} overlaps {goquote(reserved)}"
                    )

    for tag, owners in pol.tag_owners.items():
        for o in owners:
            owner_ok(o, f"tagOwners[{goquote(tag)}]")
    for net, approvers in pol.auto_approve_routes.items():
        for a in approvers:
            owner_ok(a, f"autoApprovers.routes[{goquote(str(net))}]")
    for a in pol.auto_approve_exit:
        owner_ok(a, "autoApprovers.exitNode")

    errs.extend(_validate_tests(pol))
    errs.extend(_validate_ssh_tests(pol))
    return errs


def _ssh_combination_error(rule: SSHRule) -> str | None:
    src_tagged = any(s.kind == "tag" or s.text == "autogroup:tagged" for s in rule.src)
    src_groups = any(s.kind == "group" or s.text == "autogroup:member" for s in rule.src)
    src_users = {s.text for s in rule.src if s.kind == "user"}
    for d in rule.dst:
        if d.kind == "user":
            if src_tagged:
                return (
                    f"tags in SSH source cannot access user-owned devices ({d.text}); use "
                    "autogroup:tagged or specific tags as destinations instead"
                )
            if src_groups or src_users != {d.text}:
                return (
                    "user destination requires source to contain only that same user "
                    f"{goquote(d.text)}; use autogroup:self instead for same-user SSH access"
                )
        elif d.text == "autogroup:self" and src_tagged:
            return (
                "autogroup:self destination requires source to contain only users or groups, "
                "not tags or autogroup:tagged"
            )
        elif d.text == "autogroup:member" and src_tagged:
            return "tags in SSH source cannot access autogroup:member (user-owned devices)"
    return None


def parse_test_destination(text: str) -> AliasWithPorts:
    return parse_alias_with_ports(text)


def _validate_tests(pol: Policy) -> list[str]:
    errs = []
    for i, t in enumerate(pol.tests):
        if not t.accept and not t.deny:
            errs.append(f'test {i}: test entry must have at least one of "accept" or "deny"')
        if t.proto not in ("", "tcp", "udp", "sctp"):
            errs.append(
                f"test {i}: test protocol must be tcp, udp, sctp, or empty: {goquote(t.proto)}"
            )
        for kind, dsts in (("accept", t.accept), ("deny", t.deny)):
            for dst in dsts:
                e = _test_destination_error(pol, dst)
                if e:
                    errs.append(f"test {i}, {kind} {goquote(dst)}: {e}")
    if errs:
        return ["tests: test(s) failed:\n" + "\n".join(errs)]
    return []


def _test_destination_error(pol: Policy, dst: str) -> str | None:
    try:
        awp = parse_alias_with_ports(dst)
    except ValueError as e:
        return str(e)
    if awp.alias.text == "autogroup:internet":
        return "autogroup:internet not valid as a test destination"
    if len(awp.ports) != 1 or awp.ports[0].first != awp.ports[0].last:
        return "test destination port must be a single port"
    if awp.alias.kind == "prefix" and "/" in dst:
        return "test destination must be a single host, not a CIDR range"
    if awp.alias.kind == "host" and awp.alias.text in pol.hosts:
        p = pol.hosts[awp.alias.text]
        if p.prefixlen < p.max_prefixlen:
            return "test destination must be a single host, not a CIDR range"
    return None


def _validate_ssh_tests(pol: Policy) -> list[str]:
    errs = []
    for i, t in enumerate(pol.ssh_tests):
        if t.src is None:
            errs.append(f"sshTest {i}: SSH tests entry must have a non-empty src")
        if not t.dst:
            errs.append(f"sshTest {i}: SSH tests entry must have at least one dst")
        for d in t.dst:
            e = None
            if d.text == "autogroup:internet":
                e = f"SSH tests dst contains disallowed element {goquote(d.text)}"
            elif d.kind == "prefix" and d.prefix is not None:
                if d.prefix.prefixlen < d.prefix.max_prefixlen:
                    e = f"SSH tests dst contains disallowed element {goquote(str(d.prefix))}"
            elif d.kind == "tag" and d.text not in pol.tag_owners:
                e = f"SSH tests dst contains unknown tag {goquote(d.text)}"
            elif d.kind == "host" and d.text in pol.hosts:
                p = pol.hosts[d.text]
                if p.prefixlen < p.max_prefixlen:
                    e = f"SSH tests dst contains disallowed element {goquote(d.text)}"
            if e:
                errs.append(f"sshTest {i}: {e}")
    if errs:
        return ["sshTests: test(s) failed:\n" + "\n".join(errs)]
    return []
