"""The admin console in-process: sign-in links, sessions, CSRF, the auditor, the policy
editor's checks and locations, and one audit line per action (the browser walk with official
clients is tests/integration/test_console.py)."""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pyheadscale.console import AdminConsole
from pyheadscale.console.policyedit import error_path, locate
from pyheadscale.console.sessions import Role, Sessions
from pyheadscale.console.web import Access
from pyheadscale.control.dispatch import ControlPlane
from tests.inproc import running_server, server_config
from tests.unit._statefix import key, open_control

POLICY = """{
  "groups": {"group:admins": ["alice@"]},
  "tagOwners": {"tag:server": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:admins"], "dst": ["*:*"]},
  ],
}
"""


@dataclass
class Env:
    web: TestClient
    sock: TestClient
    cp: ControlPlane
    console: AdminConsole


@contextlib.asynccontextmanager
async def console_env(cp: ControlPlane) -> AsyncIterator[Env]:
    """The console of `cp` on a test server, and its socket route on another."""
    cp.mapctx = cp.build_context()
    console = AdminConsole(cp.console_deps())
    app, sock = web.Application(), web.Application()
    console.mount(app)
    console.add_socket_routes(sock)
    w, s = TestClient(TestServer(app)), TestClient(TestServer(sock))
    await w.start_server()
    await s.start_server()
    try:
        yield Env(w, s, cp, console)
    finally:
        await w.close()
        await s.close()
        await cp.tailnet.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with console_env(await open_control(tmp_path)) as e:
        yield e


async def sign_in(e: Env, role: str = "admin", user: str = "alice") -> str:
    """Redeem a fresh one-time link; returns the session's CSRF token."""
    r = await e.sock.post("/console/sign-in-link", json={"user": user, "role": role})
    assert r.status == 200, await r.text()
    url = (await r.json())["url"]
    path = url[url.index("/admin/"):]
    page = await e.web.get(path)
    html = await page.text()
    assert page.status == 200, html
    token = re.search(r'name="token" value="([^"]+)"', html)
    pre = re.search(r'name="csrf" value="([^"]+)"', html)
    assert token and pre
    r = await e.web.post("/admin/sign-in/link", data={"token": token[1], "csrf": pre[1]},
                         allow_redirects=False)
    assert r.status == 303, await r.text()
    page = await e.web.get("/admin/machines")
    m = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert m
    return m[1]


async def test_no_session_redirects_to_sign_in(env: Env) -> None:
    for path in ("/admin/machines", "/admin/policy", "/admin/users/1", "/admin/tailnet"):
        r = await env.web.get(path, allow_redirects=False)
        assert r.status == 303
        assert r.headers["Location"].startswith("/admin/sign-in?next=")


