"""Policy parsing/validation and PolicyManager behaviour on small hand-built tailnets."""

from __future__ import annotations

import ipaddress

import pytest

from pyheadscale.policy import PolicyError, PolicyManager, PolicyTestError, parse_policy
from pyheadscale.policy.hujson import HuJSONError
from pyheadscale.state.model import Node, User
from tests.unit._statefix import make_node

USERS = [
    User(id=1, name="alice", email="alice@example.com"),
    User(id=2, name="bob", email="bob@example.com"),
]


def node(i: int, user: int | None = None, tags: tuple[str, ...] = (),
         routes: tuple[str, ...] = (), approved: tuple[str, ...] = ()) -> Node:
    return make_node(i, user=user, tags=tags, routes=routes, approved=approved)


TAGS = '"tagOwners": {"tag:server": ["alice@example.com"], "tag:router": ["tag:server"]}'


def refuse(text: str) -> str:
    with pytest.raises(PolicyError) as ei:
        parse_policy(text)
    return str(ei.value)


# --------------------------------------------------------------------- validation


def test_syntax_error_names_line_and_column() -> None:
    with pytest.raises(HuJSONError) as ei:
        parse_policy('{\n  "acls": [\n    {"src": ["*"] "dst": []}\n  ]\n}')
    assert (ei.value.line, ei.value.column) == (3, 19)


def test_unknown_fields_rejected_with_path() -> None:
    assert 'unknown field "aclz"' in refuse('{"aclz": []}')
    msg = refuse('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "bogus": 1}]}')
    assert 'acls[0].bogus: unknown field "bogus"' in msg
    # "#"-prefixed members of an ACL are comments, and names match case-insensitively.
    parse_policy('{"ACLs": [{"#note": "x", "action": "accept", "src": ["*"], "dst": ["*:*"]}]}')


def test_semantic_errors_name_json_path() -> None:
    msg = refuse(
        '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},'
        '{"action": "accept", "src": ["*"], "dst": ["n1:22", "tag:nope:22"]}]}'
    )
    assert 'acls[1].dst[0]: host not defined in policy: "n1"' in msg
    assert 'acls[1].dst[1]: dst="tag:nope": tag not found: "tag:nope"' in msg


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:self"]}]}',
            'dst="autogroup:self": port range "self": invalid first integer',
        ),
        (
            '{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}',
            'action="deny" is not supported',
        ),
        (
            '{"acls": [{"action": "accept", "src": ["tag:x"], "dst": ["autogroup:self:*"]}],'
            ' "tagOwners": {"tag:x": []}}',
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}]}',
            "autogroup:internet can only be used in ACL destinations",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["autogroup:danger-all"], "ip": ["*"]}]}',
            "cannot use autogroup:danger-all as a dst",
        ),
        ('{"grants": [{"src": ["*"], "dst": ["*"]}]}', "ip and app can not both be empty"),
        (
            '{"grants": [{"src": ["*"], "dst": ["0.0.0.0/0"], "ip": ["*"]}]}',
            'dst "0.0.0.0/0": to allow all IP addresses, use "*" or "autogroup:internet"',
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "app": {"tailscale.com/cap/x": [{}]}}]}',
            "capability name must not be in the tailscale.com domain",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["0"]}]}',
            "port range \"0\": first port must be >0, or use '*' for wildcard",
        ),
        (
            '{"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["tag:r"]}]}',
            'tag "tag:r" not found',
        ),
        (
            '{"groups": {"group:a": ["group:b"], "group:b": []}}',
            'groups["group:a"]: "group:b": group members cannot be recursive',
        ),
        ('{"tagOwners": {"tag:1x": []}}', "tag names must start with a letter, after 'tag:'"),
        (
            '{"ssh": [{"action": "Accept", "src": ["autogroup:member"],'
            ' "dst": ["autogroup:self"], "users": ["root"]}]}',
            '"Accept" is not a valid action',
        ),
        (
            '{"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"]}]}',
            "users must be specified",
        ),
        (
            '{"ssh": [{"action": "check", "checkPeriod": "-1m", "src": ["autogroup:member"],'
            ' "dst": ["autogroup:self"], "users": ["root"]}]}',
            "checkPeriod -1m0s must be a positive duration",
        ),
        (
            '{"ssh": [{"action": "check", "checkPeriod": "abc", "src": ["autogroup:member"],'
            ' "dst": ["autogroup:self"], "users": ["root"]}]}',
            'time: invalid duration "abc"',
        ),
        (
            '{"hosts": {"srv": "100.64.0.1"}, "ssh": [{"action": "accept",'
            ' "src": ["autogroup:member"], "dst": ["srv"], "users": ["root"]}]}',
            'invalid dst "srv"',
        ),
        (
            '{"nodeAttrs": [{"target": ["autogroup:admin"], "attr": ["x"]}]}',
            'invalid autogroup: got "autogroup:admin"',
        ),
        (
            '{"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}',
            "nodeAttrs uses a feature headscale does not yet support",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["alice"], "dst": ["*:*"]}]}',
            'host not defined in policy: "alice"',
        ),
        (
            '{"sshTests": [{"src": "alice@example.com", "dst": ["100.64.0.0/24"],'
            ' "accept": ["root"]}]}',
            'SSH tests dst contains disallowed element "100.64.0.0/24"',
        ),
    ],
)
def test_headscale_error_texts(policy: str, expected: str) -> None:
    assert expected in refuse(policy)


