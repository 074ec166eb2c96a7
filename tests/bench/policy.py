"""Policy benchmark: compile 1,000 nodes x a 200-rule policy, then apply one node change.

    python -m tests.bench.policy [--nodes 1000] [--rules 200] [--repeat 3]

Pure and in-process (pyheadscale.policy.PolicyManager). The tailnet is generated: users in
groups, tagged servers, host aliases and subnets; the rules mix users, groups, tags,
autogroup:member, hosts and CIDRs with port lists. Timed (best of --repeat):

* construct: parse + validate + the eager compile in PolicyManager(...);
* materialize: packet_filter() and peers() for every node, i.e. what the first maps need
  (PolicyManager is lazy, so this is where most per-node work happens). By default it is
  timed on --sample viewers spread over the tailnet: the first (which builds the snapshot's
  index) as is, the others scaled to all nodes (printed as an estimate); --full times every
  node;
* update: update(nodes=...) after one node changed (its tags), then the same
  materialization again (update() drops the per-node caches); then one viewer's filter and
  peers right after a change (building the snapshot's index) and the next viewer's; and an
  update() where only an endpoint changed (nothing the policy reads: a no-op);
* routes (route_phase): the routes every node is offered by --routers subnet routers/exit
  nodes under a policy with rules for their prefixes, and the sampled viewers' full maps
  through one shared peer cache (entries encoded vs. sent: one encoding per distinct view).

Headscale is not timed here: it has no in-process API, and `headscale policy check` times
process start + database open + global compiles, without per-node filters. The side-by-side
figures come from tests.bench.control (also run by `make bench`): its policy phase sets a
policy from the same generator (make_policy(), shared by both benchmarks; same rule count and
shape, its own seed and user names) on pyheadscale and on Headscale holding N live map polls, and times the set call, the fan-out of the new packet
filters and one node change; see the printed note. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from tests.bench.build_go import HEADSCALE_VERSION
from tests.bench.common import Table, emit_json, machine_info, rnd

_T = datetime(2026, 1, 1, tzinfo=UTC)
N_USERS = 50
N_GROUPS = 20
N_TAGS = 12
N_HOSTS = 10


def make_users() -> list[Any]:
    from pyheadscale.state.model import User

    return [User(id=i, name=name, email=f"{name}@example.com")
            for i, name in enumerate(user_names(), 1)]


def make_nodes(n: int, rng: random.Random) -> list[Any]:
    from pyheadscale.state.model import Node

    nodes = []
    for i in range(1, n + 1):
        tagged = rng.random() < 0.3
        tags = (f"tag:t{rng.randrange(N_TAGS)}",) if tagged else ()
        v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i)
        v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd7a:115c:a1e0::")) + i)
        nodes.append(Node(
            id=i, machine_key=i.to_bytes(32, "big"), node_key=(i + 1 << 20).to_bytes(32, "big"),
            disco_key=None, hostname=f"node{i}", given_name=f"node{i}",
            user_id=None if tagged else 1 + rng.randrange(N_USERS),
            ipv4=v4, ipv6=v6, register_method="authkey", created_at=_T, updated_at=_T,
            tags=tags,
        ))
    return nodes


def user_names(n: int = N_USERS) -> list[str]:
    """The user names make_users() creates: user1..userN."""
    return [f"user{i}" for i in range(1, n + 1)]


def make_policy(rules: int, rng: random.Random, users: Sequence[str] | None = None) -> str:
    """The generated policy both benchmarks use (tests.bench.control sets it on pyheadscale and
    on Headscale): `rules` ACL rules over `users` (default user1..user50, 50 names; every
    one must exist on a server that validates users, as Headscale 0.29 does), 20 groups of 5
    users, 12 tags owned by groups, 10 host aliases, CIDRs, autogroup:member and port lists.
    Every alias is defined, so Headscale 0.29's validation accepts it."""
    names = list(users) if users is not None else user_names()
    if len(names) != N_USERS:
        raise ValueError(f"make_policy needs {N_USERS} user names, got {len(names)}")
    groups = {f"group:g{g}": [f"{names[u - 1]}@" for u in rng.sample(range(1, N_USERS + 1), 5)]
              for g in range(N_GROUPS)}
    tag_owners = {f"tag:t{t}": [f"group:g{t % N_GROUPS}"] for t in range(N_TAGS)}
    hosts = {f"h{h}": f"100.64.{h}.0/24" for h in range(N_HOSTS)}
    ports = ["*", "22", "80,443", "5432", "8000-8100", "53", "3389", "9100"]

    def alias() -> str:
        k = rng.randrange(6)
        if k == 0:
            return f"{names[rng.randrange(1, N_USERS + 1) - 1]}@"
        if k == 1:
            return f"group:g{rng.randrange(N_GROUPS)}"
        if k == 2:
            return f"tag:t{rng.randrange(N_TAGS)}"
        if k == 3:
            return f"h{rng.randrange(N_HOSTS)}"
        if k == 4:
            return f"100.{64 + rng.randrange(2)}.{rng.randrange(256)}.0/24"
        return "autogroup:member"

    acls = []
    for _ in range(rules):
        src = [alias() for _ in range(rng.randrange(1, 4))]
        dst = [f"{alias()}:{rng.choice(ports)}" for _ in range(rng.randrange(1, 4))]
        acl: dict[str, Any] = {"action": "accept", "src": src, "dst": dst}
        if rng.random() < 0.2:
            acl["proto"] = rng.choice(["tcp", "udp"])
            acl["dst"] = [d if not d.endswith(":*") else d[:-1] + "443" for d in dst]
        acls.append(acl)
    return json.dumps({"groups": groups, "tagOwners": tag_owners, "hosts": hosts,
                       "acls": acls}, indent=1)


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def materialize(pm: Any, nodes: list[Any]) -> tuple[int, int]:
    rules = 0
    peers = 0
    for n in nodes:
        rules += len(pm.packet_filter(n))
        peers += len(pm.peers(n))
    return rules, peers


