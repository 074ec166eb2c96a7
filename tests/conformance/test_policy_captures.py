"""Policy engine and mapper vs. the hosted control plane's recorded behaviour.

Every capture under PYHEADSCALE_POLICY_CAPTURES (see data.py) is evaluated per its README's
comparison rules: refusals (with the error text as a substring), and for accepted policies
each captured node's full map as the server builds it (policy engine, primary-route
election and mapper together) against what the node was sent: packet filter (ordered), SSH
policy, the set of visible peers, its own and every peer's Addresses, AllowedIPs and
PrimaryRoutes (per viewer: which routes it may use, which router is primary, exit routes),
and CapMap (policy-only level, self and peers).

Every file that does not pass must be listed in KNOWN_DEVIATIONS with the reason; the test
fails on an unlisted failure and on a listed file that now passes. Every category must pass
all of its scenarios without a `deviation` code in index.json (those record hosted-plane
behaviour Headscale deliberately does not follow).
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pyheadscale.mapper import MapContext, full_map, to_plain
from pyheadscale.policy import PolicyError, PolicyManager
from pyheadscale.state.model import Node, User
from pyheadscale.state.routes import PrimaryRoutes
from tests.conformance.data import conformance_dir

CAPTURES = conformance_dir("PYHEADSCALE_POLICY_CAPTURES", "policy")
MIN_PASS_RATE = 1.0
SERVER_URL = "https://unused"
# The hosted tailnet's associated e-mail domain (the passkey domain was anonymised to it).
TAILNET_DOMAINS = {"example.com"}

# Keys describing tailnet state outside the policy engine (README, "policy-only" level).
_STATE_CAPS = {
    "https://tailscale.com/cap/is-admin",
    "https://tailscale.com/cap/is-owner",
    "https://tailscale.com/cap/tailnet-lock",
    "service-host",
    "store-appc-routes",
    "https://tailscale.com/cap/warn-funnel-no-https",
    "tailnet-display-name",
    "tailnet.maxKeyDuration",
    "native-ipv4",
    "probe-udp-lifetime",
    "ssh-behavior-v1",
    "ssh-env-vars",
}

_FUNNEL = "deviation funnel: hosted plane accepts the funnel attribute; Headscale refuses it"
_IPPOOL = "deviation ippool: ipPool needs the IP allocator; Headscale refuses it"
_ROLES = "deviation user-roles: autogroup:admin/owner need user roles; Headscale refuses them"
KNOWN_DEVIATIONS: dict[str, str] = {
    "nodeattrs-funnel-f1-tag": _FUNNEL,
    "nodeattrs-funnel-f2-user": _FUNNEL,
    "nodeattrs-ippool-g1-admin": _IPPOOL + " (and autogroup:admin)",
    "nodeattrs-ippool-g2-group": _IPPOOL,
    "nodeattrs-target-a10-autogroup-admin": _ROLES,
    "nodeattrs-target-a11-autogroup-owner": _ROLES,
    "ssh-e1": "deviation tailnet-domains: refused as expected, but the anonymiser rewrote the "
    "domain in the policy (EXAMPLE.COM) and not in the recorded message (PASSKEY)",
    "sshtest-malformed-dst-bare-ipv6": "deviation sshtest-bare-ipv6: hosted plane fails a bare "
    "IPv6 sshTests destination that Headscale accepts",
}

_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
# What evaluate() compared, for the printed figures: maps, peer entries, and peer entries
# that carry routes (captured or computed).
COMPARED: Counter[str] = Counter()
DEFAULT_USERS = [
    {"id": 1, "name": "odin", "email": "odin@example.com"},
    {"id": 2, "name": "thor", "email": "thor@example.org"},
    {"id": 3, "name": "freya", "email": "freya@example.com"},
]


# ------------------------------------------------------------------------- setup


def build_topology(topo: dict[str, Any]) -> tuple[list[User], list[Node], dict[str, Node]]:
    raw_users = topo.get("users") or []
    if not raw_users or any(not u.get("email") for u in raw_users):
        raw_users = DEFAULT_USERS
    users = [User(id=u["id"], name=u["name"], email=u.get("email") or "") for u in raw_users]
    by_name = {u.name: u for u in users}
    order = list(topo.get("registration_order") or [])
    order += sorted(n for n in topo["nodes"] if n not in order)
    nodes = []
    by_host: dict[str, Node] = {}
    for idx, name in enumerate(order, start=1):
        d = topo["nodes"][name]
        tags = tuple(d.get("tags") or ())
        owner = by_name.get(d.get("user") or "")
        node = Node(
            id=idx,
            machine_key=idx.to_bytes(32, "big"),
            node_key=idx.to_bytes(32, "big"),
            disco_key=None,
            hostname=d["hostname"],
            given_name=d["hostname"],
            user_id=None if tags or owner is None else owner.id,
            ipv4=ipaddress.IPv4Address(d["ipv4"]) if d.get("ipv4") else None,
            ipv6=ipaddress.IPv6Address(d["ipv6"]) if d.get("ipv6") else None,
            register_method="authkey",
            created_at=_EPOCH,
            updated_at=_EPOCH,
            tags=tags,
            hostinfo={"RoutableIPs": list(d.get("routable_ips") or [])},
            approved_routes=tuple(ipaddress.ip_network(r) for r in d.get("approved_routes") or ()),
            online=True,
        )
        nodes.append(node)
        by_host[name] = node
    return users, nodes, by_host


# ------------------------------------------------------------------------- normalisation


def _canon_json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def norm_rule(r: dict[str, Any]) -> Any:
    caps = []
    for cg in r.get("CapGrant") or []:
        capmap = {
            k: [_canon_json(x) for x in (v or [])] for k, v in (cg.get("CapMap") or {}).items()
        }
        caps.append((tuple(sorted(cg.get("Dsts") or [])), _canon_json(capmap)))
    return (
        tuple(sorted(r.get("SrcIPs") or [])),
        tuple(
            sorted(
                (d["IP"], d["Ports"]["First"], d["Ports"]["Last"]) for d in r.get("DstPorts") or []
            )
        ),
        tuple(sorted(r.get("IPProto") or [])),
        tuple(caps),
    )


def norm_rules(rules: list[dict[str, Any]] | None) -> list[Any]:
    return [norm_rule(r) for r in rules or []]


_ACTION_BOOLS = (
    "accept",
    "reject",
    "allowAgentForwarding",
    "allowLocalPortForwarding",
    "allowRemotePortForwarding",
)


def norm_ssh(pol: dict[str, Any] | None) -> list[Any]:
    out = []
    for r in (pol or {}).get("rules") or []:
        action = dict(r.get("action") or {})
        for b in _ACTION_BOOLS:
            action[b] = bool(action.get(b, False))
        hold = action.get("holdAndDelegate")
        if hold and "/machine/" in hold:
            action["holdAndDelegate"] = hold[hold.index("/machine/") :]
        action = {k: v for k, v in action.items() if v not in (None, "", 0) or k in _ACTION_BOOLS}
        out.append(
            (
                tuple(sorted(p.get("nodeIP", "") for p in r.get("principals") or [])),
                _canon_json(r.get("sshUsers") or {}),
                _canon_json(action),
                tuple(r.get("acceptEnv") or []),
            )
        )
    return out


def norm_capmap(cm: dict[str, Any] | None, check_auto_update: bool) -> dict[str, Any]:
    out = {}
    for k, v in (cm or {}).items():
        if k in _STATE_CAPS or k.startswith("https://tailscale.com/cap/funnel-ports?"):
            continue
        if k == "default-auto-update" and not check_auto_update:
            continue
        out[k] = [_canon_json(x) for x in (v or [])]
    return out


# ------------------------------------------------------------------------- evaluation


def _norm_prefixes(values: list[str] | None, skip: set[str]) -> list[str]:
    return sorted(v for v in values or () if v not in skip)


def _routes_differ(got: dict[str, Any], want: dict[str, Any], skip: set[str]) -> str | None:
    """Which of Addresses / AllowedIPs / PrimaryRoutes differ (multisets of CIDR strings),
    leaving out the route entries in `skip`; None when all agree."""
    for key in ("Addresses", "AllowedIPs", "PrimaryRoutes"):
        g = _norm_prefixes(got.get(key), skip)
        w = _norm_prefixes(want.get(key), skip)
        if g != w:
            return f"{key} {g} != {w}"
    return None


def build_maps(d: dict[str, Any], pm: PolicyManager, nodes: list[Node], users: list[User]
               ) -> dict[int, dict[str, Any]]:
    """Every captured node's full map as the server would send it: every node online, so
    the primary of a subnet route is the earliest registered node serving it."""
    auto_update = (d.get("tailnet") or {}).get("settings", {}).get("devices_auto_updates_on")
    primaries = PrimaryRoutes()
    primaries.compute(nodes)
    ctx = MapContext(policy=pm, primary_routes=primaries.by_node(), taildrop=True,
                     auto_update=bool(auto_update))
    by_host = {n.hostname: n for n in nodes}
    return {
        by_host[name].id: to_plain(full_map(nodes, users, by_host[name], ctx, _EPOCH))
        for name in d["captures"]
    }


def _peer_mismatch(got: dict[str, Any] | None, want: dict[str, Any] | None,
                   skip: set[str]) -> str | None:
    """How one peer entry of a map differs from the captured one (None: it agrees)."""
    if (got is None) != (want is None):
        return "visibility differs (" + ("missing" if got is None else "extra") + ")"
    if got is None or want is None:
        return None
    diff = _routes_differ(got, want, skip)
    if diff:
        return diff
    if norm_capmap(got.get("CapMap"), False) != norm_capmap(want.get("CapMap"), False):
        return "CapMap differs"
    return None


def evaluate(path: Path) -> str | None:
    """None if the capture passes, else a short description of the first mismatch."""
    d = json.loads(path.read_text(encoding="utf-8"))
    users, nodes, by_host = build_topology(d["topology"])
    refused = d["api_response_code"] != 200
    try:
        pm = PolicyManager(
            d["policy"], users, nodes, server_url=SERVER_URL, tailnet_domains=TAILNET_DOMAINS
        )
    except PolicyError as e:
        if not refused:
            return f"refused an accepted policy: {str(e)[:200]}"
        want = d.get("api_error") or ""
        if d["category"] != "nodeattrs" and want and want not in str(e):
            return f"wrong error: want {want!r}, got {str(e)[:200]!r}"
        return None
    if refused:
        return f"accepted a refused policy (want {d.get('api_error')!r})"

    check_au = (d.get("tailnet") or {}).get("settings", {}).get(
        "devices_auto_updates_on") is not None
    names = {n.id: n.hostname for n in nodes}
    worlds = [build_maps(d, pm, nodes, users)]
    # Route approval raced with these captures: the topology says "not approved", some
    # netmaps already carry the route. The raced route entries are left out of the route
    # comparison, and a pair involving a raced node may match the world where the route
    # was already approved (it can make the pair visible); everything else is exact.
    raced: dict[str, set[str]] = {}
    for name in d.get("inconsistent_route_nodes") or ():
        t = d["topology"]["nodes"][name]
        raced[name] = set(t.get("routable_ips") or ()) - set(t.get("approved_routes") or ())
    if raced:
        approved = [
            replace(n, approved_routes=n.approved_routes
                    + tuple(ipaddress.ip_network(r) for r in raced.get(n.hostname, ())))
            for n in nodes
        ]
        pm_raced = PolicyManager(d["policy"], users, approved, server_url=SERVER_URL,
                                 tailnet_domains=TAILNET_DOMAINS)
        worlds.append(build_maps(d, pm_raced, approved, users))
    for name, cap in sorted(d["captures"].items()):
        got = worlds[0][by_host[name].id]
        if norm_rules(got.get("PacketFilter")) != norm_rules(cap.get("packet_filter_rules")):
            return f"{name}: packet filter differs"
        if norm_ssh(got.get("SSHPolicy")) != norm_ssh(cap.get("ssh_policy")):
            return f"{name}: ssh policy differs"
        self_cap = cap.get("self") or {}
        diff = _routes_differ(got["Node"], self_cap, raced.get(name, set()))
        if diff:
            return f"{name}: self {diff}"
        mine = norm_capmap(got["Node"].get("CapMap"), check_au)
        if mine != norm_capmap(self_cap.get("CapMap"), check_au):
            return f"{name}: self CapMap differs"
        want_peers = cap.get("peers") or {}
        seen = [{names[p["ID"]]: p for p in w[by_host[name].id].get("Peers") or ()}
                for w in worlds]
        COMPARED["maps"] += 1
        for peer_name in sorted(set(want_peers) | set(seen[0])):
            COMPARED["peer entries"] += 1
            routed = [x for x in (want_peers.get(peer_name), seen[0].get(peer_name)) if x]
            if any(set(x.get("AllowedIPs") or ()) - set(x.get("Addresses") or ()) for x in routed):
                COMPARED["peer entries with routes"] += 1
            skip = raced.get(peer_name, set()) | raced.get(name, set())
            tries = seen if name in raced or peer_name in raced else seen[:1]
            diffs = [_peer_mismatch(s.get(peer_name), want_peers.get(peer_name), skip)
                     for s in tries]
            if all(diffs):
                return f"{name}: peer {peer_name}: {diffs[0]}"
    return None


def _all_files() -> list[Path]:
    return sorted(CAPTURES.glob("*/*.json"))


def _deviations() -> set[str]:
    """Scenario ids carrying a `deviation` code (Headscale's own suite skips them)."""
    index = json.loads((CAPTURES / "index.json").read_text(encoding="utf-8"))
    return {s["test_id"] for s in index["scenarios"] if s.get("deviation")}


def run_all() -> tuple[dict[str, list[bool]], dict[str, str]]:
    """Per category, pass/fail of every scenario without a deviation code; and every
    failing file (deviations included) with its reason."""
    per_cat: dict[str, list[bool]] = defaultdict(list)
    failures: dict[str, str] = {}
    deviations = _deviations()
    for f in _all_files():
        try:
            reason = evaluate(f)
        except Exception as e:  # a crash is a failure with its reason, not an abort
            reason = f"crash: {type(e).__name__}: {e}"
        if f.stem not in deviations:
            per_cat[f.parent.name].append(reason is None)
        if reason is not None:
            failures[f.stem] = reason
    return per_cat, failures


def test_policy_captures() -> None:
    files = _all_files()
    assert files, f"no capture files under {CAPTURES}"
    per_cat, failures = run_all()
    lines = []
    for cat in sorted(per_cat):
        results = per_cat[cat]
        lines.append(f"{cat:12s} {sum(results):4d}/{len(results):4d}")
    print(
        "\npolicy conformance per category (scenarios without a deviation code):\n"
        + "\n".join(lines)
        + f"\nfailing files (incl. deviations): {len(failures)}"
        + "\ncompared: " + ", ".join(f"{v} {k}" for k, v in sorted(COMPARED.items()))
    )
    unlisted = {k: v for k, v in failures.items() if k not in KNOWN_DEVIATIONS}
    now_passing = sorted(k for k in KNOWN_DEVIATIONS if k not in failures)
    low = [cat for cat, r in per_cat.items() if sum(r) / len(r) < MIN_PASS_RATE]
    problems = []
    if unlisted:
        problems.append(
            "unlisted failures:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(unlisted.items()))
        )
    if now_passing:
        problems.append(f"listed deviations that now pass (remove them): {now_passing}")
    if low:
        problems.append(f"categories below {MIN_PASS_RATE:.0%}: {sorted(low)}")
    if problems:
        pytest.fail("\n".join(problems))


if __name__ == "__main__":
    cats, fails = run_all()
    for c in sorted(cats):
        print(c, sum(cats[c]), "/", len(cats[c]))
    for k, v in sorted(fails.items()):
        print(f"{k}: {v}")
    print("compared:", dict(COMPARED))
