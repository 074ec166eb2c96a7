"""The happy paths of the control protocol through the real handlers, in seconds and without
root: the whole server runs in this process on loopback, a Python stand-in for tailscaled
talks Noise + HTTP/2 to it, and the admin acts through /api/v1 on the unix socket as the CLI
does. Registration with a key and through the web flow, the map stream (first map, a new
peer, an endpoint change), and an SSH check held until an admin approves it.

The official clients remain the judges (tests/integration/); these catch a broken handler
before an integration run does.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from pyheadscale.app import Server
from pyheadscale.mapper.encode import decode_frame
from tests.inproc import Machine, running_server, server_config

SSH_CHECK_POLICY = {
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"],
             "users": ["root"], "checkPeriod": "1h"}],
}


@pytest.fixture
async def db_server(tmp_path: Path) -> AsyncIterator[Server]:
    """The whole server with the policy in the database (set through the API)."""
    cfg = server_config(tmp_path / "server", overrides={"policy": {"mode": "database"}})
    async with running_server(cfg) as srv:
        yield srv


async def admin(srv: Server, method: str, path: str,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One /api/v1 call over the server's unix socket (trusted, as the CLI makes it)."""
    conn = aiohttp.UnixConnector(path=srv.cfg.unix_socket)
    async with aiohttp.ClientSession(connector=conn) as http, \
            http.request(method, "http://local" + path, json=body) as r:
        answer: dict[str, Any] = await r.json()
        assert r.status == 200, answer
        return answer


async def next_frame(stream: AsyncIterator[dict[str, Any]], key: str) -> dict[str, Any]:
    """The next map frame that carries `key` (keep-alives and other deltas are skipped),
    within 10 s."""
    async with asyncio.timeout(10):
        async for frame in stream:
            if key in frame:
                return frame
    raise AssertionError(f"map stream ended before a frame with {key}")


def url(srv: Server) -> str:
    return str(srv.cfg.server_url)


async def test_register_with_a_key_and_again_after_a_restart(server: Server) -> None:
    user = await server.tailnet.create_user("alice")
    _, key = await server.tailnet.create_preauth_key(user.id)  # single use
    async with Machine(url(server), "laptop") as m:
        first = await m.register(auth_key=key)
        assert first["MachineAuthorized"] is True and first["NodeKeyExpired"] is False
        assert first["User"]["ID"] == user.id and first["Login"]["Provider"] == "authkey"
        node = server.tailnet.node_by_node_key(m.node_key)
        assert node is not None and node.given_name == "laptop" and node.user_id == user.id
    # tailscaled restarts: same machine, same node key, the now used key presented again.
    again = Machine(url(server), "laptop")
    again.machine_private, again.node_private = m.machine_private, m.node_private
    async with again:
        second = await again.register(auth_key=key)
        assert second["MachineAuthorized"] is True
        assert server.tailnet.node_by_node_key(m.node_key) == server.tailnet.nodes[node.id]
        assert len(server.tailnet.nodes) == 1


# tailcfg.RegisterResponse as Go's encoding/json writes it (Headscale's too): every field,
# zero values included; tailscale-rs's decoder refuses an answer without one.
REGISTER_FIELDS = {"User", "Login", "NodeKeyExpired", "MachineAuthorized", "AuthURL",
                   "NodeKeySignature", "Error"}


async def test_every_register_answer_carries_all_fields(server: Server) -> None:
    user = await server.tailnet.create_user("carol")
    _, key = await server.tailnet.create_preauth_key(user.id)
    async with Machine(url(server), "strict") as m:
        refused = await m.register(auth_key="hskey-auth-000000000000-notakeyatallnotakeyat")
        pending = await m.register()
        done = await m.register(auth_key=key)
    for answer in (refused, pending, done):
        assert set(answer) == REGISTER_FIELDS, answer
        assert {"ID", "DisplayName"} <= set(answer["User"]), answer
        assert {"ID", "Provider", "LoginName", "DisplayName"} <= set(answer["Login"]), answer
    assert refused["Error"] and refused["AuthURL"] == "" and not refused["MachineAuthorized"]
    assert pending["AuthURL"] and pending["Error"] == "" and not pending["MachineAuthorized"]
    assert done["MachineAuthorized"] and done["Error"] == "" and done["AuthURL"] == ""
    assert done["User"]["ID"] == user.id and done["Login"]["LoginName"] == "carol"


