"""IdP groups as policy groups (pyheadscale extension): name mapping, prefix, precedence over
policy-defined groups, validation with the feature on and off, live membership changes, and
the wiring from config through PolicyController and a persisted Tailnet."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyheadscale.auth import oidc
from pyheadscale.config import ConfigError, load_config
from pyheadscale.control.policyctl import PolicyController
from pyheadscale.policy import IdPGroups, PolicyError, PolicyManager
from pyheadscale.policy.idpgroups import policy_group_name, policy_groups
from pyheadscale.state.model import Node, User
from tests.unit._statefix import key, make_cfg, make_node, new_engine, open_tailnet

ANN = User(id=1, name="ann", email="ann@example.com", groups=("Eng Team",))
BOB = User(id=2, name="bob", email="bob@example.com", groups=("/ops",))
CAROL = User(id=3, name="carol", email="carol@example.com")
USERS = [ANN, BOB, CAROL]
TAGS = '"tagOwners": {"tag:server": ["ann@example.com"]}'


def node(i: int, user: int | None = None, tags: tuple[str, ...] = ()) -> Node:
    return make_node(i, user=user, tags=tags)


A, B, C, SRV = node(1, 1), node(2, 2), node(3, 3), node(9, tags=("tag:server",))
NODES = [A, B, C, SRV]


def ips(*nodes: Node) -> set[str]:
    return {str(ip) for n in nodes for ip in (n.ipv4, n.ipv6)}


def acl(src: str, extra: str = "") -> str:
    return ("{" + TAGS + extra + ', "acls": [{"action": "accept", "src": ["' + src
            + '"], "dst": ["tag:server:443"]}]}')


def sources(pm: PolicyManager, target: Node) -> set[str]:
    return {ip for rule in pm.packet_filter(target) for ip in rule["SrcIPs"]}


def reachers(pm: PolicyManager) -> set[int]:
    """IDs of the user nodes that see (and may reach) the server."""
    return {n.id for n in (A, B, C) if pm.can_see(n, SRV)}


# --------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("idp", "prefix", "expected"),
    [
        ("Eng Team", "", "group:eng-team"),
        ("/eng team", "", "group:eng-team"),  # Keycloak full paths
        ("  /A.b_C/  ", "", "group:a.b_c"),
        # Only runs of characters outside [a-z0-9._-] become one "-"; "-" itself stays.
        ("R&D -- Ops!", "", "group:r-d----ops"),
        ("Eng Team", "idp-", "group:idp-eng-team"),
        ("Ünïcode", "", "group:n-code"),
    ],
)
def test_name_mapping(idp: str, prefix: str, expected: str) -> None:
    assert policy_group_name(idp, prefix) == expected
    assert IdPGroups(prefix).name(idp) == expected
    assert IdPGroups(prefix).may_name(expected)


def test_oidc_module_uses_the_same_mapping() -> None:
    assert oidc.policy_group_name is policy_group_name and oidc.policy_groups is policy_groups


def test_groups_without_a_label_are_dropped() -> None:
    u = User(id=7, name="x", groups=("///", "  ", "!!", "Eng"))
    assert IdPGroups().user_groups(u) == {"group:eng"}
    assert IdPGroups().members([u, ANN]) == {"group:eng": {7}, "group:eng-team": {1}}


@pytest.mark.parametrize(
    ("prefix", "name", "ok"),
    [
        ("", "group:eng", True),
        ("", "group:Eng", False),  # the mapping only produces lower case
        ("", "group:-eng", False),
        ("", "group:", False),
        ("idp-", "group:idp-eng", True),
        ("idp-", "group:eng", False),
        ("idp-", "group:idp-", False),
    ],
)
def test_may_name(prefix: str, name: str, ok: bool) -> None:
    assert IdPGroups(prefix).may_name(name) is ok


# --------------------------------------------------------------------- compile


def test_idp_group_members_reach_the_service() -> None:
    pm = PolicyManager(acl("group:eng-team"), USERS, NODES, idp_groups=IdPGroups())
    assert sources(pm, SRV) == ips(A)
    assert reachers(pm) == {A.id}
    assert pm.packet_filter(B) == [] and pm.packet_filter(C) == []


def test_disabled_keeps_headscale_error_for_undefined_groups() -> None:
    with pytest.raises(PolicyError, match='group not defined in policy: "group:eng-team"'):
        PolicyManager(acl("group:eng-team"), USERS, NODES)


def test_prefix_namespaces_idp_groups() -> None:
    pm = PolicyManager(acl("group:idp-ops"), USERS, NODES, idp_groups=IdPGroups("idp-"))
    assert sources(pm, SRV) == ips(B) and reachers(pm) == {B.id}
    # Without the prefix the name is not an IdP group: Headscale's error stays.
    with pytest.raises(PolicyError, match='group not defined in policy: "group:ops"'):
        PolicyManager(acl("group:ops"), USERS, NODES, idp_groups=IdPGroups("idp-"))


def test_policy_defined_group_wins_over_idp_group() -> None:
    groups = ', "groups": {"group:eng-team": ["carol@example.com"]}'
    pm = PolicyManager(acl("group:eng-team", groups), USERS, NODES, idp_groups=IdPGroups())
    # Exactly the listed members: the IdP's member (ann) is not added.
    assert sources(pm, SRV) == ips(C) and reachers(pm) == {C.id}


def test_unknown_idp_group_is_empty_until_someone_joins() -> None:
    pm = PolicyManager(acl("group:contractors"), USERS, NODES, idp_groups=IdPGroups())
    assert sources(pm, SRV) == set() and reachers(pm) == set()
    pm.update(users=[ANN, BOB, replace(CAROL, groups=("Contractors",))])
    assert sources(pm, SRV) == ips(C) and reachers(pm) == {C.id}


def test_moving_a_user_between_groups_changes_access_on_update() -> None:
    pm = PolicyManager(acl("group:eng-team"), USERS, NODES, idp_groups=IdPGroups())
    assert reachers(pm) == {A.id}
    pm.update(users=[replace(ANN, groups=("ops",)), replace(BOB, groups=("eng team",)), CAROL])
    assert sources(pm, SRV) == ips(B) and reachers(pm) == {B.id}


def test_tagged_nodes_are_not_group_members() -> None:
    # As for policy-defined groups: a group covers its users' untagged nodes only.
    srv2 = node(10, tags=("tag:server",))
    pm = PolicyManager(
        "{" + TAGS + ', "acls": [{"action": "accept", "src": ["group:eng-team"],'
        ' "dst": ["*:*"]}]}', USERS, [*NODES, srv2], idp_groups=IdPGroups(),
    )
    assert sources(pm, SRV) == ips(A)


def test_idp_groups_in_grants_ssh_tag_owners_and_tests() -> None:
    text = (
        '{"tagOwners": {"tag:server": ["group:eng-team"]},'
        ' "grants": [{"src": ["group:eng-team"], "dst": ["tag:server"], "ip": ["tcp:22"]}],'
        ' "ssh": [{"action": "accept", "src": ["group:eng-team"], "dst": ["tag:server"],'
        ' "users": ["root"]}],'
        ' "tests": [{"src": "group:eng-team", "accept": ["tag:server:22"],'
        ' "deny": ["tag:server:80"]}]}'
    )
    pm = PolicyManager(text, USERS, NODES, idp_groups=IdPGroups(), run_tests=True)
    assert sources(pm, SRV) == ips(A) and reachers(pm) == {A.id}
    ssh = pm.ssh_policy(SRV)
    assert ssh is not None
    (rule,) = ssh["rules"]
    assert {p["nodeIP"] for p in rule["principals"]} == ips(A)


# --------------------------------------------------------------------- config


def _config_file(tmp_path: Path, oidc_section: dict[str, Any]) -> Path:
    import yaml

    raw = {
        "server_url": "https://hs.example.net", "listen_addr": "127.0.0.1:8080",
        "noise": {"private_key_path": str(tmp_path / "noise.key")},
        "prefixes": {"v4": "100.64.0.0/10"},
        "database": {"type": "sqlite", "sqlite": {"path": str(tmp_path / "db.sqlite")}},
        "dns": {"magic_dns": False, "override_local_dns": False},
        "oidc": oidc_section,
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_config_keys(tmp_path: Path) -> None:
    cfg = load_config(_config_file(tmp_path, {}), env={})
    assert (cfg.oidc.policy_groups.enabled, cfg.oidc.policy_groups.prefix) == (False, "")
    cfg = load_config(
        _config_file(tmp_path, {"policy_groups": {"enabled": True, "prefix": "idp-"}}), env={}
    )
    assert (cfg.oidc.policy_groups.enabled, cfg.oidc.policy_groups.prefix) == (True, "idp-")
    with pytest.raises(ConfigError, match=r"oidc\.policy_groups\.prefix: must use only"):
        load_config(_config_file(tmp_path, {"policy_groups": {"prefix": "IdP "}}), env={})


# --------------------------------------------------------------------- wiring


async def test_controller_uses_config_and_persisted_groups(tmp_path: Path) -> None:
    cfg = make_cfg(policy={"mode": "database"}, oidc={"policy_groups": {"enabled": True}})
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine, cfg)
    ann = await tn.create_user("ann", email="ann@example.com", groups=["Eng Team"])
    bob = await tn.create_user("bob", email="bob@example.com")
    nodes: dict[str, Node] = {}
    for i, (name, uid, tags) in enumerate(
        [("a", ann.id, ()), ("b", bob.id, ()), ("srv", None, ("tag:server",))], start=1
    ):
        _, full = await tn.create_preauth_key(uid, tags=tags)
        nodes[name] = await tn.register_with_authkey(key(i), key(50 + i), None,
                                                     {"Hostname": name}, key=full)
    swaps: list[int] = []
    ctl = PolicyController(cfg, tn, engine, on_swap=lambda: swaps.append(1))
    await ctl.load()
    await ctl.set(acl("group:eng-team"))
    pm = ctl.manager
    assert pm is not None
    assert sources(pm, nodes["srv"]) == ips(nodes["a"])

    # A login moving users between groups publishes a USER change: recompiled live.
    before = len(swaps)
    await tn.update_user(ann.id, groups=("ops",))
    await tn.update_user(bob.id, groups=["/Eng Team/"])
    assert len(swaps) > before
    assert sources(pm, nodes["srv"]) == ips(nodes["b"])
    assert pm.can_see(nodes["b"], nodes["srv"]) and not pm.can_see(nodes["a"], nodes["srv"])
    await tn.close()

    # After a restart the groups come back from the database and the policy still applies.
    tn2 = await open_tailnet(engine, cfg)
    assert tn2.get_user(bob.id).groups == ("/Eng Team/",)
    assert tn2.get_user(ann.id).groups == ("ops",)
    ctl2 = PolicyController(cfg, tn2, engine, on_swap=lambda: None)
    await ctl2.load()
    assert ctl2.manager is not None
    assert sources(ctl2.manager, tn2.get_node(nodes["srv"].id)) == ips(nodes["b"])
    await tn2.close()

    # With the feature off the same stored policy is refused at load, as Headscale would.
    off = make_cfg(policy={"mode": "database"})
    tn3 = await open_tailnet(engine, off)
    with pytest.raises(PolicyError, match="group not defined in policy"):
        await PolicyController(off, tn3, engine, on_swap=lambda: None).load()
    await tn3.close()
