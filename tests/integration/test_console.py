"""The web admin console in a real browser (Debian's chromium) with official clients.

One tailnet and one browser for the module: the browser runs in an "admin" host's namespace
and reaches the server at https://198.51.100.1 like a person on the network would. The tests
run in order and build on each other: sign-in, every page (labelled controls, keyboard),
approving a registration, a route, the policy editor, expiring a node, OIDC sign-in, and the
refusals (no session, cross-site post, the auditor). Screenshots of every page a failed test
visited are kept with its logs.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.integration import hsapi
from tests.integration.browser import Browser, browser_in, keyboard_gaps, unlabelled_controls
from tests.integration.conftest import LOG_ROOT, test_failed
from tests.integration.idp import Account, IdPUnavailable, OpenIDProvider
from tests.integration.netns import SERVER_IP, Host, Namespace, Router, Topology
from tests.integration.server import PyHeadscale, http_get_from
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import (
    BASE_DOMAIN,
    World,
    dns,
    peers_by_name,
    serve_echo,
    wait_for,
)

pytestmark = pytest.mark.integration

WEB_PORT = 8000
IDP_PORT = 5557
CLIENT_ID, CLIENT_SECRET = "pyheadscale-console", "console-secret"
ADMIN = Account("carol-sub", "carol-pw", email="carol@example.com", name="Carol Admin",
                preferred_username="carol")
OUTSIDER = Account("dan-sub", "dan-pw", email="dan@example.com", name="Dan",
                   preferred_username="dan")

# Every route that changes something (the unit tests check this list against the console's
# route table), with the node/user/key id 1 filled in.
MUTATING = ["/users", "/users/1/rename", "/users/1/delete", "/machines/1/rename",
            "/machines/1/expire", "/machines/1/disable-expiry", "/machines/1/routes",
            "/machines/1/tags", "/machines/1/delete", "/pending/approve", "/pending/reject",
            "/keys/preauth", "/keys/preauth/1/expire", "/keys/api", "/keys/api/1/expire",
            "/policy/apply", "/dns/records/add", "/dns/records/remove"]


@dataclass
class Lab:
    world: World
    srv: PyHeadscale
    browser: Browser
    page: Page
    admin_host: Host
    router: Router
    lan_host: Host
    laptop: Tailscaled
    workdir: Path
    broken: list[str]  # resources the page could not load (favicon aside)

    @property
    def base(self) -> str:
        return self.srv.url + "/admin"

    def go(self, path: str) -> Page:
        self.page.goto(self.base + path)
        self.browser.shot(self.page, path or "root")
        return self.page


def fetch(ns: Namespace, ip: str, timeout: float = 3) -> str | None:
    status, body = http_get_from(ns, f"http://{ip}:{WEB_PORT}/", timeout=timeout)  # type: ignore[arg-type]
    return body.decode() if status == 200 else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, netns_ready: None,
        clients_built: dict[str, Path]) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("console")
    topo = Topology()
    daemons: list[Tailscaled] = []

    def make(host: Host, version: str, **kw: Any) -> Tailscaled:
        ts = Tailscaled(host, version, workdir / f"ts-{host.name}-{len(daemons)}", start=False,
                        **kw)
        daemons.append(ts)
        ts.start()
        return ts

    world = World(topo, workdir, make)
    idp: OpenIDProvider | None = None
    try:
        try:
            idp = OpenIDProvider(workdir / "idp", [ADMIN, OUTSIDER], client_id=CLIENT_ID,
                                 client_secret=CLIENT_SECRET,
                                 redirect_uris=[f"https://{SERVER_IP}/oidc/callback"],
                                 port=IDP_PORT, listen_host=SERVER_IP,
                                 ).start(popen=world.server_host.popen)
        except IdPUnavailable as e:
            pytest.fail(f"OpenID provider unavailable: {e}", pytrace=False)
        secret = workdir / "client_secret"
        secret.write_text(CLIENT_SECRET)
        records = workdir / "extra-records.json"
        records.write_text("[]")
        srv = world.start_server({
            "policy": {"mode": "database"},
            "oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID,
                     "client_secret_path": str(secret), "scope": ["openid", "profile", "email"]},
            "admin_console": {"admins": [ADMIN.email]},
            "dns": {"extra_records_path": str(records)},
        }, keys={"alice": {"user": "alice", "reusable": True}}, users=["alice", "bob"])
        router = topo.add_nat("router", "192.0.2.0/25")
        lan_host = topo.add_lan_host(router, "lanweb")
        serve_echo(lan_host, "0.0.0.0", [WEB_PORT])
        laptop = world.join("laptop", NEWEST, "alice", ("--accept-routes",))
        world.join("router", OLDEST, "alice", ("--advertise-routes=192.0.2.0/25",), host=router)
        admin_host = topo.add_host("admin")
        with browser_in(admin_host, workdir) as browser:
            page = browser.context.new_page()
            broken: list[str] = []
            page.on("requestfailed", lambda r: broken.append(f"{r.url}: {r.failure}"))
            page.on("response", lambda r: broken.append(f"{r.url}: {r.status}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico")
                    and r.request.resource_type != "document" else None)
            yield Lab(world, srv, browser, page, admin_host, router, lan_host, laptop, workdir,
                      broken)
    finally:
        world.close()
        for ts in reversed(daemons):
            ts.close()
        if idp is not None:
            idp.stop()
        topo.close()


@pytest.fixture(autouse=True)
def artefacts(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    """Each test starts with no screenshots; a failed test keeps its own and the logs."""
    shutil.rmtree(lab.browser.shots, ignore_errors=True)
    lab.browser.shots.mkdir()
    yield
    if test_failed(request.node):
        with contextlib.suppress(Exception):  # the page may be the thing that broke
            lab.browser.shot(lab.page, "at-failure")
        dest = LOG_ROOT / re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", request.node.nodeid)[:200]
        shutil.copytree(lab.browser.shots, dest / "screenshots", dirs_exist_ok=True)
        shutil.copy2(lab.srv.log_path, dest / "server.log")
        print(f"console screenshots and server log kept in {dest}")


def sign_in_with_link(lab: Lab, *args: str) -> None:
    lab.browser.sign_out_all()
    out = lab.srv.cli("admin", "login", *args)
    assert out.returncode == 0, out.stderr
    url = re.search(r"https://\S+/admin/sign-in/link\?token=\S+", out.stdout)
    assert url, out.stdout
    lab.page.goto(url.group(0))
    lab.browser.shot(lab.page, "sign-in-link")
    lab.page.get_by_role("button", name="Sign in").click()
    lab.page.wait_for_url(re.compile(r".*/admin/machines$"))


def check_page(lab: Lab, path: str, heading: str) -> None:
    lab.broken.clear()
    page = lab.go(path)
    page.wait_for_load_state("load")
    assert lab.broken == [], f"{path}: {lab.broken}"
    # The stylesheet applied (the focus ring below depends on it too).
    assert page.evaluate("getComputedStyle(document.querySelector('header.top'))"
                         ".borderBottomStyle") == "solid", path
    assert page.get_by_role("heading", level=1).inner_text().startswith(heading), path
    assert unlabelled_controls(page) == [], path
    missed, no_focus_ring = keyboard_gaps(page)
    assert missed == [], f"{path}: not reachable with Tab: {missed}"
    assert no_focus_ring == [], f"{path}: focus not visible on {no_focus_ring}"


# -- the tests, in order -------------------------------------------------------------------


def test_no_session_goes_to_sign_in(lab: Lab) -> None:
    lab.browser.sign_out_all()
    page = lab.go("/machines")
    assert re.search(r"/admin/sign-in\?next=", page.url), page.url
    assert "headscale admin login" in page.content()


def test_sign_in_with_link_and_walk_every_page(lab: Lab) -> None:
    sign_in_with_link(lab, "--name", "ops")
    page = lab.page
    assert "cli:ops" in page.locator("header").inner_text()
    cookie = next(c for c in lab.browser.context.cookies() if c["name"] == "pyheadscale_console")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/admin"
    rows = page.locator("table.machines tbody tr")
    wait_for("both machines listed online", lambda: (lab.go("/machines"), rows.count() == 2
             and page.locator("text=online").count() >= 2)[1], 30, 1)
    laptop_id = hsapi.node_id(lab.srv, "laptop")
    alice_id = next(u["id"] for u in lab.srv.cli_json("users", "list") if u["name"] == "alice")
    for path, heading in [("/machines", "Machines"), (f"/machines/{laptop_id}", "Machine"),
                          ("/pending", "Pending"), ("/users", "Users"),
                          (f"/users/{alice_id}", "User"), ("/keys", "Keys"),
                          ("/policy", "Access controls"), ("/policy/history", "Policy history"),
                          ("/tailnet", "Tailnet"), ("/derp", "DERP"), ("/dns", "DNS")]:
        check_page(lab, path, heading)
    # Search and filters narrow the list without JavaScript's help (plain GET forms).
    page = lab.go("/machines?q=rout")
    assert page.locator("table.machines tbody tr").count() == 1
    assert "router" in page.locator("table.machines tbody").inner_text()
    # With scripts off, the read-only pages say the same (everything is in the HTML).
    plain = lab.browser.context.new_page()
    cdp = plain.context.new_cdp_session(plain)
    cdp.send("Emulation.setScriptExecutionDisabled", {"value": True})
    plain.goto(lab.base + "/machines")
    assert plain.locator("table.machines tbody tr").count() == 2
    assert plain.locator("text=online").count() >= 2
    plain.goto(lab.base + "/tailnet")
    assert plain.locator("svg.graph .vertex").count() == 2
    plain.goto(lab.base + "/policy")
    assert plain.get_by_label(re.compile("^Policy")).is_editable()
    assert plain.locator(".editor.live").count() == 0  # our script really did not run
    assert lab.go("/policy").locator(".editor.live").count() == 1  # and runs normally
    plain.close()
    # The relay is the embedded one, and the server reaches it.
    page = lab.go("/derp")
    assert "healthy" in page.locator("section.card h2").first.inner_text()


def test_approve_a_pending_registration(lab: Lab) -> None:
    host = lab.world.topology.add_host("newcomer")
    ts = lab.world.add_client("newcomer", NEWEST, host)
    up = host.popen([str(ts.tailscale), f"--socket={ts.socket}", "up",
                     f"--login-server={lab.srv.url}", "--hostname=newcomer",
                     "--accept-dns=false", "--timeout=120s"], env=ts.env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(up.stdout or []), daemon=True).start()
    try:
        page = lab.page
        wait_for("the registration to appear", lambda: "newcomer" in lab.go("/pending")
                 .locator("main").inner_text(), 30, 1)
        card = page.locator("section.card", has_text="newcomer")
        card.get_by_label("User").select_option("bob")
        # Keyboard only: focus the button and press Enter.
        card.get_by_role("button", name="Approve").focus()
        page.keyboard.press("Enter")
        page.wait_for_load_state()
        lab.browser.shot(page, "approved")
        assert "Registered for bob" in page.locator("main").inner_text()
        assert up.wait(timeout=60) == 0, "".join(out)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    st = ts.wait_state("Running", timeout=30)
    users = {str(k): v["LoginName"] for k, v in (st.get("User") or {}).items()}
    assert users[str(st["Self"]["UserID"])] == "bob"


def test_new_user_and_key_then_a_client_joins_with_it(lab: Lab) -> None:
    page = lab.go("/users")
    page.get_by_label("Name", exact=True).fill("carol")
    page.get_by_role("button", name="Create user").click()
    page.wait_for_load_state()
    assert "User carol created" in page.locator("main").inner_text()
    page = lab.go("/keys")
    page.get_by_label("User", exact=True).select_option(label="carol")
    page.get_by_label("Reusable").check()
    page.get_by_label("Expires in", exact=True).select_option("1h")
    page.get_by_role("button", name="Create pre-auth key").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "new-key")
    key = page.get_by_label("Pre-auth key", exact=True).input_value()
    assert key.startswith("hskey-auth-")
    lab.browser.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    assert key not in lab.go("/keys").content()  # shown once
    ts = lab.world.add_client("carol-pc", NEWEST)
    r = ts.up(lab.srv.url, authkey=key, hostname="carol-pc", timeout=60)
    assert r.returncode == 0, r.stderr
    st = ts.status_json()
    assert st["BackendState"] == "Running"
    assert st["User"][str(st["Self"]["UserID"])]["LoginName"] == "carol"


def test_approve_a_route_then_the_client_reaches_the_subnet(lab: Lab) -> None:
    assert fetch(lab.laptop.host, lab.lan_host.ip) is None, "reached before approval"
    router_id = hsapi.node_id(lab.srv, "router")
    page = lab.go(f"/machines/{router_id}")
    box = page.get_by_label(re.compile(r"^192\.0\.2\.0/25"))
    assert not box.is_checked()
    box.check()
    page.get_by_role("button", name="Save routes").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "route-approved")
    assert "Routes saved" in page.locator("main").inner_text()
    # The line the API's approve_routes leaves, naming the console's signed-in user.
    assert re.search(rf'audit action=node\.routes\.approve actor=console:cli:ops '
                     rf'target="node {router_id}" routes=\S*192\.0\.2\.0/25',
                     lab.srv.log_path.read_text(errors="replace")), "no audit line"
    wait_for("the laptop to learn the route", lambda: "192.0.2.0/25" in (
        peers_by_name(lab.laptop.status_json())["router"].get("PrimaryRoutes") or []), 30)
    seen = wait_for("an answer from the LAN through the router",
                    lambda: fetch(lab.laptop.host, lab.lan_host.ip), 30)
    assert seen == lab.router.lan.gateway


POLICY_OK = """{
  // Machines of alice and bob reach each other; nothing reaches the router's LAN.
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["alice@:*", "bob@:*"]},
  ],
}
"""
POLICY_MISTAKE = POLICY_OK.replace('"bob@:*"]', '"bob@:*", "group:missing:*"]')


def test_policy_mistake_shown_at_its_line_then_a_fix_changes_reachability(lab: Lab) -> None:
    assert fetch(lab.laptop.host, lab.lan_host.ip) is not None  # allow-all so far
    page = lab.go("/policy")
    page.get_by_label(re.compile("^Policy")).fill(POLICY_MISTAKE)
    page.get_by_role("button", name="Check and review changes").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "policy-mistake")
    line = next(i for i, text in enumerate(POLICY_MISTAKE.splitlines(), 1)
                if "group:missing" in text)
    problems = page.locator("section.problems").inner_text()
    assert f"line {line}, column" in problems and "group:missing" in problems, problems
    assert page.locator("pre.excerpt .bad").inner_text().strip().startswith(str(line))
    saved = lab.srv.cli("policy", "get")
    assert saved.returncode != 0 and "not found" in saved.stderr  # nothing was stored

    page.get_by_label(re.compile("^Policy")).fill(POLICY_OK)
    page.get_by_role("button", name="Check and review changes").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "policy-review")
    assert page.locator(".d-add").count() >= 3  # the diff against "no policy"
    page.get_by_role("button", name="Apply this policy").click()
    page.wait_for_load_state()
    assert "Policy saved" in page.locator("main").inner_text()
    assert lab.srv.cli("policy", "get").stdout.strip() == POLICY_OK.strip()
    audits = re.findall(r"audit action=policy\.set actor=(\S+) target=policy "
                        r"policy_sha256=\w+ bytes=\d+",
                        lab.srv.log_path.read_text(errors="replace"))
    assert audits == ["console:cli:ops"], audits
    wait_for("the LAN to become unreachable under the new policy",
             lambda: fetch(lab.laptop.host, lab.lan_host.ip, timeout=2) is None, 30)
    # The picture of the tailnet follows the running policy.
    edges = lab.go("/tailnet").locator("table.edges tbody").inner_text()
    assert re.search(r"laptop\s+router\s+all", edges), edges
    history = lab.go("/policy/history").locator("table tbody tr")
    assert history.count() == 1 and "running" in history.first.inner_text()


def test_extra_dns_record_reaches_the_clients(lab: Lab) -> None:
    name = f"svc.{BASE_DOMAIN}"
    page = lab.go("/dns")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Type").select_option("A")
    page.get_by_label("Address").fill("100.64.50.7")
    page.get_by_role("button", name="Add record").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "dns-added")
    assert "Records saved" in page.locator("main").inner_text()
    wait_for("the laptop to resolve the new record",
             lambda: dns(lab.laptop.host, name) == ["100.64.50.7"], 20, 1)
    page.get_by_role("button", name=f"Remove {name} 100.64.50.7").click()
    page.wait_for_load_state()
    wait_for("the record to be gone", lambda: dns(lab.laptop.host, name) != ["100.64.50.7"],
             20, 1)


def test_expire_a_node_and_the_client_needs_login(lab: Lab) -> None:
    newcomer = lab.world.nodes["newcomer"]
    node_id = hsapi.node_id(lab.srv, "newcomer")
    # A second tab keeps the machine list open: its script updates the state in place.
    listing = lab.browser.context.new_page()
    listing.goto(lab.base + "/machines")
    status = listing.locator(f'tr[data-node-id="{node_id}"] [data-field="status"]')
    assert status.inner_text() == "online"
    page = lab.go(f"/machines/{node_id}")
    page.get_by_role("button", name="Expire key now").click()
    page.wait_for_load_state()
    lab.browser.shot(page, "expired")
    assert "Key expired" in page.locator("main").inner_text()
    newcomer.wait_state("NeedsLogin", timeout=60)
    wait_for("the open list to show the node expired", lambda: status.inner_text() == "expired",
             20, 1)
    listing.close()


def test_oidc_sign_in(lab: Lab) -> None:
    for account, allowed in ((OUTSIDER, False), (ADMIN, True)):
        lab.browser.sign_out_all()
        page = lab.go("/sign-in")
        page.get_by_role("link", name="Sign in with your identity provider").click()
        page.locator("input[name=login]").fill(account.sub)
        page.locator("input[name=password]").fill(account.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()
        lab.browser.shot(page, f"oidc-{account.sub}")
        if allowed:
            page.wait_for_url(re.compile(r".*/admin/machines$"))
            assert f"oidc:{ADMIN.email}" in page.locator("header").inner_text()
        else:
            assert "may not use the admin console" in page.locator("main").inner_text()


def test_cross_site_post_without_token_is_refused(lab: Lab) -> None:
    sign_in_with_link(lab)
    page = lab.page
    before = {u["name"] for u in lab.srv.cli_json("users", "list")}
    # A page of another site (served from the admin's own host) posts a form at the console
    # while the admin is signed in, as a hostile site would.
    site = lab.workdir / "hostile"
    site.mkdir(exist_ok=True)
    (site / "index.html").write_text(
        f'<!DOCTYPE html><title>hostile</title><form method="post" action="{lab.base}/users">'
        '<input name="name" value="mallory"></form><script>document.forms[0].submit()</script>')
    lab.admin_host.popen([sys.executable, "-m", "http.server", "8081", "--bind",
                          lab.admin_host.ip, "--directory", str(site)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("the hostile site", lambda: http_get_from(
        lab.admin_host, f"http://{lab.admin_host.ip}:8081/")[0] == 200, 15)
    with page.expect_response(lambda r: r.url.endswith("/admin/users")) as answer:
        page.goto(f"http://{lab.admin_host.ip}:8081/")
    assert answer.value.status == 403
    lab.browser.shot(page, "cross-site")
    assert {u["name"] for u in lab.srv.cli_json("users", "list")} == before


def test_auditor_sees_everything_and_changes_nothing(lab: Lab) -> None:
    sign_in_with_link(lab, "--role", "auditor", "--name", "audrey")
    page = lab.page
    assert "auditor" in page.locator("header").inner_text()
    assert page.get_by_role("button", name="Create user").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    before = (lab.srv.cli_json("users", "list"), hsapi.nodes(lab.srv),
              lab.srv.cli("policy", "get").stdout)
    form = {"csrf": csrf or "", "name": "x", "confirm": "yes", "user": "alice",
            "route": "exit", "tags": "tag:x", "expiry": "1d", "policy": POLICY_MISTAKE,
            "auth_id": "hskey-authreq-000000000000000000000000"}
    for path in MUTATING:
        # fetch() from the page: the request leaves from the browser, inside the namespace.
        status = page.evaluate("""async ([url, form]) => (await fetch(url, {method: "POST",
            body: new URLSearchParams(form), redirect: "manual"})).status""",
                               [lab.base + path, form])
        assert status == 403, path
    after = (lab.srv.cli_json("users", "list"), hsapi.nodes(lab.srv),
             lab.srv.cli("policy", "get").stdout)
    assert [u["name"] for u in after[0]] == [u["name"] for u in before[0]]
    assert [(n["id"], n["givenName"], n["expiry"], n["approvedRoutes"]) for n in after[1]] == \
        [(n["id"], n["givenName"], n["expiry"], n["approvedRoutes"]) for n in before[1]]
    assert after[2] == before[2]


def test_sign_out_ends_the_session(lab: Lab) -> None:
    sign_in_with_link(lab)
    page = lab.page
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/admin/sign-in\?m=.*"))
    assert "/admin/sign-in" in lab.go("/machines").url