async def test_web_login_completed_by_the_admin(server: Server) -> None:
    user = await server.tailnet.create_user("bob")
    async with Machine(url(server), "desk") as m:
        auth_url, follow = await m.start_login()
        assert auth_url.startswith(url(server) + "/register/hskey-authreq-")
        async with aiohttp.ClientSession() as http, http.get(auth_url) as page:
            assert page.status == 200
            assert "headscale auth register --auth-id" in await page.text()
        auth_id = auth_url.rsplit("/", 1)[1]
        done = await admin(server, "POST", "/api/v1/auth/register",
                           {"authId": auth_id, "user": "bob"})
        assert done["node"]["name"] == "desk" and done["node"]["user"]["name"] == "bob"
        answer = await asyncio.wait_for(follow, 10)
        assert answer["MachineAuthorized"] is True and answer["User"]["ID"] == user.id


async def test_two_logins_of_one_machine_two_urls_the_older_completes_the_newer(
        server: Server) -> None:
    """`tailscale up` twice: each login brings a new node key and gets its own URL, and the
    client waits on the newest. Completing the older URL registers the newest request once,
    answers the waiting client, and closes the other URL."""
    await server.tailnet.create_user("dora")
    async with Machine(url(server), "tabs") as m:
        u1, follow1 = await m.start_login()
        follow1.cancel()  # the client gives up the first login for the second
        m.new_node_key()
        u2, follow2 = await m.start_login()
        assert u1 != u2
        async with aiohttp.ClientSession() as http:
            for u in (u1, u2):
                async with http.get(u) as page:
                    assert page.status == 200  # both still valid
        done = await admin(server, "POST", "/api/v1/auth/register",
                           {"authId": u1.rsplit("/", 1)[1], "user": "dora"})
        answer = await asyncio.wait_for(follow2, 10)
        assert answer["MachineAuthorized"] is True
        node = server.tailnet.node_by_node_key(m.node_key)
        assert node is not None and str(node.id) == done["node"]["id"]
        assert len(server.tailnet.nodes) == 1
        async with aiohttp.ClientSession() as http, http.get(u2) as used:
            assert used.status == 404


async def test_a_waiting_login_gets_a_fresh_url_when_its_registration_expires(
        tmp_path: Path) -> None:
    cfg = server_config(tmp_path / "server",
                        overrides={"tuning": {"register_cache_expiration": "1s"}})
    async with running_server(cfg) as srv, Machine(url(srv), "late") as m:
        auth_url, follow = await m.start_login()
        answer = await asyncio.wait_for(follow, 10)  # no sweep needed to answer it
        fresh = answer["AuthURL"]
        assert fresh.startswith(url(srv) + "/register/hskey-authreq-") and fresh != auth_url
        async with aiohttp.ClientSession() as http:
            async with http.get(auth_url) as old:
                assert old.status == 404
            async with http.get(fresh) as page:
                assert page.status == 200


async def test_map_stream_first_map_new_peer_and_endpoint_patch(server: Server) -> None:
    user = await server.tailnet.create_user("carol")
    _, key = await server.tailnet.create_preauth_key(user.id, reusable=True)
    async with Machine(url(server), "alpha") as a, Machine(url(server), "beta") as b:
        await a.register(auth_key=key)
        stream = a.stream_map()
        first = await next_frame(stream, "Node")
        assert first["Node"]["Name"] == "alpha.tailnet.test."
        assert first["Node"]["MachineAuthorized"] is True
        assert first["DERPMap"]["Regions"] and "PacketFilter" in first
        assert "Peers" not in first  # alone: no peers, and never an empty Peers list
        assert server.tailnet.node_by_node_key(a.node_key).online  # type: ignore[union-attr]

        await b.register(auth_key=key)
        joined = await next_frame(stream, "PeersChanged")
        assert [p["Name"] for p in joined["PeersChanged"]] == ["beta.tailnet.test."]
        beta_id = joined["PeersChanged"][0]["ID"]

        # beta reports a new endpoint in a lite update (no disco key: a disco change of an
        # offline peer would be sent as the whole node); alpha hears of it as a patch.
        status, _, _ = await b.conn.request(
            "POST", "/machine/map",
            b.map_request(stream=False, OmitPeers=True, Endpoints=["198.51.100.9:41641"],
                          DiscoKey="discokey:" + "0" * 64))
        assert status == 200
        patch = await next_frame(stream, "PeersChangedPatch")
        assert patch["PeersChangedPatch"] == [{"NodeID": beta_id,
                                               "Endpoints": ["198.51.100.9:41641"]}]
        await stream.aclose()  # type: ignore[attr-defined]


