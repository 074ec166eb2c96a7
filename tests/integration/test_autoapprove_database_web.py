"""Headscale's TestAutoApproveMultiNetwork, the cases with the policy in database mode and
nodes that join through a web login an admin registers
(Headscale's webauth cases): each approver kind (tag, user, group), the network
announced with `tailscale set` after joining or during `tailscale up` (autoapprove_lab.py
says what each case asserts)."""

from __future__ import annotations

import pytest

from tests.integration.autoapprove_lab import KINDS, AutoApproveLab
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration


class Lab(AutoApproveLab):
    MODE = "database"
    WEB = True


lab = shared_world_fixture(Lab, Lab.setup)


@pytest.mark.parametrize("during_up", [False, True], ids=["set-after-up", "during-up"])
@pytest.mark.parametrize("kind", KINDS)
def test_auto_approve_multi_network(lab: Lab, kind: str, during_up: bool) -> None:
    lab.case(kind, during_up)