async def test_link_signs_in_once(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyheadscale.audit")
    r = await env.sock.post("/console/sign-in-link", json={"user": "bob", "role": "admin"})
    url = (await r.json())["url"]
    lines = [rec.fields for rec in caplog.records  # type: ignore[attr-defined]
             if rec.name == "pyheadscale.audit"]
    assert lines == [{"action": "console.sign_in_link", "actor": "cli_socket",
                      "target": "console user cli:bob", "role": "admin"}]
    token = url.split("token=")[1]
    assert all(token not in repr(vars(rec)) for rec in caplog.records)
    path = url[url.index("/admin/"):]
    html = await (await env.web.get(path)).text()
    token = re.search(r'name="token" value="([^"]+)"', html)[1]  # type: ignore[index]
    pre = re.search(r'name="csrf" value="([^"]+)"', html)[1]  # type: ignore[index]
    first = await env.web.post("/admin/sign-in/link", data={"token": token, "csrf": pre},
                               allow_redirects=False)
    assert first.status == 303
    cookie = first.cookies["pyheadscale_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    assert (await env.web.get(path)).status == 410  # used: the page says so


async def test_bad_link_requests(env: Env) -> None:
    for body in ({"role": "root"}, {"user": ""}, {"user": "x" * 65}, [1]):
        r = await env.sock.post("/console/sign-in-link", json=body)
        assert r.status == 400, body
    r = await env.sock.post("/console/sign-in-link", data=b"{" * 5000)
    assert r.status == 413


async def test_post_without_csrf_is_refused(env: Env) -> None:
    csrf = await sign_in(env)
    before = len(env.cp.tailnet.users)
    for data in ({"name": "mallory"}, {"name": "mallory", "csrf": "wrong"}):
        r = await env.web.post("/admin/users", data=data)
        assert r.status == 403
    r = await env.web.post("/admin/users", data={"name": "mallory", "csrf": csrf},
                           headers={"Origin": "https://evil.example"})
    assert r.status == 403
    assert len(env.cp.tailnet.users) == before
    r = await env.web.post("/admin/users", data={"name": "carol", "csrf": csrf})
    assert r.status == 200  # redirected to the list
    assert env.cp.tailnet.user_by_name("carol") is not None


def _fill(path: str) -> str:
    return re.sub(r"\{[a-z_]+(?::(?:[^{}]|\{[^{}]*\})*)?\}", "1", path)


async def test_auditor_cannot_change_anything(env: Env) -> None:
    tn = env.cp.tailnet
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id)
    await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "a"}, key=full)
    csrf = await sign_in(env, role="auditor", user="audrey")
    writes = [r for r in env.console.console.routes if r.access is Access.WRITE]
    assert len(writes) >= 14
    snapshot = (dict(tn.users), dict(tn.nodes), dict(tn.preauth_keys), dict(tn.api_keys))
    for r in writes:
        resp = await env.web.post("/admin" + _fill(r.path),
                                  data={"csrf": csrf, "name": "x", "confirm": "yes",
                                        "policy": "{}", "user": "alice", "route": "exit",
                                        "tags": "tag:server", "expiry": "1d"})
        assert resp.status == 403, r.path
        assert "auditor" in await resp.text()
    assert snapshot == (dict(tn.users), dict(tn.nodes), dict(tn.preauth_keys),
                        dict(tn.api_keys))
    assert (await env.web.get("/admin/machines")).status == 200


async def test_each_action_leaves_one_audit_line(env: Env,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    tn = env.cp.tailnet
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id)
    n = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "a"}, key=full)
    csrf = await sign_in(env, user="alice")
    caplog.set_level(logging.INFO, logger="pyheadscale.audit")
    steps: list[tuple[str, dict[str, Any], str]] = [
        ("/admin/users", {"name": "carol"}, "user.create"),
        (f"/admin/machines/{n.id}/rename", {"name": "renamed"}, "node.rename"),
        (f"/admin/machines/{n.id}/disable-expiry", {}, "node.expire"),
        (f"/admin/machines/{n.id}/expire", {}, "node.expire"),
        ("/admin/keys/preauth", {"user": str(u.id), "expiry": "1d"}, "preauthkey.create"),
        ("/admin/keys/api", {"expiry": "30d"}, "apikey.create"),
    ]
    for path, data, action in steps:
        caplog.clear()
        r = await env.web.post(path, data={**data, "csrf": csrf})
        assert r.status == 200, path
        lines = [rec.fields for rec in caplog.records  # type: ignore[attr-defined]
                 if rec.name == "pyheadscale.audit"]
        assert len(lines) == 1, (path, lines)
        assert (lines[0]["action"], lines[0]["actor"]) == (action, "console:cli:alice")
    assert tn.nodes[n.id].given_name == "renamed"


async def test_new_key_is_shown_once(env: Env) -> None:
    u = await env.cp.tailnet.create_user("alice")
    csrf = await sign_in(env)
    r = await env.web.post("/admin/keys/preauth", data={"csrf": csrf, "user": str(u.id),
                                                        "reusable": "yes", "expiry": "1h"})
    html = await r.text()
    m = re.search(r'id="new-key" class="secret" readonly value="(hskey-auth-[^"]+)"', html)
    assert m, html
    assert r.headers["Cache-Control"] == "no-store"
    again = await (await env.web.get("/admin/keys")).text()
    assert m[1] not in again


