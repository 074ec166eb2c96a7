"""A real OpenID Connect provider for the OIDC tests: `python -m tests.integration.idp`.

We run panva's OpenID-certified `oidc-provider` (npm) under node with a small script (embedded
below) that adds a password login form and grants consent for the one first-party client.
Dex was the first choice, but it cannot be built with `go install <module>@<version>`: its
releases are not semantic-import-versioned (v2 tags on a v0/v1 module path) and its go.mod
carries a `replace` directive, which `go install` refuses.

The package is installed once per version into <cache>/oidc-provider/<version>/ (the cache is
$PYHEADSCALE_CACHE or ~/.cache/pyheadscale), first into a temporary directory that is renamed
into place only when the install worked, so an interrupted install never leaves a broken cache.
A missing node/npm raises IdPUnavailable: the tests fail, they never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.buildutil import file_lock
from tests.integration import versions
from tests.integration.procs import terminate
from tests.netutil import free_port

OIDC_PROVIDER_VERSION = "9.13.3"
READY = "IDP-READY"


class IdPUnavailable(RuntimeError):
    """The OpenID provider could not be installed or started."""


def idp_dir(version: str = OIDC_PROVIDER_VERSION) -> Path:
    return versions.cache_dir() / "oidc-provider" / version


def _installed(vdir: Path, version: str) -> bool:
    pkg = vdir / "node_modules" / "oidc-provider" / "package.json"
    try:
        return json.loads(pkg.read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def ensure(version: str = OIDC_PROVIDER_VERSION, log: Any = sys.stderr) -> Path:
    """Install oidc-provider@version into the cache (once) and write the server script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise IdPUnavailable("node and npm are needed for the OpenID provider used by the "
                             "OIDC tests (install Node >= 20 and npm)")
    vdir = idp_dir(version)
    if not _installed(vdir, version):
        with file_lock(vdir.parent, ".install.lock"):
            if not _installed(vdir, version):
                print(f"installing oidc-provider@{version} into {vdir}", file=log, flush=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=vdir.parent))
                try:
                    res = subprocess.run(
                        [npm, "install", "--no-audit", "--no-fund", "--no-save",
                         "--prefix", str(tmp), f"oidc-provider@{version}"],
                        capture_output=True, text=True, timeout=600, check=False)
                    if res.returncode != 0 or not _installed(tmp, version):
                        raise IdPUnavailable(f"npm install oidc-provider@{version} failed:\n"
                                             f"{(res.stderr or res.stdout).strip()[-2000:]}")
                    shutil.rmtree(vdir, ignore_errors=True)
                    os.replace(tmp, vdir)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    script = server_script(vdir)
    if not script.exists() or script.read_text() != SERVER_JS:
        # Named by content and replaced atomically: test runs with another version of this
        # file may share the cache at the same time, and node must never read half a script.
        tmp = script.with_name(f".{script.name}.{os.getpid()}.tmp")
        tmp.write_text(SERVER_JS)
        os.replace(tmp, script)
    return vdir


def server_script(vdir: Path) -> Path:
    """The provider script inside the install (node resolves `oidc-provider` next to it)."""
    return vdir / f"idp-server-{hashlib.sha256(SERVER_JS.encode()).hexdigest()[:12]}.mjs"


@dataclass
class Account:
    """A login at the provider and the claims it releases (scope-gated, as OIDC says)."""

    sub: str
    password: str
    email: str = ""
    email_verified: bool = True
    name: str = ""
    preferred_username: str = ""
    picture: str = ""
    groups: list[str] = field(default_factory=list)

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sub": self.sub}
        for k in ("email", "name", "preferred_username", "picture"):
            if getattr(self, k):
                out[k] = getattr(self, k)
        if self.email:
            out["email_verified"] = self.email_verified
        if self.groups:
            out["groups"] = list(self.groups)
        return out


