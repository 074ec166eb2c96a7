"""IPv6 literals in a policy, judged by official clients over their IPv6 tailnet addresses:
a grant from a tag to one node's IPv6 address, an ACL with a bracketed IPv6 destination and a
port, and a host alias holding an IPv6 address. Each opens exactly what it names: the same
node over IPv4, another port, or another source stays shut (the witness, which every policy
here lets in, proves the listener answers first; see acl_lab.py).

Nodes: c (tag:client), s (tag:server), m (user1), one per pinned version.
"""

from __future__ import annotations

import pytest

from tests.integration.acl_lab import AclLab, acl
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration

OWNERS = {"tag:client": ["user1@"], "tag:server": ["user1@"]}


def _boot(lab: AclLab) -> None:
    lab.boot(["user1"], [("c", "client", OLDEST), ("s", "server", NEWEST), ("m", "user1", MIDDLE)],
             keys={"client": {"user": "user1", "reusable": True, "tags": ["tag:client"]},
                   "server": {"user": "user1", "reusable": True, "tags": ["tag:server"]}},
             policy={"tagOwners": OWNERS, "acls": [acl(["*"], ["*:*"])]})


lab = shared_world_fixture(AclLab, _boot)


def test_grant_from_a_tag_to_an_ipv6_literal(lab: AclLab) -> None:
    s6 = lab.addr("s", "6")
    lab.set_policy({"tagOwners": OWNERS, "grants": [
        {"src": ["tag:client"], "dst": [s6], "ip": ["tcp:80"]}]})
    lab.expect_reach("c", "s", 80, "6")
    lab.expect_denied("c", "s", 80, "4")  # the literal names the IPv6 address only
    lab.expect_denied("c", "s", 22, "6")
    lab.expect_denied("m", "s", 80, "6")  # not a tag:client
    assert lab.filter_allows("s", "c", 80, "6") and not lab.filter_allows("s", "c", 80, "4")


def test_acl_with_a_bracketed_ipv6_destination_and_port(lab: AclLab) -> None:
    s6 = lab.addr("s", "6")
    lab.set_policy({"tagOwners": OWNERS, "acls": [acl(["tag:client"], [f"[{s6}]:22"])]})
    lab.expect_reach("c", "s", 22, "6")
    lab.expect_denied("c", "s", 80, "6")
    lab.expect_denied("c", "s", 22, "4")


def test_ipv6_host_alias_as_source_and_destination(lab: AclLab) -> None:
    lab.set_policy({"tagOwners": OWNERS,
                    "hosts": {"member6": lab.addr("m", "6"), "server6": lab.addr("s", "6")},
                    "acls": [acl(["member6"], ["server6:80"])]})
    lab.expect_reach("m", "s", 80, "6")
    lab.expect_denied("m", "s", 80, "4")  # neither side's IPv4 is named
    lab.expect_denied("c", "s", 80, "6")
