"""ACME certificates for the main listener (``tls_letsencrypt_*``, ``acme_url``, ``acme_email``).

The protocol is certbot's ``acme`` library (EFF/Let's Encrypt maintain it with certbot; it
implements RFC 8555 on ``cryptography``); we add the scheduling Go's autocert does for
Headscale and the TLS-ALPN-01 challenge (RFC 8737), which ``acme`` 5 no longer ships.  Its
client is synchronous, so each issuance runs in a worker thread.

* The cache directory has Go autocert's layout, so a Headscale cache can be reused:
  ``acme_account+key`` (the account's EC key) and ``<hostname>`` (the certificate's EC key
  followed by its chain, PEM).  A cached, unexpired certificate for the host is served at
  start-up; the CA is contacted only when it is due for renewal.
* Renewal: when a third of the certificate's lifetime is left (at most 30 days before it
  ends, autocert's RenewBefore), without a restart; failures retry with back-off.
* HTTP-01: ``tls_letsencrypt_listen`` (default ``:http``) answers
  ``/.well-known/acme-challenge/<token>`` and redirects everything else to server_url.
* TLS-ALPN-01: the main listener answers ``acme-tls/1`` handshakes for the host with the
  challenge certificate (``servertls``); it must be reachable on port 443.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from derp.frontdoor import TEXT, FrontDoor, Reply, RequestHead
from pyheadscale.config.checks import parse_listen
from pyheadscale.servertls import ServerTLS
from pyheadscale.startup import failing_key

log = logging.getLogger("pyheadscale.acme")

ACCOUNT_FILE = "acme_account+key"
HTTP01_PREFIX = "/.well-known/acme-challenge/"
RENEW_BEFORE_MAX = dt.timedelta(days=30)
ISSUE_TIMEOUT = dt.timedelta(minutes=3)
RETRY_MIN, RETRY_MAX = 5.0, 3600.0
# RFC 8737 section 3: the acmeIdentifier extension of the challenge certificate.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class AcmeError(RuntimeError):
    """The CA refused or could not be reached; the message says which step failed."""


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 tls-alpn-01 response (the POST body is ``{}``, like every RFC 8555 answer)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737 tls-alpn-01: prove control by a certificate served for ``acme-tls/1``."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> bytes:
        """SHA-256 of the key authorization, the acmeIdentifier extension's content."""
        return hashlib.sha256(self.key_authorization(account_key).encode()).digest()


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    hostname: str
    challenge: str  # "HTTP-01" or "TLS-ALPN-01"
    directory_url: str
    email: str
    cache_dir: Path
    http_listen: str  # tls_letsencrypt_listen
    server_url: str


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    # SEC1 "EC PRIVATE KEY", as autocert writes it.
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with a 0600 file (a reader never sees half a key)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def renew_at(cert: x509.Certificate) -> dt.datetime:
    """When to replace ``cert``: a third of its lifetime before the end, at most 30 days."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return end - min(RENEW_BEFORE_MAX, (end - start) / 3)


class AcmeManager:
    """Obtains, caches and renews the certificate of ``settings.hostname`` into ``tls``."""

    def __init__(self, settings: AcmeSettings, tls: ServerTLS) -> None:
        self.s = settings
        self.tls = tls
        self.cert_file = settings.cache_dir / settings.hostname
        self.cert: x509.Certificate | None = None
        self.http_tokens: dict[str, str] = {}  # token -> key authorization (HTTP-01)
        self.issued = 0  # certificates obtained by this process (logs and tests)
        self._task: asyncio.Task[None] | None = None
        self._http: asyncio.base_events.Server | None = None

    # -- start-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Use a cached certificate if one is good, start the HTTP-01 listener, and keep the
        certificate renewed in the background (the first issuance too)."""
        with failing_key("tls_letsencrypt_cache_dir", f"cannot create {self.s.cache_dir}"):
            self.s.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cached = self._load_cached()
        if cached is not None:
            self._install(cached)
            log.info("using the cached certificate for %s (valid until %s)",
                     self.s.hostname, cached.not_valid_after_utc.isoformat())
        if self.s.challenge == "HTTP-01":
            host, port = parse_listen(self.s.http_listen)
            with failing_key("tls_letsencrypt_listen", f"cannot listen on {self.s.http_listen}"):
                self._http = await asyncio.get_running_loop().create_server(
                    lambda: FrontDoor(self._http01_route), host or None, port,
                    reuse_address=True)
        self._task = asyncio.get_running_loop().create_task(self._keep_renewed())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._http is not None:
            self._http.close()

    def _load_cached(self) -> x509.Certificate | None:
        try:
            pem = self.cert_file.read_bytes()
            cert = x509.load_pem_x509_certificate(pem)  # the first certificate: the leaf
            serialization.load_pem_private_key(pem, None)
        except (OSError, ValueError):
            return None
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName) \
            .value.get_values_for_type(x509.DNSName)
        if self.s.hostname not in names:
            log.info("cached certificate is for %s, not %s: obtaining a new one",
                     names, self.s.hostname)
            return None
        if dt.datetime.now(dt.UTC) >= cert.not_valid_after_utc:
            return None
        return cert  # served until its replacement arrives, even when already due

    def _install(self, cert: x509.Certificate) -> None:
        self.tls.use(self.cert_file)
        self.cert = cert

    # -- renewal ----------------------------------------------------------------------------

    async def _keep_renewed(self) -> None:
        failures = 0
        while True:
            if self.cert is not None:
                wait = (renew_at(self.cert) - dt.datetime.now(dt.UTC)).total_seconds()
                if wait > 0:
                    await asyncio.sleep(min(wait, 86400.0))
                    continue
            try:
                chain = await asyncio.to_thread(self._issue)
            except Exception as e:  # every failure is retried; the log says why
                failures += 1
                delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(failures, 10))
                log.error("ACME: obtaining a certificate for %s failed (attempt %d, retry in "
                          "%.0fs): %s", self.s.hostname, failures, delay, e)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.issued += 1
            cert = x509.load_pem_x509_certificate(chain)
            self._install(cert)
            log.info("ACME: new certificate for %s (serial %x, valid until %s, renewal at %s)",
                     self.s.hostname, cert.serial_number, cert.not_valid_after_utc.isoformat(),
                     renew_at(cert).isoformat())

    # -- one issuance (worker thread) -----------------------------------------------------

    def _account_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.s.cache_dir / ACCOUNT_FILE
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_private(path, _pem_key(key))
            return key
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"{path} is not an EC private key")
        return key

    def _client(self, jwk: JWK) -> client.ClientV2:
        # requests verifies the CA's TLS with certifi, or SSL_CERT_FILE as Go programs do.
        verify: Any = os.environ.get("SSL_CERT_FILE") or True
        net = client.ClientNetwork(jwk, alg=ES256, verify_ssl=verify,
                                   user_agent="pyheadscale")
        try:
            directory = client.ClientV2.get_directory(self.s.directory_url, net)
        except Exception as e:
            raise AcmeError(f"reading the ACME directory {self.s.directory_url}: {e}") from e
        acme = client.ClientV2(directory, net)
        reg = messages.NewRegistration.from_data(email=self.s.email or None,
                                                 terms_of_service_agreed=True)
        try:
            acme.new_account(reg)
        except errors.ConflictError as e:  # the key already has an account: use it
            acme.query_registration(messages.RegistrationResource(
                uri=e.location, body=messages.Registration()))
        return acme

    def _issue(self) -> bytes:
        """Order, prove and download a certificate; store it in the cache; return the chain."""
        jwk = JWKEC(key=self._account_key())
        acme = self._client(jwk)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = crypto_util.make_csr(_pem_key(key), [self.s.hostname])
        order = acme.new_order(csr)
        want = "http-01" if self.s.challenge == "HTTP-01" else "tls-alpn-01"
        answered: list[str] = []
        try:
            for authz in order.authorizations:
                challb = next((c for c in authz.body.challenges if c.chall.typ == want), None)
                if challb is None:
                    raise AcmeError(f"the CA offers no {want} challenge for "
                                    f"{authz.body.identifier.value}")
                chall = challb.chall
                assert isinstance(chall, challenges.KeyAuthorizationChallenge)
                if isinstance(chall, TLSALPN01):
                    name = authz.body.identifier.value
                    self.tls.alpn_challenges[name] = self._alpn_context(
                        name, chall.validation(jwk))
                    answered.append(name)
                else:
                    token = chall.encode("token")
                    self.http_tokens[token] = chall.key_authorization(jwk)
                    answered.append(token)
                log.info("ACME: answering the %s challenge for %s", want,
                         authz.body.identifier.value)
                acme.answer_challenge(challb, chall.response(jwk))
            deadline = dt.datetime.now() + ISSUE_TIMEOUT
            try:
                order = acme.poll_and_finalize(order, deadline)
            except errors.ValidationError as e:
                raise AcmeError(f"the CA could not validate {want}: "
                                f"{[a.body.challenges for a in e.failed_authzrs]}") from e
        finally:
            for k in answered:
                self.http_tokens.pop(k, None)
                self.tls.alpn_challenges.pop(k, None)
        chain = order.fullchain_pem.encode()
        _write_private(self.cert_file, _pem_key(key) + chain)
        return chain

    def _alpn_context(self, name: str, digest: bytes) -> ssl.SSLContext:
        """An ``acme-tls/1`` context serving the RFC 8737 self-signed challenge certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                .add_extension(x509.UnrecognizedExtension(
                    ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
                .sign(key, hashes.SHA256()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_alpn_protocols(["acme-tls/1"])
        with tempfile.TemporaryDirectory(dir=self.s.cache_dir) as d:
            pem = Path(d) / "challenge.pem"
            pem.write_bytes(_pem_key(key) + cert.public_bytes(serialization.Encoding.PEM))
            ctx.load_cert_chain(str(pem))
        return ctx

    # -- HTTP-01 ----------------------------------------------------------------------------

    def _http01_route(self, head: RequestHead) -> Reply:
        if head.path.startswith(HTTP01_PREFIX):
            auth = self.http_tokens.get(head.path[len(HTTP01_PREFIX):])
            if auth is None:
                return Reply(404, b"no such challenge\n", TEXT)
            return Reply(200, auth.encode(), (("Content-Type", "text/plain"),))
        # Headscale's redirect: server_url followed by the request's URI.
        return Reply(302, headers=(("Location", self.s.server_url.rstrip("/") + head.origin),))
