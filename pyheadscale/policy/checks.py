"""Evaluation of a policy's embedded `tests` block against the compiled global filter."""

from __future__ import annotations

from typing import Any

from pyheadscale.gotext import goquote
from pyheadscale.policy.compile import Resolver
from pyheadscale.policy.ipset import IPSet, parse_wire
from pyheadscale.policy.model import (
    PROTOCOLS,
    Policy,
    PolicyTestEntry,
    PortRange,
    parse_alias,
    parse_alias_with_ports,
    protocol_numbers,
)

_DEFAULT_PROTOS = [PROTOCOLS["tcp"], PROTOCOLS["udp"], PROTOCOLS["icmp"], PROTOCOLS["ipv6-icmp"]]


def run_policy_tests(pol: Policy, rules: list[dict[str, Any]], res: Resolver) -> list[str]:
    """Returns one line per failed assertion (empty = every test passed)."""
    failures: list[str] = []
    for i, t in enumerate(pol.tests):
        failures.extend(f"tests[{i}] {t.src}: {e}" for e in _run_one(t, rules, res))
    return failures


def _run_one(t: PolicyTestEntry, rules: list[dict[str, Any]], res: Resolver) -> list[str]:
    try:
        src_alias = parse_alias(t.src)
    except ValueError as e:
        return [f"failed to resolve source {goquote(t.src)}: invalid alias: {e}"]
    src = res.resolve(src_alias)
    if src is None:
        return [f"failed to resolve source {goquote(t.src)}"]
    if not src:
        return [f"source {goquote(t.src)} resolved to no IP addresses"]
    if src_alias.kind == "user" and not res.find_users(src_alias.text):
        return [f"failed to resolve source {goquote(t.src)}: user not found"]
    errs = []
    for dsts, want in ((t.accept, True), (t.deny, False)):
        for dst in dsts:
            try:
                allowed = _reachable(src, dst, t.proto, rules, res)
            except ValueError as e:
                errs.append(f"error testing {goquote(dst)}: {e}")
                continue
            if allowed != want:
                errs.append(
                    f"-> {dst}: expected {'ALLOWED' if want else 'DENIED'}, got "
                    f"{'ALLOWED' if allowed else 'DENIED'}"
                )
    return errs


def _reachable(src: IPSet, dst: str, proto: str, rules: list[dict[str, Any]],
               res: Resolver) -> bool:
    awp = parse_alias_with_ports(dst)
    if awp.alias.kind == "user" and not res.find_users(awp.alias.text):
        raise ValueError("resolving destination: user not found")
    ips = res.resolve(awp.alias)
    if ips is None:
        raise ValueError("resolving destination")
    if not ips:
        raise ValueError(f"destination resolved to no IP addresses: {goquote(dst)}")
    dst_prefixes = ips.prefixes()
    protos = protocol_numbers(proto) or _DEFAULT_PROTOS
    return all(_src_reaches(s, dst_prefixes, awp.ports, protos, rules) for s in src.prefixes())


def _src_reaches(
    src: Any,
    dsts: list[Any],
    ports: tuple[PortRange, ...],
    protos: list[int],
    rules: list[dict[str, Any]],
) -> bool:
    for rule in rules:
        if not any(
            (s := parse_wire(x)) is not None and s.overlaps_prefix(src)
            for x in rule.get("SrcIPs") or ()
        ):
            continue
        rp = rule.get("IPProto")
        if rp and not any(p in protos for p in rp):
            continue
        for dp in rule.get("DstPorts") or ():
            s = parse_wire(dp["IP"])
            if s is None or not any(s.overlaps_prefix(d) for d in dsts):
                continue
            first, last = dp["Ports"]["First"], dp["Ports"]["Last"]
            if not ports or any(r.first >= first and r.last <= last for r in ports):
                return True
    return False
