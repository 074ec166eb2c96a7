"""ACME bookkeeping without a CA: renewal timing, the autocert-layout cache, the HTTP-01
listener's answers and the tls-alpn-01 challenge.  Issuance itself runs against Pebble in
tests/integration/test_acme.py."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import josepy as jose
import pytest
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from derp.frontdoor import RequestHead
from pyheadscale.config.checks import parse_listen
from pyheadscale.letsencrypt import (
    TLSALPN01,
    AcmeManager,
    AcmeSettings,
    _pem_key,
    renew_at,
)
from pyheadscale.servertls import ServerTLS

NAME = "hs.example.com"


def _cert(name: str, start: dt.datetime, lifetime: dt.timedelta
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _manager(tmp_path: Path) -> AcmeManager:
    return AcmeManager(AcmeSettings(
        hostname=NAME, challenge="HTTP-01", directory_url="https://ca.invalid/dir", email="",
        cache_dir=tmp_path, http_listen=":http", server_url=f"https://{NAME}:8443"), ServerTLS())


def test_renew_at() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    _, ninety = _cert(NAME, now, dt.timedelta(days=90))
    assert renew_at(ninety) == now + dt.timedelta(days=60)  # 30 days before the end
    _, short = _cert(NAME, now, dt.timedelta(seconds=60))
    assert renew_at(short) == now + dt.timedelta(seconds=40)  # a third of the lifetime


def test_cache_in_autocert_layout(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    key, cert = _cert(NAME, now - dt.timedelta(hours=1), dt.timedelta(days=90))
    (tmp_path / NAME).write_bytes(_pem_key(key) + cert.public_bytes(serialization.Encoding.PEM))
    m = _manager(tmp_path)
    assert m._load_cached() == cert
    m._install(cert)
    assert m.tls.current is not None
    # Due for renewal but valid: served until the new one arrives.
    due_key, due = _cert(NAME, now - dt.timedelta(days=80), dt.timedelta(days=90))
    (tmp_path / NAME).write_bytes(_pem_key(due_key) + due.public_bytes(serialization.Encoding.PEM))
    assert m._load_cached() == due and renew_at(due) < now
    # Expired, for another name, or unreadable: not used.
    for c_key, c in (_cert(NAME, now - dt.timedelta(days=91), dt.timedelta(days=90)),
                     _cert("other.example.com", now, dt.timedelta(days=90))):
        (tmp_path / NAME).write_bytes(_pem_key(c_key) + c.public_bytes(serialization.Encoding.PEM))
        assert m._load_cached() is None
    (tmp_path / NAME).write_bytes(b"garbage")
    assert m._load_cached() is None


def test_account_key_created_once(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    k1 = m._account_key()
    assert (tmp_path / "acme_account+key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "acme_account+key").read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY")
    assert m._account_key().private_numbers() == k1.private_numbers()


def _head(target: str) -> RequestHead:
    return RequestHead("GET", target, "1.1", (("host", NAME),), ("192.0.2.9", 1234), False)


def test_http01_listener_answers(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    m.http_tokens["tok"] = "tok.thumb"
    r = m._http01_route(_head("/.well-known/acme-challenge/tok"))
    assert (r.status, r.body) == (200, b"tok.thumb")
    assert m._http01_route(_head("/.well-known/acme-challenge/other")).status == 404
    r = m._http01_route(_head("/ts2021?x=1"))
    assert r.status == 302 and dict(r.headers)["Location"] == f"https://{NAME}:8443/ts2021?x=1"


def test_tls_alpn01_challenge_certificate(tmp_path: Path) -> None:
    account = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    chall = challenges.Challenge.from_json({"type": "tls-alpn-01", "token": "a" * 43})
    assert isinstance(chall, TLSALPN01)
    digest = chall.validation(account)
    assert digest == hashlib.sha256(chall.key_authorization(account).encode()).digest()
    assert chall.response(account).to_partial_json() == {}  # RFC 8555: the answer is {}
    ctx = _manager(tmp_path)._alpn_context(NAME, digest)
    assert ctx is not None
    assert not list(tmp_path.iterdir())  # the temporary PEM is gone


@pytest.mark.parametrize(("addr", "want"), [
    (":http", ("", 80)), ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("[::]:https", ("::", 443))])
def test_parse_listen(addr: str, want: tuple[str, int]) -> None:
    assert parse_listen(addr) == want


@pytest.mark.parametrize("addr", ["80", ":no-such-service", ""])
def test_parse_listen_refuses(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(addr)
