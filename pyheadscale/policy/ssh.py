"""Tailscale SSH: per-node SSHPolicy compilation and `sshTests` evaluation (Headscale 0.29)."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from pyheadscale.gotext import goquote
from pyheadscale.policy.compile import NodeInfo, Resolver
from pyheadscale.policy.ipset import IPSet
from pyheadscale.policy.model import (
    SSH_CHECK_PERIOD_DEFAULT,
    Policy,
    SSHRule,
    SSHTestEntry,
)

ACCEPT_ACTION = {
    "accept": True,
    "allowAgentForwarding": True,
    "allowLocalPortForwarding": True,
    "allowRemotePortForwarding": True,
}
CHECK_PATH = "/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"


def localpart_domain(user: str) -> str | None:
    """Domain of a canonical `localpart:*@<domain>` entry, else None."""
    if not user.startswith("localpart:"):
        return None
    pattern = user[len("localpart:") :]
    local, at, domain = pattern.rpartition("@")
    if not at or local != "*" or not domain:
        return None
    return domain


def _principals(ipset: IPSet) -> list[dict[str, str]]:
    return [{"nodeIP": str(a)} for a in ipset.addresses()]


def compile_ssh_policy(
    pol: Policy | None, res: Resolver, node: NodeInfo, base_url: str = ""
) -> dict[str, Any] | None:
    if pol is None or not pol.ssh:
        return None
    rules: list[dict[str, Any]] = []
    for rule in pol.ssh:
        rules.extend(_compile_rule(rule, res, node, base_url))
    # Check rules first (stable), so a check is never shadowed by an accept.
    rules.sort(key=lambda r: 0 if "holdAndDelegate" in r["action"] else 1)
    return {"rules": rules}


class _PreparedRule:
    """The node-independent part of one SSH rule, computed once per snapshot: resolving
    sources means a pass over every node, which per viewer would make all maps O(nodes^2)."""

    __slots__ = ("self_dst", "other", "src", "action", "users", "localparts", "lp_by_user",
                 "by_user", "uids", "tagged", "accept_env", "dest")

    def __init__(self, rule: SSHRule, res: Resolver, base_url: str) -> None:
        self.self_dst = any(d.text == "autogroup:self" for d in rule.dst)
        self.other = [d for d in rule.dst if d.text != "autogroup:self"]
        self.src = res.resolve_all(rule.src)
        if rule.action == "accept":
            self.action: dict[str, Any] = dict(ACCEPT_ACTION)
        else:
            self.action = {"holdAndDelegate": base_url + CHECK_PATH}
        users: dict[str, str] = {}
        if "autogroup:nonroot" in rule.users:
            users["*"] = "="
        users["root"] = "root" if "root" in rule.users else ""
        for u in rule.users:
            if u not in ("root", "autogroup:nonroot") and localpart_domain(u) is None:
                users[u] = u
        self.users = users
        self.localparts = [d for u in rule.users if (d := localpart_domain(u)) is not None]
        self.lp_by_user: dict[int, str] = {}
        for domain in self.localparts:
            for user in res.users:
                if not user.email or "@" not in user.email:
                    continue
                local, _, dom = user.email.rpartition("@")
                if dom.lower() == domain.lower():
                    self.lp_by_user[user.id] = local
        # Group the source nodes by owner; tagged nodes each contribute once per tag.
        user_sets: dict[int, list[IPSet]] = {}
        self.tagged: list[dict[str, str]] = []
        if self.src:
            for n in res.nodes:
                if not self.src.contains_any(n.ips):
                    continue
                if n.is_tagged:
                    for _ in n.tags:
                        self.tagged.extend({"nodeIP": str(ip)} for ip in n.ips)
                    continue
                if n.user_id is None:
                    continue
                user_sets.setdefault(n.user_id, []).append(n.ipset)
        self.by_user = {uid: _principals(IPSet.union(sets)) for uid, sets in user_sets.items()}
        self.uids = sorted(uid for uid, p in self.by_user.items() if p)
        self.accept_env = list(rule.accept_env)
        self.dest = res.resolve_all(self.other) if self.other else None


def _prepared(rule: SSHRule, res: Resolver, base_url: str) -> _PreparedRule:
    key = (id(rule), base_url)
    prep = res.ssh_rules.get(key)
    if prep is None:
        prep = res.ssh_rules[key] = _PreparedRule(rule, res, base_url)
    return prep


def _compile_rule(rule: SSHRule, res: Resolver, node: NodeInfo,
                  base_url: str) -> list[dict[str, Any]]:
    p = _prepared(rule, res, base_url)
    if not p.src:
        return []
    users, action, accept_env, by_user = p.users, p.action, p.accept_env, p.by_user
    out: list[dict[str, Any]] = []

    def emit(principals: list[dict[str, str]], uid: int | None) -> None:
        r: dict[str, Any] = {"principals": principals, "sshUsers": users, "action": action}
        if accept_env:
            r["acceptEnv"] = accept_env
        out.append(r)
        if uid is not None and uid in p.lp_by_user:
            lp = p.lp_by_user[uid]
            r2: dict[str, Any] = {"principals": principals, "sshUsers": {lp: lp}, "action": action}
            if accept_env:
                r2["acceptEnv"] = accept_env
            out.append(r2)

    if p.self_dst and not node.is_tagged and node.user_id is not None:
        if by_user.get(node.user_id):
            emit(by_user[node.user_id], node.user_id)
    if p.dest is not None:
        if p.dest.contains_any(node.ips):
            if p.localparts:
                for uid in p.uids:
                    emit(by_user[uid], uid)
                if p.tagged:
                    emit(p.tagged, None)
            else:
                everyone = [x for uid in p.uids for x in by_user[uid]] + p.tagged
                if everyone:
                    emit(everyone, None)
        elif p.localparts and p.src.contains_any(node.ips):
            if node.is_tagged:
                emit(_principals(node.ipset), None)
            elif node.user_id is not None and by_user.get(node.user_id):
                emit(by_user[node.user_id], node.user_id)
    return out


# ---------------------------------------------------------------------------- sshTests


def _user_allows(users: dict[str, str], user: str) -> bool:
    if user == "":
        return False
    if user in users:
        return users[user] != ""
    if user == "root":
        return False
    if "*" in users:
        return users["*"] != ""
    return False


def _reachability(policy: dict[str, Any] | None, addr: str, user: str) -> tuple[bool, bool]:
    if not policy:
        return False, False
    accept = check = False
    for rule in policy["rules"]:
        if not any(p.get("nodeIP") == addr for p in rule["principals"]):
            continue
        if not _user_allows(rule["sshUsers"], user):
            continue
        accept = True
        if "holdAndDelegate" in rule["action"]:
            check = True
            break
    return accept, check


def run_ssh_tests(pol: Policy, res: Resolver) -> list[str]:
    """Evaluate `sshTests`; returns one line per failure (empty = all passed)."""
    failures: list[str] = []
    cache: dict[int, dict[str, Any] | None] = {}

    def policy_for(n: NodeInfo) -> dict[str, Any] | None:
        if n.id not in cache:
            cache[n.id] = compile_ssh_policy(pol, res, n, "")
        return cache[n.id]

    for i, t in enumerate(pol.ssh_tests):
        label = t.src.text if t.src is not None else ""
        failures.extend(f"sshTests[{i}] {label}: {e}" for e in _run_one(t, res, policy_for))
    return failures


def _addresses_to_test(src: IPSet, policy: dict[str, Any] | None) -> list[str]:
    """The addresses of `src` whose verdicts can differ, ascending. A rule matches a source
    only by an exact principal nodeIP, so every address no rule names gets the same verdict:
    test the named ones `src` holds and its lowest unnamed one. Enumerating every address
    instead (what a plain loop would do) never ends for a prefix such as 10.0.0.0/8 or ::/0
    in an admin's sshTests."""
    named = []
    for rule in (policy or {}).get("rules", []):
        for p in rule["principals"]:
            with contextlib.suppress(KeyError, ValueError):
                named.append(ipaddress.ip_address(p["nodeIP"]))
    held = IPSet.of(a for a in named if src.contains(a))
    unnamed = src - held
    first_unnamed = IPSet.of([next(unnamed.addresses())]) if unnamed else IPSet()
    return [str(a) for a in (held | first_unnamed).addresses()]