def test_tags_may_own_tags_and_user_tokens() -> None:
    pol = parse_policy("{" + TAGS + ', "groups": {"group:g": ["alice@", "bob@example.com"]}}')
    assert pol is not None and [o.text for o in pol.tag_owners["tag:router"]] == ["tag:server"]


def test_ambiguous_user_token_refused() -> None:
    users = [*USERS, User(id=3, name="alice", email="other@example.org")]
    with pytest.raises(PolicyError, match="multiple users found"):
        PolicyManager(
            '{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:*"]}]}', users, []
        )


# --------------------------------------------------------------------- compile


def test_no_policy_is_allow_all() -> None:
    nodes = [node(1, 1), node(2, 2)]
    pm = PolicyManager(None, USERS, nodes)
    assert pm.packet_filter(nodes[0]) == [
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
    ]
    assert pm.can_see(nodes[0], nodes[1]) and pm.ssh_policy(nodes[0]) is None


def test_empty_grants_deny_all() -> None:
    nodes = [node(1, 1), node(2, 2)]
    pm = PolicyManager('{"grants": []}', USERS, nodes)
    assert pm.packet_filter(nodes[0]) == [] and not pm.can_see(nodes[0], nodes[1])


def test_filter_is_reduced_and_visibility_symmetric() -> None:
    a, b, srv = node(1, 1), node(2, 2), node(3, tags=("tag:server",))
    pm = PolicyManager(
        "{" + TAGS + ', "acls": [{"action": "accept", "proto": "tcp",'
        ' "src": ["alice@example.com"], "dst": ["tag:server:22,443"]}]}',
        USERS,
        [a, b, srv],
    )
    assert pm.packet_filter(a) == []
    assert pm.packet_filter(srv) == [
        {
            "SrcIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "DstPorts": [
                {"IP": ip, "Ports": {"First": p, "Last": p}}
                for ip in ("100.64.0.3", "fd7a:115c:a1e0::3")
                for p in (22, 443)
            ],
            "IPProto": [6],
        }
    ]
    assert pm.can_see(a, srv) and pm.can_see(srv, a)
    assert not pm.can_see(b, srv) and not pm.can_see(a, b)


def test_autogroup_self_and_update() -> None:
    a1, a2, b = node(1, 1), node(2, 1), node(3, 2)
    text = (
        '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}'
    )
    pm = PolicyManager(text, USERS, [a1, a2, b])
    assert pm.can_see(a1, a2) and not pm.can_see(a1, b)
    b2 = node(4, 2)
    pm.update(nodes=[a1, a2, b, b2])
    assert pm.can_see(b, b2) and not pm.can_see(a1, b2)
    srcs = pm.packet_filter(b2)[0]["SrcIPs"]
    assert srcs == ["100.64.0.3", "100.64.0.4", "fd7a:115c:a1e0::3", "fd7a:115c:a1e0::4"]


def test_ssh_check_policy() -> None:
    a, srv = node(1, 1), node(3, tags=("tag:server",))
    pm = PolicyManager(
        "{" + TAGS + ', "ssh": [{"action": "check", "src": ["alice@example.com"],'
        ' "dst": ["tag:server"], "users": ["autogroup:nonroot", "root"]}]}',
        USERS,
        [a, srv],
        server_url="https://hs.example",
    )
    assert pm.ssh_policy(a) == {"rules": []}
    (rule,) = pm.ssh_policy(srv)["rules"]
    assert rule["sshUsers"] == {"*": "=", "root": "root"}
    assert {p["nodeIP"] for p in rule["principals"]} == {"100.64.0.1", "fd7a:115c:a1e0::1"}
    assert rule["action"]["holdAndDelegate"].startswith("https://hs.example/machine/ssh/action/")


def test_node_attrs_and_auto_approval() -> None:
    r = node(5, tags=("tag:router",), routes=("10.1.0.0/16", "0.0.0.0/0", "::/0"))
    a = node(1, 1)
    pm = PolicyManager(
        "{" + TAGS + ', "nodeAttrs": [{"target": ["tag:router"], "attr": ["magicdns-aaaa"]}],'
        ' "randomizeClientPort": true,'
        ' "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:router"]}}',
        USERS,
        [a, r],
    )
    assert pm.node_capmap(r) == {"randomize-client-port": None, "magicdns-aaaa": None}
    assert pm.node_capmap(a) == {"randomize-client-port": None}
    assert [str(x) for x in pm.auto_approved_routes(r)] == ["10.1.0.0/16", "0.0.0.0/0", "::/0"]
    assert not pm.node_can_approve_route(a, ipaddress.ip_network("10.1.0.0/16"))


def test_embedded_tests_refuse_policy() -> None:
    a, srv = node(1, 1), node(3, tags=("tag:server",))
    base = (
        "{" + TAGS + ', "acls": [{"action": "accept", "src": ["alice@example.com"],'
        ' "dst": ["tag:server:22"]}], "tests": [{"src": "alice@example.com", '
    )
    PolicyManager(
        base + '"accept": ["tag:server:22"], "deny": ["tag:server:80"]}]}', USERS, [a, srv]
    )
    with pytest.raises(PolicyTestError, match=r"test\(s\) failed"):
        PolicyManager(base + '"accept": ["tag:server:80"]}]}', USERS, [a, srv])