async def test_policy_mistake_is_located_and_not_saved(env: Env) -> None:
    await env.cp.tailnet.create_user("alice")
    csrf = await sign_in(env)
    syntax = POLICY.replace('"accept",', '"accept"')  # line 5: missing comma
    r = await env.web.post("/admin/policy/preview", data={"csrf": csrf, "policy": syntax})
    assert r.status == 422
    assert 'data-line="5"' in await r.text()
    semantic = POLICY.replace('"src": ["group:admins"]', '"src": ["group:nobody"]')
    r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": semantic})
    html = await r.text()
    assert r.status == 422 and 'data-line="5"' in html and "group:nobody" in html
    assert env.cp.policy.text is None  # nothing stored, nothing running
    r = await env.web.post("/admin/policy/preview", data={"csrf": csrf, "policy": POLICY})
    assert r.status == 200 and 'class="d-add"' in await r.text()
    r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": POLICY})
    assert r.status == 200 and env.cp.policy.text == POLICY
    hist = await (await env.web.get("/admin/policy/history")).text()
    assert "running" in hist


async def test_policy_tests_run_before_saving(env: Env) -> None:
    tn = env.cp.tailnet
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id)
    await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "a"}, key=full)
    csrf = await sign_in(env)
    failing = POLICY.replace("],\n}", '],\n  "tests": [{"src": "alice@", "deny": ["alice@:22"]}],\n}')
    r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": failing})
    html = await r.text()
    assert r.status == 422 and "expected DENIED, got ALLOWED" in html
    assert env.cp.policy.text is None


def test_error_paths_and_locations() -> None:
    assert error_path('acls[0].src[1]: group not defined') == [
        ("field", "acls"), ("index", 0), ("field", "src"), ("index", 1)]
    assert error_path('groups["group:a"]: x') == [("field", "groups"), ("key", "group:a")]
    assert error_path("tests[2] alice@: -> x") == [("field", "tests"), ("index", 2)]
    assert error_path("no path here") is None
    text = '{\n  "ACLs": [\n    {"action": "accept", "src": ["a"], "dst": ["b:*"]},\n  ],\n}'
    line3 = text.splitlines()[2]
    assert locate(text, "acls[0].dst[0]: host not defined") == (3, line3.index('"b:*"') + 1)
    assert locate(text, 'acls[0].bogus: unknown field "bogus"') == (3, 5)


def test_sessions_end_when_idle_or_old(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("pyheadscale.console.sessions.time.monotonic", lambda: now[0])
    s = Sessions(idle_s=60, max_age_s=300, link_ttl_s=30)
    a = s.start("alice", Role.ADMIN)
    now[0] += 59
    assert s.get(a.id) is a
    now[0] += 61
    assert s.get(a.id) is None  # idle
    b = s.start("bob", Role.AUDITOR)
    for _ in range(6):
        now[0] += 55
        got = s.get(b.id)
    assert got is None  # absolute
    link = s.new_link("dave", Role.ADMIN)
    assert s.redeem_link(link.token) is not None
    assert s.redeem_link(link.token) is None  # once
    link = s.new_link("carol", Role.ADMIN)
    now[0] += 31
    assert s.redeem_link(link.token) is None


def test_browser_test_tries_every_mutating_route(env: Env) -> None:
    from tests.integration.test_console import MUTATING

    writes = {_fill(r.path) for r in env.console.console.routes if r.access is Access.WRITE}
    assert writes == set(MUTATING)


async def test_reachability_follows_the_packet_filters(env: Env) -> None:
    from pyheadscale.console.reach import picture

    tn = env.cp.tailnet
    nodes = {}
    for i, name in enumerate(("alice", "bob"), start=1):
        u = await tn.create_user(name)
        _, full = await tn.create_preauth_key(u.id)
        nodes[name] = await tn.register_with_authkey(key(2 * i), key(2 * i + 1), None,
                                                     {"Hostname": name}, key=full)
    pol = '{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22,80"]}]}'
    manager = env.cp.policy.build(pol, run_tests=False)
    assert manager is not None
    pic = picture(manager, tn.list_nodes(), tn.users, group=False)
    a, b = nodes["alice"].id, nodes["bob"].id
    assert [(e.src, e.dst, e.ports) for e in pic.edges] == [(f"node:{a}", f"node:{b}", "22, 80")]
    grouped = picture(manager, tn.list_nodes(), tn.users, group=True)
    assert [(e.src, e.dst) for e in grouped.edges] == [("user:alice", "user:bob")]


async def test_restore_an_earlier_version(env: Env) -> None:
    await env.cp.tailnet.create_user("alice")
    csrf = await sign_in(env)
    v2 = POLICY.replace('"*:*"', '"alice@:*"')
    for text in (POLICY, v2):
        r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": text})
        assert r.status == 200
    hist = await (await env.web.get("/admin/policy/history")).text()
    ids = re.findall(r'/admin/policy/history/(\d+)"', hist)
    assert len(ids) == 2
    page = await (await env.web.get(f"/admin/policy/history/{ids[1]}")).text()
    assert 'id="restore"' in page and 'class="d-del"' in page  # the diff to the running one
    old = re.search(r'name="policy" value="([^"]*)"', page, re.S)
    assert old is not None
    restored = html.unescape(old[1])
    assert restored == POLICY
    r = await env.web.post("/admin/policy/preview", data={"csrf": csrf, "policy": restored})
    assert r.status == 200 and 'id="apply"' in await r.text()
    r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": restored})
    assert r.status == 200 and env.cp.policy.text == POLICY
    hist = await (await env.web.get("/admin/policy/history")).text()
    assert len(re.findall(r'/admin/policy/history/(\d+)"', hist)) == 3


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_server_serves_the_console_unless_disabled(tmp_path: Path,
                                                             enabled: bool) -> None:
    import aiohttp

    cfg = server_config(tmp_path, overrides={"admin_console": {"enabled": enabled}})
    async with running_server(cfg), aiohttp.ClientSession() as web_, aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=cfg.unix_socket)) as sock:
        r = await sock.post("http://local/console/sign-in-link", json={"user": "ops"})
        page = await web_.get(cfg.server_url + "/admin/machines", allow_redirects=False)
        if not enabled:
            assert r.status == 404 and page.status == 404
            return
        url = (await r.json())["url"]
        assert url.startswith(cfg.server_url + "/admin/sign-in/link?token=")
        assert page.status == 303
        link = await web_.get(url)
        assert link.status == 200 and "cli:ops" in await link.text()
        assert link.headers["X-Frame-Options"] == "DENY"
        assert "script-src 'self'" in link.headers["Content-Security-Policy"]


