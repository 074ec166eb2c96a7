"""The cache of address-string ranges behind Matcher.of stays near what compiles use while
nodes churn (sequential allocation gives every new node strings never seen before)."""

import ipaddress

from pyheadscale.policy import compile as policy_compile
from pyheadscale.policy.compile import Matcher

LIVE = 50


def _addr(n: int) -> str:
    return f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('100.64.0.0')) + n)}/32"


def test_cache_does_not_grow_with_churning_addresses() -> None:
    cache = policy_compile._ranges_of_text
    floor = cache._floor
    for step in range(3 * floor):  # each step: the oldest node leaves, a new one joins
        live = [_addr(n) for n in range(step, step + LIVE)]
        m = Matcher.of({"SrcIPs": live,
                        "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]})
        assert m.srcs.contains_prefix(ipaddress.ip_network(live[-1]))
    assert len(cache) <= 2 * (floor + 2 * LIVE) + 8


def test_strings_still_in_use_survive_a_generation() -> None:
    cache = policy_compile._RangesByText(floor=16)
    fixed = [_addr(n) for n in range(10)]
    for step in range(200):
        got = cache.ranges([*fixed, _addr(1000 + step)])
        assert len(got) == 11
    young, old = cache._gens
    assert all(t in young or t in old for t in fixed)
    assert len(cache) <= 2 * (16 + 11) + 2