async def test_map_frames_are_plain_json_unless_zstd_is_asked_for(server: Server) -> None:
    # MapRequest.Compress "" (tailscale-rs) gets uncompressed frames, as from Headscale;
    # "zstd" (every official client) compressed ones.
    user = await server.tailnet.create_user("erin")
    _, key = await server.tailnet.create_preauth_key(user.id)
    async with Machine(url(server), "plain") as m:
        await m.register(auth_key=key)
        status, _, one = await m.conn.request("POST", "/machine/map",
                                              m.map_request(stream=False, Compress=""))
        assert status == 200
        (n,) = struct.unpack_from("<I", one)
        assert n == len(one) - 4 and json.loads(one[4:])["Node"]["Name"].startswith("plain.")
        status, _, zst = await m.conn.request("POST", "/machine/map",
                                              m.map_request(stream=False))
        assert status == 200 and zst[4:8] == b"\x28\xb5\x2f\xfd"  # the zstd magic
        assert decode_frame(zst)[0]["Node"]["ID"] == json.loads(one[4:])["Node"]["ID"]

        st = await m.conn.open_stream("POST", "/machine/map", m.map_request(Compress=""))
        assert (await st.response())[0] == 200
        got = b""
        async for chunk in st.chunks():
            got += chunk
            if len(got) >= 4 and len(got) >= 4 + struct.unpack_from("<I", got)[0]:
                break
        (n,) = struct.unpack_from("<I", got)
        assert json.loads(got[4:4 + n])["Node"]["Name"].startswith("plain.")
        st.reset()


async def test_ssh_check_is_held_until_the_admin_approves(db_server: Server) -> None:
    srv = db_server
    await admin(srv, "PUT", "/api/v1/policy", {"policy": json.dumps(SSH_CHECK_POLICY)})
    user = await srv.tailnet.create_user("dave")
    _, key = await srv.tailnet.create_preauth_key(user.id, reusable=True)
    async with Machine(url(srv), "client") as src, Machine(url(srv), "host") as dst:
        await src.register(auth_key=key)
        await dst.register(auth_key=key)
        src_id = srv.tailnet.node_by_node_key(src.node_key).id  # type: ignore[union-attr]
        dst_id = srv.tailnet.node_by_node_key(dst.node_key).id  # type: ignore[union-attr]
        path = f"/machine/ssh/action/{src_id}/to/{dst_id}?local_user=root"

        status, _, body = await dst.conn.request("GET", path)
        assert status == 200, body
        hold = json.loads(body)
        assert "holdAndDelegate" in hold and "accept" not in hold
        # The client fills in the $ variables of the URL, as tailscaled does.
        follow_url = (hold["holdAndDelegate"].replace("$SRC_NODE_ID", str(src_id))
                      .replace("$DST_NODE_ID", str(dst_id)).replace("$LOCAL_USER", "root"))
        follow_path = urlsplit(follow_url)
        auth_id = parse_qs(follow_path.query)["auth_id"][0]
        # The banner links to /auth/<auth_id>; without OIDC that page names the CLI command.
        page_url = f"{url(srv)}/auth/{auth_id}"
        assert page_url in hold["message"]
        async with aiohttp.ClientSession() as http:
            async with http.get(page_url) as r:
                assert r.status == 200
                assert f"headscale auth approve --auth-id {auth_id}" in await r.text()
            for bad, code in (("hskey-authreq-0123456789abcdef01234567", 404),
                              ("not-an-auth-id", 400), ("hskey-authreq-" + "a" * 65, 400)):
                async with http.get(f"{url(srv)}/auth/{bad}") as r:
                    assert r.status == code, (bad, r.status)

        held = asyncio.create_task(dst.conn.request(
            "GET", f"{follow_path.path}?{follow_path.query}"))
        await asyncio.sleep(0.2)
        assert not held.done()  # waits for a person
        await admin(srv, "POST", "/api/v1/auth/approve", {"authId": auth_id})
        status, _, body = await asyncio.wait_for(held, 10)
        assert status == 200 and json.loads(body)["accept"] is True

        # Within the rule's checkPeriod the same pair is let in at once.
        status, _, body = await dst.conn.request("GET", path)
        assert status == 200 and json.loads(body)["accept"] is True