def test_who_may_sign_in_with_oidc() -> None:
    from pyheadscale.auth.oidc import Claims
    from pyheadscale.console.signin import role_for

    admins, auditors = ["Alice@Example.com", "group:netadmins"], ["bob", "group:audit"]
    alice = Claims(sub="1", iss="i", email="alice@example.com", email_verified=True)
    assert role_for(admins, auditors, alice) is Role.ADMIN
    unverified = Claims(sub="1", iss="i", email="alice@example.com", email_verified=False)
    assert role_for(admins, auditors, unverified) is None  # an unverified address names nobody
    ops = Claims(sub="2", iss="i", groups=("netadmins", "audit"))
    assert role_for(admins, auditors, ops) is Role.ADMIN  # the stronger role wins
    assert role_for(admins, auditors, Claims(sub="3", iss="i", username="bob")) is Role.AUDITOR
    assert role_for(admins, auditors, Claims(sub="4", iss="i", groups=("audit",))) \
        is Role.AUDITOR
    assert role_for(admins, auditors, Claims(sub="5", iss="i", username="group:netadmins")) \
        is None
    assert role_for([], [], alice) is None


async def test_hostile_input_is_escaped_bounded_and_refused_cleanly(env: Env) -> None:
    tn = env.cp.tailnet
    u = await tn.create_user("alice")
    _, full = await tn.create_preauth_key(u.id)
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    n = await tn.register_with_authkey(key(1), key(2), None,
                                       {"Hostname": "a", "OS": evil, "IPNVersion": evil},
                                       key=full)
    env.cp.pending.add(machine_key=key(7), node_key=key(8), hostinfo={"Hostname": evil})
    csrf = await sign_in(env)
    for path in ("/admin/machines", f"/admin/machines/{n.id}", "/admin/pending"):
        html_text = await (await env.web.get(path)).text()
        assert "<script>alert" not in html_text and "<img src=x" not in html_text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text, path
    text = '{"acls": []} // </textarea><script>alert(3)</script>'
    r = await env.web.post("/admin/policy/preview", data={"csrf": csrf, "policy": text})
    assert "<script>alert(3)" not in await r.text()
    # Ids out of range, unknown ids, a body over the server's limit, a wrong field type.
    for path in ("/admin/machines/99999999999999999", "/admin/users/0",
                 "/admin/policy/history/123"):
        assert (await env.web.get(path)).status == 404, path
    r = await env.web.post("/admin/machines/99999999999999999/rename",
                           data={"csrf": csrf, "name": "x"})
    assert r.status == 404 and "node not found" in await r.text()  # the API's refusal
    r = await env.web.post("/admin/users", data={"csrf": csrf, "name": "x" * (2 << 20)})
    assert r.status == 413
    r = await env.web.post("/admin/users", data={"csrf": csrf, "name": "bad name!"})
    assert r.status == 200 and "flash-error" in await r.text()
    assert tn.user_by_name("bad name!") is None
    r = await env.web.get("/admin/machines?q=" + "%00" * 1000 + "&status=nonsense")
    assert r.status == 200