def route_phase(nodes: list[Any], users: list[Any], text: str, n_routers: int,
                rng: random.Random, viewers: list[Any]) -> dict[str, Any]:
    """Per-viewer routes: every `len(nodes) // n_routers`-th node becomes a router (HA pairs
    share a 10.x.0.0/16 prefix, every fifth router is also an exit node) and the policy
    gains one rule per prefix for a random group. Times the routes every node is offered by
    every router, and the sampled viewers' full maps through one shared peer cache (how many
    entries get encoded for how many sent: viewers with the same view share one)."""
    from pyheadscale.mapper import MapContext, PeerCache, full_map_and_peers
    from pyheadscale.policy import PolicyManager
    from pyheadscale.state.routes import PrimaryRoutes

    step = max(1, len(nodes) // max(1, n_routers))
    routed = list(nodes)
    routers = []
    for k, i in enumerate(range(0, len(nodes), step)[:n_routers]):
        adv = [f"10.{k // 2}.0.0/16"] + (["0.0.0.0/0", "::/0"] if k % 5 == 4 else [])
        routed[i] = replace(nodes[i], online=True, hostinfo={"RoutableIPs": adv},
                            approved_routes=tuple(ipaddress.ip_network(r) for r in adv))
        routers.append(routed[i])
    routed = [n if n.online else replace(n, online=True) for n in routed]
    doc = json.loads(text)
    doc["acls"] += [{"action": "accept", "src": [f"group:g{rng.randrange(N_GROUPS)}"],
                     "dst": [f"10.{k}.0.0/16:*"]} for k in range((n_routers + 1) // 2)]
    pm = PolicyManager(json.dumps(doc), users, routed, run_tests=False)
    primaries = PrimaryRoutes()
    primaries.compute(routed)
    table = primaries.by_node()
    pm.peers(routed[0])  # the snapshot's index, timed in the phases above
    t0 = time.perf_counter()
    views: dict[int, set[tuple[Any, ...]]] = {r.id: set() for r in routers}
    for v in routed:
        for r in routers:
            views[r.id].add(tuple(pm.routes_for_peer(v, r, table.get(r.id, ()))))
    t_all = time.perf_counter() - t0
    ctx = MapContext(policy=pm, primary_routes=table)
    cache = PeerCache()
    by_id = {n.id: n for n in routed}
    t0 = time.perf_counter()
    sent = 0
    for v in viewers:
        _, known = full_map_and_peers(routed, users, by_id[v.id], ctx, _T, cache)
        sent += len(known)
    t_maps = time.perf_counter() - t0
    counts = [len(x) for x in views.values()]
    return {"all_s": t_all, "maps_s": t_maps, "encoded": len(cache), "sent": sent,
            "views_max": max(counts, default=0),
            "views_mean": sum(counts) / max(1, len(counts))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample", type=int, default=50,
                    help="viewers whose filters/peers are timed (then scaled to all nodes)")
    ap.add_argument("--full", action="store_true", help="time every node, no scaling")
    ap.add_argument("--routers", type=int, default=20,
                    help="subnet routers (in HA pairs) and exit nodes for the routes phase")
    args = ap.parse_args(argv)
    from pyheadscale.policy import PolicyManager

    rng = random.Random(args.seed)
    users = make_users()
    nodes = make_nodes(args.nodes, rng)
    text = make_policy(args.rules, rng)
    info = machine_info()
    print(f"policy benchmark: {args.nodes} nodes, {args.rules} ACL rules, {N_USERS} users, "
          f"best of {args.repeat}; {info['cpu']} x{info['nproc']}, Python {info['python']}",
          flush=True)

    def construct() -> Any:
        return PolicyManager(text, users, nodes, run_tests=False)

    t_construct, pm = best_of(args.repeat, construct)

    # Per-node work grows with N x rules (filters) and N^2 (peer sets): time a sample of
    # viewers spread over the tailnet and scale up, unless --full.
    k = args.nodes if args.full else min(args.sample, args.nodes)
    viewers = nodes[:: max(1, args.nodes // k)][:k]
    scale = args.nodes / len(viewers)

    def timed_materialize(vs: list[Any]) -> tuple[float, tuple[int, int]]:
        """Seconds for all nodes (the first viewer, which builds the snapshot's index, plus
        the rest scaled up from the sample) and the sampled counts."""
        t0 = time.perf_counter()
        first = materialize(pm, vs[:1])
        t1 = time.perf_counter()
        rest = materialize(pm, vs[1:])
        t2 = time.perf_counter()
        per_rest = (t2 - t1) / max(1, len(vs) - 1)
        return (t1 - t0) + per_rest * (args.nodes - 1), (first[0] + rest[0], first[1] + rest[1])

    pm.update(nodes=list(reversed(nodes)))  # a new snapshot: drop every per-node cache
    t_mat, (n_rules, n_peers) = timed_materialize(viewers)

    # One node change: a tagged node moves to another tag (policy-relevant for everyone).
    victim = next(i for i, n in enumerate(nodes) if n.tags)
    changed = list(nodes)
    flip = [changed[victim], replace(changed[victim], tags=("tag:t0",)
                                     if changed[victim].tags != ("tag:t0",) else ("tag:t1",))]
    state = {"i": 0}

    def one_update() -> None:
        state["i"] ^= 1
        changed[victim] = flip[state["i"]]
        pm.update(nodes=changed)

    t_update, _ = best_of(args.repeat, one_update)

    t0 = time.perf_counter()
    one_update()
    t_update_full = time.perf_counter() - t0
    t_update_full += timed_materialize([changed[nodes.index(v)] for v in viewers])[0]
    # One viewer's filter + peers right after a change (the first map after it, including
    # the per-snapshot index the first query builds), then another viewer's (index warm).
    one_update()
    t_one_view, _ = best_of(1, lambda: (pm.packet_filter(changed[0]), pm.peers(changed[0])))
    t_next_view, _ = best_of(1, lambda: (pm.packet_filter(changed[1]), pm.peers(changed[1])))
    # An update that changes nothing the policy reads (an endpoint): caches survive.
    moved = [replace(n, endpoints=("192.0.2.1:41641",)) if i == 0 else n
             for i, n in enumerate(changed)]
    t_noop_update, _ = best_of(args.repeat, lambda: pm.update(nodes=moved))
    est = "" if scale == 1 else f" (est. from {len(viewers)} viewers x{scale:g})"
    routes = route_phase(nodes, users, text, args.routers, rng, viewers)

    rows: list[Sequence[Any]] = [
        ["construct PolicyManager (s)", rnd(t_construct)],
        ["filters + peers for all nodes (s)" + est, rnd(t_mat)],
        ["update() after one node change (s)", rnd(t_update)],
        ["one change: update + all nodes again (s)" + est, rnd(t_update_full)],
        ["first viewer's filter + peers after the change (s)", rnd(t_one_view)],
        ["next viewer's filter + peers (ms)", rnd(t_next_view * 1000, 3)],
        ["update() after an endpoint-only change (ms)", rnd(t_noop_update * 1000, 3)],
        [f"filter rules / visible peers, {len(viewers)} viewers", f"{n_rules} / {n_peers}"],
        [f"per-viewer routes, every node x {args.routers} routers (s)", rnd(routes["all_s"])],
        [f"full maps of {len(viewers)} viewers, shared peer cache (s)", rnd(routes["maps_s"])],
        ["peer entries encoded / sent in those maps",
         f"{routes['encoded']} / {routes['sent']}"],
        ["distinct views of a router (max / mean)",
         f"{routes['views_max']} / {rnd(routes['views_mean'], 2)}"],
    ]
    print(Table(["pyheadscale", ""], rows).render())
    print("Headscale side by side: not in this in-process benchmark. `python -m "
          "tests.bench.control` (run by `make bench`, 1,000 nodes by default) sets a policy "
          "from this same generator (its --policy-rules, default 200) on pyheadscale and on "
          "Headscale "
          f"{HEADSCALE_VERSION} while every node holds a map poll, and prints for both servers, "
          "with ratios: the policy set call (validate + compile + store), the time until every "
          "poll has its new PacketFilter, and one node change (tagging a node) until the "
          "viewers' frames reflect it (p50/p99).")
    emit_json({"benchmark": "policy", "nodes": args.nodes, "rules": args.rules,
               "machine": info,
               "pyheadscale": {"construct_s": rnd(t_construct),
                               "materialize_all_s": rnd(t_mat),
                               "update_s": rnd(t_update),
                               "update_and_materialize_all_s": rnd(t_update_full),
                               "one_view_s": rnd(t_one_view),
                               "next_view_s": rnd(t_next_view, 6),
                               "noop_update_s": rnd(t_noop_update, 6),
                               "viewers_timed": len(viewers), "scaled_by": scale,
                               "filter_rules_sampled": n_rules,
                               "visible_peers_sampled": n_peers,
                               "routes": routes},
               "headscale": None,
               "headscale_side_by_side": "tests.bench.control (policy phase)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
