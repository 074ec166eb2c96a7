"""HuJSON policies, edited as text and as data, through the whole policy engine
(PolicyManager: parse, validate, compile for the real tailnet's nodes, run the tests)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from pyheadscale.policy import PolicyError, PolicyManager
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import mutate, mutate_json

CORPUS: list[dict[str, Any]] = [
    {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]},
    {"groups": {"group:eng": ["fuzz@"]},
     "tagOwners": {"tag:web": ["group:eng"], "tag:db": ["tag:web"]},
     "hosts": {"lan": "10.0.0.0/8", "one": "192.0.2.1"},
     "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443", "lan:*"]},
              {"action": "accept", "proto": "udp", "src": ["tag:web"], "dst": ["one:53"]}],
     "tests": [{"src": "fuzz@", "accept": ["tag:web:80"], "deny": ["one:22"]}]},
    {"grants": [{"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]},
                {"src": ["*"], "dst": ["10.1.0.0/16"], "ip": ["tcp:22", "icmp:*"],
                 "via": ["tag:router"]},
                {"src": ["fuzz@"], "dst": ["tag:app"], "app": {"example.com/cap": [{"a": 1}]}}],
     "tagOwners": {"tag:router": ["autogroup:admin"], "tag:app": []}},
    {"ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"],
              "users": ["autogroup:nonroot", "root"], "checkPeriod": "12h"},
             {"action": "accept", "src": ["fuzz@"], "dst": ["tag:web"], "users": ["admin"]}],
     "tagOwners": {"tag:web": ["fuzz@"]},
     "sshTests": [{"src": "fuzz@", "dst": ["tag:web"], "accept": ["admin"]}]},
    {"autoApprovers": {"routes": {"10.0.0.0/8": ["fuzz@"], "::/0": ["tag:exit"]},
                       "exitNode": ["tag:exit"]},
     "tagOwners": {"tag:exit": ["fuzz@"]},
     "nodeAttrs": [{"target": ["*"], "attr": ["funnel", "magicdns"]}],
     "acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"]}]},
]
DECORATIONS = ["// comment\n", "/* block */", ",", "\n", "\t", "\ufeff"]


def render(rng: random.Random, policy: Any) -> bytes:
    """JSON with HuJSON extras: comments, trailing commas, odd whitespace."""
    text = json.dumps(policy, indent=2, ensure_ascii=False)
    if rng.random() < 0.5:
        lines = text.split("\n")
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(lines))
            lines[i] = lines[i] + rng.choice(DECORATIONS[:2])
        text = "\n".join(lines)
    if rng.random() < 0.3:
        text = text.replace("]\n", ",]\n", 1).replace("}\n", ",}\n", 1)
    return text.encode("utf-8", "surrogatepass")


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("policy", part)
    tn = ctx.server.tailnet
    users, nodes = list(tn.users.values()), list(tn.nodes.values())
    for i in range(n):
        base = rng.choice(CORPUS)
        pol = mutate_json(rng, base) if rng.random() < 0.7 else base
        text = render(rng, pol)
        if rng.random() < 0.4:
            text = mutate(rng, text)
        try:
            pm = PolicyManager(text, users, nodes, server_url=ctx.url, run_tests=True)
            for node in nodes[:3]:  # what the mapper asks of it for each viewer
                pm.packet_filter(node)
                pm.peers(node)
                pm.ssh_policy(node)
                pm.node_capmap(node)
                pm.auto_approved_routes(node)
        except PolicyError:
            pass
        except Exception as e:  # noqa: BLE001 (anything else out of the policy engine)
            ctx.fail("policy", i, f"{type(e).__name__}: {e}"[:500] + f" | {text[:300]!r}")
        if i % 100 == 0:
            await asyncio.sleep(0)
    return n
