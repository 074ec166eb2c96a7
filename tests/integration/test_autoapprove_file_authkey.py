"""Headscale's TestAutoApproveMultiNetwork, the cases with the policy in file mode and
nodes that join with an auth key (Headscale's
authkey cases): each approver kind (tag, user, group), the network
announced with `tailscale set` after joining or during `tailscale up` (autoapprove_lab.py
says what each case asserts)."""

from __future__ import annotations

import pytest

from tests.integration.autoapprove_lab import KINDS, AutoApproveLab
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration


class Lab(AutoApproveLab):
    MODE = "file"
    WEB = False


lab = shared_world_fixture(Lab, Lab.setup)


@pytest.mark.parametrize("during_up", [False, True], ids=["set-after-up", "during-up"])
@pytest.mark.parametrize("kind", KINDS)
def test_auto_approve_multi_network(lab: Lab, kind: str, during_up: bool) -> None:
    lab.case(kind, during_up)
