"""A policy's `sshTests`: verdicts per source address, and sources that are huge prefixes.

Alice's node n1 (100.64.0.1, fd7a:115c:a1e0::1) may SSH as root to the tagged server n2;
bob's node n3 may not. A test's source is checked address by address; the first address that
fails decides the message.
"""

from __future__ import annotations

import pytest

from pyheadscale.policy import PolicyManager, PolicyTestError
from pyheadscale.state.model import User
from tests.unit._statefix import make_node

USERS = [
    User(id=1, name="alice", email="alice@example.com"),
    User(id=2, name="bob", email="bob@example.com"),
]
NODES = [make_node(1, user=1), make_node(2, tags=("tag:server",)), make_node(3, user=2)]


def failures(action: str, test: str) -> list[str]:
    policy = (
        '{"tagOwners": {"tag:server": ["alice@example.com"]},'
        ' "hosts": {"cgnat": "100.64.0.0/10", "wide": "10.0.0.0/8", "ula": "fc00::/8",'
        '           "alice-v4": "100.64.0.1/32"},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
        f' "ssh": [{{"action": "{action}", "src": ["alice@example.com"],'
        '           "dst": ["tag:server"], "users": ["root"]}],'
        f' "sshTests": [{test}]}}'
    )
    try:
        PolicyManager(policy, USERS, NODES)
    except PolicyTestError as e:
        return e.details
    return []


def test_named_source_passes_and_unnamed_is_denied() -> None:
    assert failures("accept", '{"src": "alice@example.com", "dst": ["tag:server"],'
                              ' "accept": ["root"]}') == []
    assert failures("accept", '{"src": "bob@example.com", "dst": ["tag:server"],'
                              ' "deny": ["root"]}') == []
    got = failures("accept", '{"src": "bob@example.com", "dst": ["tag:server"],'
                             ' "accept": ["root"]}')
    assert got == ["sshTests[0] bob@example.com: root -> n2: expected ALLOWED, got DENIED"]


@pytest.mark.parametrize("host", ["wide", "ula", "cgnat"])
def test_huge_prefix_sources_are_answered(host: str) -> None:
    # /8 and /10 hold millions of addresses, fc00::/8 2^120: enumerating them never ends.
    # None of them holds only allowed addresses, so "accept" fails and, for the ones that
    # hold no allowed address, "deny" passes.
    got = failures("accept", f'{{"src": "{host}", "dst": ["tag:server"], "accept": ["root"]}}')
    assert got == [f"sshTests[0] {host}: root -> n2: expected ALLOWED, got DENIED"]
    denied = failures("accept", f'{{"src": "{host}", "dst": ["tag:server"], "deny": ["root"]}}')
    if host == "cgnat":  # holds alice's 100.64.0.1, which is allowed
        assert denied == ["sshTests[0] cgnat: root -> n2: expected DENIED, got ALLOWED"]
    else:
        assert denied == []


def test_check_message_names_the_first_failing_address() -> None:
    # alice's own address is allowed by an accept rule: "via accept".
    got = failures("accept", '{"src": "alice-v4", "dst": ["tag:server"], "check": ["root"]}')
    assert got == ["sshTests[0] alice-v4: root -> n2: expected ALLOWED via check, got "
                   "ALLOWED via accept"]
    # 100.64.0.0 comes before alice's address and no rule names it: "DENIED".
    got = failures("accept", '{"src": "cgnat", "dst": ["tag:server"], "check": ["root"]}')
    assert got == ["sshTests[0] cgnat: root -> n2: expected ALLOWED via check, got DENIED"]
    # With a check rule, alice's address passes the check.
    assert failures("check", '{"src": "alice-v4", "dst": ["tag:server"],'
                             ' "check": ["root"]}') == []