def _run_one(t: SSHTestEntry, res: Resolver, policy_for: Any) -> list[str]:
    errs: list[str] = []
    if t.src is None:
        return ["source resolved to no IP addresses"]
    src = res.resolve(t.src)
    if src is None:
        return [f"failed to resolve source {goquote(t.src.text)}"]
    if not src:
        return [f"source {goquote(t.src.text)} resolved to no IP addresses"]
    if not (t.accept or t.deny or t.check):
        return ["no accept, deny, or check assertions specified"]
    src_uid = None
    if t.src.kind == "user":
        found = res.find_users(t.src.text)
        src_uid = found[0].id if len(found) == 1 else None
    dst_nodes: list[NodeInfo] = []
    seen: set[int] = set()
    for d in t.dst:
        matched = False
        if d.text == "autogroup:self":
            if src_uid is None:
                errs.append(f"dst alias {goquote(d.text)} resolved to no nodes")
                continue
            cands = [n for n in res.nodes if not n.is_tagged and n.user_id == src_uid]
        else:
            ips = res.resolve(d)
            if ips is None:
                return [f"failed to resolve destinations: {goquote(d.text)}"]
            cands = [n for n in res.nodes if ips.contains_any(n.ips)] if ips else []
        for n in cands:
            matched = True
            if n.id not in seen:
                seen.add(n.id)
                dst_nodes.append(n)
        if not matched:
            errs.append(f"dst alias {goquote(d.text)} resolved to no nodes")
    for users, kind in ((t.accept, "accept"), (t.deny, "deny"), (t.check, "check")):
        for user in users:
            for n in dst_nodes:
                pol = policy_for(n)
                for addr in _addresses_to_test(src, pol):
                    a, c = _reachability(pol, addr, user)
                    if kind == "accept" and not a:
                        errs.append(f"{user} -> {n.node.hostname}: expected ALLOWED, got DENIED")
                        break
                    if kind == "deny" and a:
                        errs.append(f"{user} -> {n.node.hostname}: expected DENIED, got ALLOWED")
                        break
                    if kind == "check" and not c:
                        errs.append(
                            f"{user} -> {n.node.hostname}: expected ALLOWED via check, got "
                            + ("ALLOWED via accept" if a else "DENIED")
                        )
                        break
    return errs


# ---------------------------------------------------------------------------- check mode


def ssh_check_period(pol: Policy | None, res: Resolver, src: NodeInfo,
                     dst: NodeInfo) -> float | None:
    """How long (seconds) an approved check for src -> dst stays valid, from the first check
    rule covering the pair: 0 = every session ("always"), unset = 12h. None when no check
    rule covers it. Read from the policy, never from the client's URL (Headscale's
    SSHCheckParams)."""
    if pol is None:
        return None
    for rule in pol.ssh:
        if rule.action != "check" or not res.resolve_all(rule.src).contains_any(src.ips):
            continue
        for d in rule.dst:
            if d.text == "autogroup:self":
                covered = (not src.is_tagged and not dst.is_tagged
                           and src.user_id is not None and src.user_id == dst.user_id)
            else:
                ips = res.resolve(d)
                covered = bool(ips) and ips is not None and ips.contains_any(dst.ips)
            if covered:
                if rule.check_always:
                    return 0.0
                return rule.check_period if rule.check_period is not None \
                    else SSH_CHECK_PERIOD_DEFAULT
    return None