class OpenIDProvider:
    """oidc-provider running under node on 127.0.0.1, for one test (or module).

    `issuer` may differ from the listening address when a test puts a proxy in front
    (the provider builds every URL it hands out from its issuer). `listen_host` is the
    address it binds (e.g. a topology host's address, with `start(popen=host.popen)` running
    it inside that host's namespace).
    """

    def __init__(self, workdir: Path, accounts: list[Account], *, client_id: str,
                 client_secret: str, redirect_uris: list[str], port: int | None = None,
                 issuer: str | None = None, id_token_ttl: int = 3600,
                 claims_in_id_token: bool = True, listen_host: str = "127.0.0.1",
                 require_pkce: bool = False) -> None:
        self.vdir = ensure()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.listen_host = listen_host
        self.issuer = issuer or f"http://{listen_host}:{self.port}"
        self.accounts = {a.sub: a for a in accounts}
        self.client_id = client_id
        self.client_secret = client_secret
        self.log_path = self.workdir / "idp.log"
        conf = {
            "port": self.port,
            "host": self.listen_host,
            "issuer": self.issuer,
            "cookie_key": secrets.token_hex(16),
            "id_token_ttl": id_token_ttl,
            # false: claims travel in the ID token; true: only sub, the rest from UserInfo.
            "conform_id_token_claims": not claims_in_id_token,
            # true: an authorization request without a code_challenge is refused.
            "require_pkce": require_pkce,
            "clients": [{
                "client_id": client_id, "client_secret": client_secret,
                "redirect_uris": redirect_uris, "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
            }],
            "accounts": {a.sub: {"password": a.password, "claims": a.claims()}
                         for a in accounts},
        }
        self.conf = conf
        self.conf_path = self.workdir / "idp.json"
        self.conf_path.write_text(json.dumps(conf))
        self.proc: subprocess.Popen[bytes] | None = None

    def set_account(self, account: Account) -> None:
        """Add or change an account; the provider reads it at the next login."""
        self.accounts[account.sub] = account
        self.conf["accounts"][account.sub] = {"password": account.password,
                                              "claims": account.claims()}
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.conf))
        os.replace(tmp, self.conf_path)

    def start(self, timeout: float = 30,
              popen: Callable[..., subprocess.Popen[bytes]] | None = None) -> OpenIDProvider:
        """Start node (through `popen`, e.g. a topology Host's, to run it in a namespace)."""
        node = shutil.which("node")
        if node is None:
            raise IdPUnavailable("node is not installed")
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = (popen or subprocess.Popen)(
            [node, str(server_script(self.vdir)), str(self.conf_path)],
            cwd=str(self.vdir), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(READY.encode()):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise IdPUnavailable(f"OpenID provider did not start; log:\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> OpenIDProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The provider script. Scopes gate claims (email -> email, email_verified; profile -> name,
# preferred_username, picture; groups -> groups). Login is a plain HTML form posting
# `login` and `password`; consent is granted automatically for the configured client.
SERVER_JS = r"""
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const conf = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'idp-rs256', use: 'sig', alg: 'RS256' };

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (uid, error) => `<!DOCTYPE html><html><head><title>Sign in</title></head><body>
<h1>Sign in</h1>${error ? `<p class="error">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login">
<input name="login" autofocus><input name="password" type="password">
<button type="submit">Sign in</button></form></body></html>`;

const provider = new Provider(conf.issuer, {
  clients: conf.clients,
  jwks: { keys: [jwk] },
  cookies: { keys: [conf.cookie_key] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'picture'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  conformIdTokenClaims: conf.conform_id_token_claims,
  features: { devInteractions: { enabled: false } },
  pkce: { required: () => conf.require_pkce === true },
  ttl: {
    IdToken: conf.id_token_ttl, AccessToken: 3600, AuthorizationCode: 60,
    Interaction: 600, Session: 3600, Grant: 3600,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => {
    // Re-read so a test can change a user's claims (e.g. groups) between logins.
    const acc = JSON.parse(readFileSync(process.argv[2], 'utf8')).accounts[id];
    if (!acc) return undefined;
    return { accountId: id, claims: async () => ({ ...acc.claims }) };
  },
});

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) { size += c.length; if (size > 8192) break; chunks.push(c); }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function grantFor(details, accountId) {
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: details.params.client_id });
  const missing = (details.prompt && details.prompt.details) || {};
  grant.addOIDCScope(
    (missing.missingOIDCScope || []).join(' ') || String(details.params.scope || 'openid'));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  return grant.save();
}

provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!m) return next();
  ctx.set('cache-control', 'no-store');
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (ctx.method === 'GET' && details.prompt.name === 'consent') {
    const grantId = await grantFor(details, details.session.accountId);
    ctx.redirect(await provider.interactionResult(ctx.req, ctx.res,
      { consent: { grantId } }, { mergeWithLastSubmission: true }));
    return;
  }
  if (ctx.method === 'GET') { ctx.type = 'html'; ctx.body = page(details.uid); return; }
  if (ctx.method === 'POST' && m[2]) {
    const form = await readForm(ctx.req);
    const accounts = JSON.parse(readFileSync(process.argv[2], 'utf8')).accounts;
    const acc = Object.hasOwn(accounts, form.get('login') || '') ? accounts[form.get('login')] : null;
    if (!acc || acc.password !== form.get('password')) {
      ctx.status = 401; ctx.type = 'html';
      ctx.body = page(details.uid, 'Invalid login or password');
      return;
    }
    const accountId = form.get('login');
    const grantId = await grantFor(details, accountId);
    ctx.redirect(await provider.interactionResult(ctx.req, ctx.res,
      { login: { accountId }, consent: { grantId } }, { mergeWithLastSubmission: false }));
    return;
  }
  ctx.status = 405;
});

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message));

const server = http.createServer(provider.callback());
server.listen(conf.port, conf.host || '127.0.0.1', () => console.log(`IDP-READY ${conf.issuer}`));
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
"""


# A scripted browser for tests with official clients: run with the harness's Python inside a
# namespace, it follows the register URL to the provider, signs in on its form, and (unless
# told not to) posts our confirmation form with the CSRF field, keeping cookies throughout.
# Extra URLs are opened first like other tabs (each only up to its first redirect) before the
# first URL's login is carried on. It prints one JSON object: {"redirects": [where each URL
# sent the browser], "login": {status, url, text}, "confirm": {status, text}}.
BROWSER_SNIPPET = r"""
import asyncio, json, re, ssl, sys
import aiohttp
from yarl import URL

async def main(auth_url, login, password, ca, do_confirm, tabs):
    ctx = ssl.create_default_context(cafile=ca) if ca else True
    out = {"redirects": []}
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for IP-literal hosts
    async with aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        for tab in [auth_url, *tabs]:
            async with s.get(tab, allow_redirects=False) as r:
                out["redirects"].append(r.headers.get("Location", ""))
        first = out["redirects"][0]
        url, method, data = (URL(auth_url).join(URL(first)) if first else URL(auth_url)), "GET", None
        for _ in range(20):
            async with s.request(method, url, data=data, allow_redirects=False) as r:
                text = await r.text()
                if r.status in (301, 302, 303, 307):
                    url, method, data = r.url.join(URL(r.headers["Location"])), "GET", None
                    continue
                m = re.search(r'action="(/interaction/[^"]+/login)"', text)
                if r.status == 200 and m:
                    url, method = r.url.join(URL(m.group(1))), "POST"
                    data = {"login": login, "password": password}
                    continue
                out["login"] = {"status": r.status, "url": str(r.url), "text": text}
                break
        else:
            sys.exit("too many redirects")
        page = out["login"]["text"]
        action = re.search(r'<form method="POST" action="([^"]+)"', page)
        field = re.search(r'<input type="hidden" name="([^"]+)" value="([^"]+)"', page)
        if do_confirm and out["login"]["status"] == 200 and action and field:
            async with s.post(url.join(URL(action.group(1))),
                              data={field.group(1): field.group(2)},
                              allow_redirects=False) as r:
                out["confirm"] = {"status": r.status, "text": await r.text()}
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1",
                 sys.argv[6:]))
"""


@dataclass
class BrowserResult:
    """What the scripted browser saw: the page after sign-in, then the confirmation answer."""

    login_status: int
    login_url: str
    login_page: str
    confirm_status: int | None = None
    confirm_page: str = ""
    redirects: list[str] = field(default_factory=list)  # where each opened URL sent it


def browser_login(host: Any, auth_url: str, account: Account, *,
                  ca_file: str | os.PathLike[str] | None = None, confirm: bool = True,
                  timeout: float = 60, other_tabs: Sequence[str] = ()) -> BrowserResult:
    """Sign `account` in from `auth_url` with a scripted browser inside `host`'s namespace
    (a tests.integration.netns Host); `ca_file` verifies the control server's TLS.
    `other_tabs` are opened (to their first redirect) in the same browser before the login."""
    from tests.integration.server import VENV_PYTHON  # the venv has aiohttp

    r = host.run([str(VENV_PYTHON), "-c", BROWSER_SNIPPET, auth_url, account.sub,
                  account.password, str(ca_file or ""), "1" if confirm else "0", *other_tabs],
                 timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"scripted browser failed ({r.returncode}): {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res = BrowserResult(out["login"]["status"], out["login"]["url"], out["login"]["text"],
                        redirects=out["redirects"])
    if "confirm" in out:
        res.confirm_status, res.confirm_page = out["confirm"]["status"], out["confirm"]["text"]
    return res


def main() -> int:
    try:
        vdir = ensure()
    except IdPUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok oidc-provider {OIDC_PROVIDER_VERSION}: {vdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
