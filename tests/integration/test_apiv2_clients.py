"""/api/v2 driven by Tailscale's official Go API client (tailscale.com/client/tailscale/v2).

tests/apiv2/goclient is a small program on that client; it runs every v2 route once with an
admin API key and again with OAuth clients of different scopes and tags, in the call patterns
of Tailscale's Terraform provider and Kubernetes operator, against a live server on loopback.
This test seeds the server, runs it, and then checks the server's own state.

(The Terraform provider itself cannot be built here: see tests/apiv2/build.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pyheadscale.api.v2.policy import DEFAULT_POLICY
from tests.apiv2.build import ensure_goclient
from tests.unit._apiv2fix import POLICY, v2_env

# Every check the program makes; a check that silently vanished would fail this count.
MIN_CHECKS = 97


async def test_go_client_drives_every_route(tmp_path: Path) -> None:
    binary = await asyncio.to_thread(ensure_goclient)
    async with v2_env(tmp_path) as e:
        device = await e.node(1, "web1")
        doomed = await e.node(2, "doomed")
        ci_box = await e.node(3, "ci-box", tags=["tag:ci"])
        every = await e.client_secret(["all"], ["tag:ci"])
        reader = await e.client_secret(["all:read"], ["tag:ci"])
        operator = await e.client_secret(["auth_keys", "devices:core"], ["tag:k8s-operator"])

        def creds(secret: str) -> dict[str, str]:
            return {"id": secret.split("-")[2], "secret": secret}

        plan = {
            "base": str(e.client.make_url("")).rstrip("/"), "apiKey": e.admin,
            "ownerId": str(e.alice), "device": str(device), "doomed": str(doomed),
            "oauthDevice": str(ci_box), "oauthAll": creds(every),
            "oauthRead": creds(reader), "oauthOperator": creds(operator),
            "policy": POLICY, "defaultAcl": DEFAULT_POLICY,
        }
        proc = await asyncio.create_subprocess_exec(
            str(binary), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(json.dumps(plan).encode()), 300)
        text = out.decode()
        failures = [line for line in text.splitlines() if line.startswith("FAIL")]
        assert not failures and proc.returncode == 0, text
        passed = [line for line in text.splitlines() if line.startswith("PASS")]
        assert len(passed) >= MIN_CHECKS, text

        # The server's own state after the run.
        tn = e.deps.tailnet
        assert doomed not in tn.nodes
        assert tn.nodes[device].tags == ("tag:ci",)
        assert tn.nodes[device].given_name == "apikey-renamed"
        assert tn.nodes[device].approved_routes == ()
        assert tn.nodes[ci_box].given_name == "oauth-renamed"
        assert (await e.deps.policy.get()).data == POLICY
        revoked = [k for k in tn.preauth_keys.values() if k.description == "go-client"]
        assert len(revoked) == 1 and revoked[0].revoked is not None
        minted = [k for k in tn.preauth_keys.values() if k.tags == ("tag:k8s",)]
        assert len(minted) == 1 and minted[0].ephemeral and minted[0].user_id is None
        assert not [k for k in tn.preauth_keys.values() if "tag:prod" in k.tags]
        clients = {c.description for c in e.deps.oauth.list_clients()}
        assert "made by the go client" not in clients and len(clients) == 1
