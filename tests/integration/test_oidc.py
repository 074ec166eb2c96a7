"""OIDC login against a real OpenID provider (oidc-provider under node, see idp.py).

pyheadscale runs in-process on 127.0.0.1; the device is pyheadscale.testclient doing
/machine/register without an auth key (AuthURL, then the Followup long poll); the browser is
an aiohttp client with a cookie jar that drives the provider's login form.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey
from multidict import CIMultiDict
from yarl import URL

from pyheadscale.app import Server
from pyheadscale.config import Config, ConfigError
from pyheadscale.testclient.client import ControlConnection
from tests.inproc import Machine, running_server, server_config
from tests.integration.idp import Account, IdPUnavailable, OpenIDProvider
from tests.netutil import free_port

CLIENT_ID = "pyheadscale"
CLIENT_SECRET = "s3cret-" + secrets.token_hex(8)

ALICE = Account("alice-sub", "alice-pw", email="alice@example.com", name="Alice Liddell",
                preferred_username="alice", picture="https://pics.example.com/alice.png",
                groups=["eng", "ops"])
BOB = Account("bob-sub", "bob-pw", email="bob@other.org", name="Bob", preferred_username="bob",
              groups=["sales"])
CAROL = Account("carol-sub", "carol-pw", email="carol@example.com", email_verified=False,
                name="Carol", preferred_username="carol", groups=["eng"])


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def idp_factory(tmp_path: Path) -> Any:
    started: list[OpenIDProvider] = []

    def make(accounts: list[Account] | None = None, *, port: int | None = None,
             issuer: str | None = None, **kw: Any) -> OpenIDProvider:
        hs_port = kw.pop("hs_port")
        try:
            idp = OpenIDProvider(tmp_path / f"idp{len(started)}", accounts or [ALICE, BOB, CAROL],
                                 client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 redirect_uris=[f"http://127.0.0.1:{hs_port}/oidc/callback"],
                                 port=port, issuer=issuer, **kw).start()
        except IdPUnavailable as e:
            pytest.fail(f"OpenID provider unavailable: {e}", pytrace=False)
        started.append(idp)
        return idp

    yield make
    for idp in started:
        idp.stop()


def oidc_config(tmp_path: Path, port: int, oidc: dict[str, Any]) -> Config:
    return server_config(tmp_path / "hs", port=port, overrides={"oidc": oidc})


@contextlib.asynccontextmanager
async def server_and_device(tmp_path: Path, idp_factory: Any, hostname: str = "dev",
                            ) -> AsyncIterator[tuple[Server, Machine, OpenIDProvider]]:
    """A provider, the server using it, and a device connected to the server."""
    port = free_port()
    idp = idp_factory(hs_port=port)
    async with oidc_server(tmp_path, port, oidc_conf(idp, tmp_path)) as srv, \
            Machine(srv.cfg.server_url, hostname) as dev:
        yield srv, dev, idp


def oidc_server(tmp_path: Path, port: int,
                oidc: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[Server]:
    """The server with this `oidc:` section, running for the `async with` block."""
    return running_server(oidc_config(tmp_path, port, oidc))


def oidc_conf(idp: OpenIDProvider, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    secret = tmp_path / "client_secret"
    secret.write_text(CLIENT_SECRET + "\n")
    return {"issuer": idp.issuer, "client_id": CLIENT_ID, "client_secret_path": str(secret),
            "scope": ["openid", "profile", "email", "groups"], **extra}


# --- the device -----------------------------------------------------------------------------


# --- the browser ----------------------------------------------------------------------------


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(s: aiohttp.ClientSession, auth_url: str, account: Account, *,
                stop_at_callback: bool = False) -> tuple[int, str, URL]:
    """Follow redirects from the AuthURL, sign in on the provider's form, and return the
    page our server answers the callback with (or, with stop_at_callback, the callback URL
    without requesting it)."""
    url = URL(auth_url)
    method, data = "GET", None
    for _ in range(20):
        if stop_at_callback and url.path == "/oidc/callback":
            return 0, "", url
        async with s.request(method, url, data=data, allow_redirects=False) as r:
            text = await r.text()
            if r.status in (302, 303):
                url = r.url.join(URL(r.headers["Location"]))
                method, data = "GET", None
                continue
            m = re.search(r'action="(/interaction/[^"]+/login)"', text)
            if r.status == 200 and m:
                url = r.url.join(URL(m.group(1)))
                method, data = "POST", {"login": account.sub, "password": account.password}
                continue
            return r.status, text, r.url
    raise AssertionError("too many redirects")


def confirm_form(page: str) -> tuple[str, dict[str, str]]:
    action = re.search(r'<form method="POST" action="([^"]+)"', page)
    field = re.search(r'<input type="hidden" name="([^"]+)" value="([^"]+)"', page)
    assert action and field, page
    return action.group(1), {field.group(1): field.group(2)}


async def confirm(s: aiohttp.ClientSession, base: str, page: str) -> tuple[int, str]:
    action, form = confirm_form(page)
    async with s.post(base + action, data=form, allow_redirects=False) as r:
        return r.status, await r.text()


async def full_login(srv: Server, dev: Machine, account: Account) -> dict[str, Any]:
    auth_url, follow = await dev.start_login()
    async with browser() as s:
        status, page, _ = await login(s, auth_url, account)
        assert status == 200, page
        assert "Confirm node registration" in page
        status, text = await confirm(s, srv.cfg.server_url, page)
        assert status == 200, text
    return await asyncio.wait_for(follow, 10)


def users_by_email(srv: Server) -> dict[str, Any]:
    return {u.email: u for u in srv.tailnet.list_users()}


# --- tests ----------------------------------------------------------------------------------


async def test_full_login_confirmation_registers_node(tmp_path: Path, idp_factory: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyheadscale.audit")
    port = free_port()
    # Claims only via UserInfo (the ID token carries just `sub`): exercises the UserInfo path.
    idp = idp_factory(hs_port=port, claims_in_id_token=False)
    conf = oidc_conf(idp, tmp_path, pkce={"enabled": True, "method": "S256"},
                     extra_params={"login_hint": "alice"})
    async with oidc_server(tmp_path, port, conf) as srv, \
            Machine(srv.cfg.server_url, "alice-laptop") as dev:
        auth_url, follow = await dev.start_login()
        assert auth_url.startswith(f"http://127.0.0.1:{port}/register/hskey-authreq-")
        async with browser() as s:
            async with s.get(auth_url, allow_redirects=False) as r:
                assert r.status == 302
                loc = URL(r.headers["Location"])
            assert str(loc.with_query(None)) == idp.issuer + "/auth"
            q = loc.query
            assert q["client_id"] == CLIENT_ID and q["response_type"] == "code"
            assert q["scope"] == "openid profile email groups"
            assert q["redirect_uri"] == f"http://127.0.0.1:{port}/oidc/callback"
            assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
            assert q["login_hint"] == "alice" and q["nonce"] and q["state"]

            status, page, url = await login(s, auth_url, ALICE)
            assert status == 200, page
            assert url.path == "/oidc/callback"
            assert "alice-laptop" in page and "linux" in page
            assert dev.machine_key_short in page
            assert "Alice Liddell" in page
            # Nothing registered until the confirmation is posted.
            assert srv.tailnet.list_nodes() == []
            assert not follow.done()

            # CSRF: the form token without the cookie, and a wrong token, are refused.
            action, form = confirm_form(page)
            async with aiohttp.ClientSession() as other:
                async with other.post(srv.cfg.server_url + action, data=form) as r:
                    assert r.status == 403 and "missing csrf cookie" in await r.text()
            async with s.post(srv.cfg.server_url + action,
                              data={next(iter(form)): "forged"}) as r:
                assert r.status == 403 and "csrf token mismatch" in await r.text()
            assert srv.tailnet.list_nodes() == []

            status, text = await confirm(s, srv.cfg.server_url, page)
            assert status == 200 and "Node registered" in text
        resp = await asyncio.wait_for(follow, 10)
        assert resp["MachineAuthorized"] is True

        # The user comes from the provider's claims; the node is the device's.
        user = users_by_email(srv)["alice@example.com"]
        assert user.display_name == "Alice Liddell"
        assert user.name == "alice"
        assert user.provider == "oidc"
        assert user.provider_identifier == f"{idp.issuer}/alice-sub"
        assert user.profile_pic_url == "https://pics.example.com/alice.png"
        assert set(user.groups) == {"eng", "ops"}
        (node,) = srv.tailnet.list_nodes()
        assert node.user_id == user.id and node.register_method == "oidc"
        assert node.hostname == "alice-laptop" and node.node_key == dev.node_key
        assert node.expiry is None  # use_expiry_from_token is off, node.expiry is 0
        # One audit line per action, naming the OIDC user who did it.
        audit = [(r.fields["action"], r.fields["actor"], r.fields["target"])  # type: ignore[attr-defined]
                 for r in caplog.records if r.name == "pyheadscale.audit"]
        assert audit == [("user.create", "oidc:alice@example.com", f"user {user.id}"),
                         ("node.register", "oidc:alice@example.com", f"node {node.id}")]


@pytest.mark.parametrize("case", ["domain", "user", "group", "unverified"])
async def test_disallowed_users_are_refused(tmp_path: Path, idp_factory: Any,
                                            case: str) -> None:
    port = free_port()
    idp = idp_factory(hs_port=port)
    extra, who, message = {
        "domain": ({"allowed_domains": ["example.com"]}, BOB, "unauthorised domain"),
        "user": ({"allowed_users": ["alice@example.com"]}, BOB, "unauthorised user"),
        "group": ({"allowed_groups": ["eng"]}, BOB, "unauthorised group"),
        "unverified": ({"allowed_domains": ["example.com"]}, CAROL, "unverified email"),
    }[case]
    async with oidc_server(tmp_path, port, oidc_conf(idp, tmp_path, **extra)) as srv, \
            Machine(srv.cfg.server_url, "dev") as dev:
        auth_url, follow = await dev.start_login()
        async with browser() as s:
            status, page, _ = await login(s, auth_url, who)
        assert status == 401, page
        assert message in page and "No device was registered" in page
        assert srv.tailnet.list_nodes() == []
        assert srv.tailnet.list_users() == []
        assert not follow.done()
        # The same policy lets an allowed user through on the same pending registration.
        async with browser() as s:
            status, page, _ = await login(s, auth_url, ALICE)
            assert status == 200, page
            assert (await confirm(s, srv.cfg.server_url, page))[0] == 200
        assert (await asyncio.wait_for(follow, 10))["MachineAuthorized"] is True


async def test_tampered_state_and_replayed_callback_are_refused(tmp_path: Path,
                                                                idp_factory: Any) -> None:
    async with server_and_device(tmp_path, idp_factory) as (srv, dev, idp):
        auth_url, follow = await dev.start_login()
        async with browser() as s:
            _, _, cb = await login(s, auth_url, ALICE, stop_at_callback=True)
            state = cb.query["state"]
            tampered = cb.update_query(state="X" + state[1:])
            async with s.get(tampered) as r:
                assert r.status == 400 and "state not found" in await r.text()
            # Cookie and parameter both forged: the server never issued that state.
            s.cookie_jar.update_cookies({f"state_{'X' + state[1:6]}": "X" + state[1:]},
                                        URL(srv.cfg.server_url + "/oidc/callback"))
            async with s.get(tampered) as r:
                assert r.status == 410 and "login session expired" in await r.text()
            assert srv.tailnet.list_users() == [] and srv.tailnet.list_nodes() == []

            async with s.get(cb) as r:  # the genuine callback still works once
                page = await r.text()
                assert r.status == 200 and "Confirm node registration" in page
            users_after_first = len(srv.tailnet.list_users())
            # Replay, with the state cookie put back as an attacker holding it would.
            s.cookie_jar.update_cookies({f"state_{state[:6]}": state},
                                        URL(srv.cfg.server_url + "/oidc/callback"))
            async with s.get(cb) as r:
                assert r.status == 410, await r.text()
            assert len(srv.tailnet.list_users()) == users_after_first
            assert srv.tailnet.list_nodes() == []
        assert not follow.done()
        follow.cancel()


async def test_wrong_nonce_is_refused(tmp_path: Path, idp_factory: Any) -> None:
    async with server_and_device(tmp_path, idp_factory) as (srv, dev, idp):
        auth_url, follow = await dev.start_login()
        async with browser() as s:
            _, _, cb = await login(s, auth_url, ALICE, stop_at_callback=True)
            # The browser holds a nonce cookie for this login; swap its value.
            (cookie,) = [c for c in s.cookie_jar if c.key.startswith("nonce_")]
            s.cookie_jar.clear(lambda c: c.key.startswith("nonce_"))
            s.cookie_jar.update_cookies({cookie.key: cookie.value[:-2] + "zz"},
                                        URL(srv.cfg.server_url + "/oidc/callback"))
            async with s.get(cb) as r:
                text = await r.text()
            assert r.status == 403 and "nonce did not match" in text
        assert srv.tailnet.list_users() == [] and srv.tailnet.list_nodes() == []
        follow.cancel()


# A proxy in front of the provider lets a test delay or rewrite the token response, the way
# a slow network or an attacker in the middle would. The provider's issuer is the proxy URL.


@contextlib.asynccontextmanager
async def idp_proxy(upstream_port: int, port: int,
                    on_token: Callable[[dict[str, Any]], Any]) -> AsyncIterator[None]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        # Host is kept: the provider builds its endpoint URLs from it.
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with aiohttp.ClientSession(auto_decompress=True) as c, c.request(
                request.method, f"http://127.0.0.1:{upstream_port}{request.path_qs}",
                data=body, headers=headers, allow_redirects=False) as r:
            data = await r.read()
            # A multidict: the provider sets several cookies (several Set-Cookie headers).
            out = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in (
                "content-length", "transfer-encoding", "content-encoding", "connection"))
            if request.path == "/token" and r.status == 200:
                tok = json.loads(data)
                await on_token(tok)
                data = json.dumps(tok).encode()
            return web.Response(status=r.status, body=data, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


def _claims(raw: str) -> dict[str, Any]:
    p = raw.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))))


@pytest.mark.parametrize("attack", ["expired", "foreign_key"])
async def test_bad_id_token_is_refused(tmp_path: Path, idp_factory: Any, attack: str) -> None:
    port, idp_port, proxy_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{proxy_port}"
    idp = idp_factory(hs_port=port, port=idp_port, issuer=issuer, id_token_ttl=1)
    foreign = RSAKey.generate_key(2048, parameters={"kid": "idp-rs256"}, private=True)

    async def on_token(tok: dict[str, Any]) -> None:
        if attack == "expired":
            await asyncio.sleep(2.2)  # the 1 s ID token is past its exp when it arrives
        else:
            claims = _claims(tok["id_token"]) | {"exp": int(datetime.now(UTC).timestamp()) + 600}
            tok["id_token"] = jwt.encode({"alg": "RS256", "kid": "idp-rs256"}, claims, foreign)

    async with idp_proxy(idp_port, proxy_port, on_token), \
            oidc_server(tmp_path, port, oidc_conf(idp, tmp_path)) as srv, \
            Machine(srv.cfg.server_url, "dev") as dev:
        assert idp.issuer == issuer
        auth_url, follow = await dev.start_login()
        async with browser() as s:
            status, page, _ = await login(s, auth_url, ALICE)
        assert status == 403, page
        assert "failed to verify id_token" in page
        assert ("expired" in page) == (attack == "expired")
        assert srv.tailnet.list_users() == [] and srv.tailnet.list_nodes() == []
        assert not follow.done()
        follow.cancel()


async def test_use_expiry_from_token_sets_node_expiry(tmp_path: Path, idp_factory: Any) -> None:
    port, idp_port, proxy_port = free_port(), free_port(), free_port()
    idp = idp_factory(hs_port=port, port=idp_port, issuer=f"http://127.0.0.1:{proxy_port}",
                      id_token_ttl=900)
    seen: list[dict[str, Any]] = []

    async def on_token(tok: dict[str, Any]) -> None:
        seen.append(_claims(tok["id_token"]))

    conf = oidc_conf(idp, tmp_path, use_expiry_from_token=True)
    async with idp_proxy(idp_port, proxy_port, on_token), \
            oidc_server(tmp_path, port, conf) as srv, \
            Machine(srv.cfg.server_url, "dev") as dev:
        resp = await full_login(srv, dev, ALICE)
        assert resp["MachineAuthorized"] is True
        (node,) = srv.tailnet.list_nodes()
        (tok,) = seen
        assert node.expiry == datetime.fromtimestamp(tok["exp"], UTC)
        assert 800 < tok["exp"] - datetime.now(UTC).timestamp() <= 900


async def test_reauthentication_same_and_other_user(tmp_path: Path, idp_factory: Any) -> None:
    async with server_and_device(tmp_path, idp_factory, "shared-pc") as (srv, dev, idp):
        await full_login(srv, dev, ALICE)
        (first,) = srv.tailnet.list_nodes()

        dev.new_node_key()  # `tailscale login` again on the same machine, same user
        async with browser() as s:
            auth_url, follow = await dev.start_login()
            status, page, _ = await login(s, auth_url, ALICE)
            status, text = await confirm(s, srv.cfg.server_url, page)
            assert status == 200 and "Node reauthenticated" in text
        await asyncio.wait_for(follow, 10)
        (again,) = srv.tailnet.list_nodes()
        assert again.id == first.id and again.addresses == first.addresses
        assert again.node_key == dev.node_key

        dev.new_node_key()  # now Bob signs in on the same machine
        await full_login(srv, dev, BOB)
        nodes = srv.tailnet.list_nodes()
        assert len(nodes) == 2
        bob = users_by_email(srv)["bob@other.org"]
        (bobs,) = [n for n in nodes if n.user_id == bob.id]
        assert bobs.id != first.id and bobs.addresses != first.addresses


async def test_unowned_advertised_tags_are_refused_with_a_page(tmp_path: Path,
                                                              idp_factory: Any) -> None:
    async with server_and_device(tmp_path, idp_factory, "tagged-pc") as (srv, dev, idp):
        dev.request_tags = ["tag:server"]  # no policy: nobody owns it
        auth_url, follow = await dev.start_login()
        async with browser() as s:
            status, page, _ = await login(s, auth_url, ALICE)
            assert status == 200, page
            status, text = await confirm(s, srv.cfg.server_url, page)
        assert status == 403 and "tag:server" in text, text
        answer = await asyncio.wait_for(follow, 10)
        assert "tag:server" in answer.get("Error", ""), answer
        assert srv.tailnet.list_nodes() == []


async def test_group_change_at_next_login_updates_user(tmp_path: Path,
                                                       idp_factory: Any) -> None:
    async with server_and_device(tmp_path, idp_factory) as (srv, dev, idp):
        await full_login(srv, dev, ALICE)
        assert set(users_by_email(srv)["alice@example.com"].groups) == {"eng", "ops"}
        idp.set_account(Account(**{**ALICE.__dict__, "groups": ["eng", "admins"],
                                   "name": "Alice L."}))
        dev.new_node_key()
        await full_login(srv, dev, ALICE)
        alice = users_by_email(srv)["alice@example.com"]
        assert set(alice.groups) == {"eng", "admins"}
        assert alice.display_name == "Alice L."
        assert len(srv.tailnet.list_users()) == 1


async def test_idp_group_in_policy_controls_reachability_live(tmp_path: Path,
                                                             idp_factory: Any) -> None:
    """With oidc.policy_groups on, an ACL on group:idp-ops lets the provider's "ops" members
    reach a tagged service and nobody else; moving users between groups at the provider and
    logging in again changes the service's packet filter and peers on its open map stream."""
    port = free_port()
    idp = idp_factory(hs_port=port)
    policy = tmp_path / "policy.hujson"
    policy.write_text(json.dumps({
        "tagOwners": {"tag:svc": ["group:idp-ops"]},
        "acls": [{"action": "accept", "src": ["group:idp-ops"], "dst": ["tag:svc:443"]}],
    }))
    cfg = oidc_config(tmp_path, port, oidc_conf(
        idp, tmp_path, policy_groups={"enabled": True, "prefix": "idp-"}))
    cfg.policy.path = policy
    srv = Server(cfg)
    seen: dict[str, Any] = {"filter": None, "peers": set()}

    async def follow(conn: ControlConnection, node_key: bytes) -> None:
        # Compress as tailscaled asks: the test client decodes zstd frames only.
        req = {"Version": 113, "NodeKey": "nodekey:" + node_key.hex(), "Stream": True,
               "Compress": "zstd", "KeepAlive": True,
               "DiscoKey": "discokey:" + secrets.token_bytes(32).hex()}
        async for frame in conn.stream_map(json.dumps(req).encode()):
            if "PacketFilter" in frame:
                seen["filter"] = frame["PacketFilter"]
            if "Peers" in frame:
                seen["peers"] = {p["ID"] for p in frame["Peers"]}
            seen["peers"] |= {p["ID"] for p in frame.get("PeersChanged") or ()}
            seen["peers"] -= set(frame.get("PeersRemoved") or ())

    def ips_of(node: Any) -> set[str]:
        return {str(node.ipv4), str(node.ipv6)}

    def allowed() -> set[str]:
        return {ip for rule in seen["filter"] or () for ip in rule["SrcIPs"]
                if any(d["Ports"] == {"First": 443, "Last": 443} for d in rule["DstPorts"])}

    async def until(cond: Callable[[], bool], what: str) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what}; service map has {seen}")

    try:
        await srv.start()
        _, svc_key = await srv.tailnet.create_preauth_key(None, tags=["tag:svc"])
        async with Machine(srv.cfg.server_url, "svc") as svc, \
                Machine(srv.cfg.server_url, "alice-pc") as adev, \
                Machine(srv.cfg.server_url, "bob-pc") as bdev:
            answer = await svc.register(auth_key=svc_key)
            assert answer["MachineAuthorized"] is True, answer
            watcher = asyncio.create_task(follow(svc.conn, svc.node_key))
            try:
                await until(lambda: seen["filter"] is not None, "no first map")
                assert allowed() == set() and seen["peers"] == set()

                # alice is in "ops" at the provider, bob only in "sales".
                await full_login(srv, adev, ALICE)
                await full_login(srv, bdev, BOB)
                users = users_by_email(srv)
                alice_node, = srv.tailnet.list_nodes(users["alice@example.com"].id)
                bob_node, = srv.tailnet.list_nodes(users["bob@other.org"].id)
                await until(lambda: allowed() == ips_of(alice_node), "alice not let in")
                await until(lambda: seen["peers"] == {alice_node.id}, "peers not alice only")
                assert not allowed() & ips_of(bob_node)

                # At the provider alice leaves "ops" and bob joins it; both log in again.
                idp.set_account(Account(**{**ALICE.__dict__, "groups": ["eng"]}))
                idp.set_account(Account(**{**BOB.__dict__, "groups": ["sales", "Ops"]}))
                for dev, who in ((adev, ALICE), (bdev, BOB)):
                    dev.new_node_key()
                    await full_login(srv, dev, who)
                await until(lambda: allowed() == ips_of(bob_node), "bob not let in")
                await until(lambda: seen["peers"] == {bob_node.id}, "alice still a peer")
                assert not allowed() & ips_of(alice_node)
                assert not watcher.done()  # the same stream, no reconnect
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
        # The groups of the last login are persisted (users.idp_groups), not only in memory.
        with sqlite3.connect(srv.cfg.database.sqlite.path) as db:
            stored = dict(db.execute("SELECT email, idp_groups FROM users"))
        assert {k: json.loads(v) for k, v in stored.items()} == {
            "alice@example.com": ["eng"], "bob@other.org": ["sales", "Ops"]}
    finally:
        await srv.stop()
        shutil.rmtree(Path(srv.cfg.unix_socket).parent, ignore_errors=True)


async def test_provider_down_at_start(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    conf = {"issuer": f"http://127.0.0.1:{dead}", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET}
    with pytest.raises(ConfigError, match="^config: oidc.issuer: .*only_start_if_oidc_is_available"):
        async with oidc_server(tmp_path / "a", port, conf):
            pass
    port = free_port()
    conf["only_start_if_oidc_is_available"] = False
    async with oidc_server(tmp_path / "b", port, conf) as srv, \
            Machine(srv.cfg.server_url, "dev") as dev:
        auth_url, follow = await dev.start_login()
        async with browser() as s, s.get(auth_url, allow_redirects=False) as r:
            assert r.status == 200
            assert "headscale auth register --auth-id" in await r.text()
        follow.cancel()