async def test_extra_records_edited_only_in_their_own_file(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    path = tmp_path / "records.json"
    path.write_text("[]")
    cp = await open_control(tmp_path, dns={"base_domain": "ts.example",
                                           "extra_records_path": str(path)})
    caplog.set_level(logging.INFO, logger="pyheadscale.audit")
    async with console_env(cp) as env:
        csrf = await sign_in(env)
        caplog.clear()  # the sign-in link's line
        r = await env.web.post("/admin/dns/records/add", data={
            "csrf": csrf, "name": "svc.ts.example", "type": "A", "value": "100.64.9.9"})
        page = await r.text()
        assert "Records saved" in page and "<td>svc.ts.example</td>" in page
        assert json.loads(path.read_text()) == [
            {"name": "svc.ts.example", "type": "A", "value": "100.64.9.9"}]
        assert [dict(x) for x in cp.mapctx.dns.extra_records] == [
            {"Name": "svc.ts.example", "Type": "A", "Value": "100.64.9.9"}]
        r = await env.web.post("/admin/dns/records/add", data={
            "csrf": csrf, "name": "bad.ts.example", "type": "AAAA", "value": "100.64.9.9"})
        assert "AAAA record" in await r.text()  # refused whole, the file untouched
        assert len(json.loads(path.read_text())) == 1
        r = await env.web.post("/admin/dns/records/remove", data={
            "csrf": csrf, "name": "svc.ts.example", "value": "100.64.9.9"})
        assert json.loads(path.read_text()) == [] and cp.mapctx.dns.extra_records == ()
        lines = [rec.fields for rec in caplog.records  # type: ignore[attr-defined]
                 if rec.name == "pyheadscale.audit"]
        assert [x["action"] for x in lines] == ["dns.extra_records"] * 2, lines
        assert lines[0]["target"] == "dns" and "svc.ts.example" in str(lines[0]["change"])


async def test_records_in_the_config_file_stay_read_only(env: Env) -> None:
    assert env.cp.console_deps().write_extra_records is None
    csrf = await sign_in(env)
    page = await (await env.web.get("/admin/dns")).text()
    assert "Add record" not in page
    r = await env.web.post("/admin/dns/records/add", data={
        "csrf": csrf, "name": "svc.ts.example", "value": "100.64.9.9"})
    assert "config file" in await r.text()


async def test_file_mode_policy_is_checked_but_never_saved(tmp_path: Path) -> None:
    path = tmp_path / "policy.hujson"
    path.write_text(POLICY)
    cp = await open_control(tmp_path, policy={"mode": "file", "path": str(path)})
    await cp.tailnet.create_user("alice")
    async with console_env(cp) as env:
        csrf = await sign_in(env)
        page = await (await env.web.get("/admin/policy")).text()
        assert "policy.mode is <code>file</code>" in page
        changed = POLICY.replace('"*:*"', '"alice@:*"')
        r = await env.web.post("/admin/policy/preview", data={"csrf": csrf, "policy": changed})
        review = await r.text()
        assert r.status == 200 and 'class="d-add"' in review and 'id="apply"' not in review
        r = await env.web.post("/admin/policy/apply", data={"csrf": csrf, "policy": changed})
        assert r.status == 400 and "update is disabled" in await r.text()
        assert path.read_text() == POLICY
        hist = await (await env.web.get("/admin/policy/history")).text()
        assert "database mode only" in hist
