"""A World with a real OpenID provider next to the server (in the server host's namespace)
and the policy set through the CLI, for scenarios whose users log in through OIDC."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.idp import Account, IdPUnavailable, OpenIDProvider
from tests.integration.netns import SERVER_IP
from tests.integration.test_oidc_official import CLIENT_ID, CLIENT_SECRET, IDP_PORT
from tests.integration.world import World


class OIDCWorld(World):
    idp: OpenIDProvider | None = None
    policies = 0

    def start_idp(self, accounts: list[Account], **options: Any) -> OpenIDProvider:
        """The provider the server's `oidc_overrides` point at; a test fails without it."""
        try:
            self.idp = OpenIDProvider(
                self.workdir / "idp", accounts, client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                redirect_uris=[f"https://{SERVER_IP}/oidc/callback"], port=IDP_PORT,
                listen_host=SERVER_IP, **options).start(popen=self.server_host.popen)
        except IdPUnavailable as e:
            pytest.fail(f"OpenID provider unavailable: {e}", pytrace=False)
        return self.idp

    def set_policy(self, policy: dict[str, Any]) -> None:
        """`headscale policy set` (the server runs with policy.mode database)."""
        assert self.server is not None
        self.policies += 1
        path = self.workdir / f"policy-{self.policies}.json"
        path.write_text(json.dumps(policy))
        r = self.server.cli("policy", "set", "-f", str(path))
        assert r.returncode == 0, r.stdout + r.stderr

    def close(self) -> None:
        super().close()
        if self.idp is not None:
            self.idp.stop()
