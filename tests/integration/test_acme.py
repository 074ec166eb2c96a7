"""ACME against a real ACME server (Let's Encrypt's Pebble) with official clients.

pyheadscale gets its certificate for hs.acme.test from Pebble (HTTP-01 on port 80, or
TLS-ALPN-01 on 443), official clients of the oldest and newest pinned versions join and ping
over it trusting only Pebble's root, a restart reuses the cached certificate, and a
short-lived certificate is renewed while the server and its clients keep running.  The
embedded relay is on the main listener, so DERP uses the ACME certificate too.
"""

from __future__ import annotations

import base64
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.integration.derp_helpers import Tailnet, ping_paths, wait_peer
from tests.integration.netns import Host, Topology
from tests.integration.pebble import Pebble, PebbleError
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST, OLDEST

pytestmark = pytest.mark.integration

NAME = "hs.acme.test"

_CERT_SNIPPET = """
import base64, socket, ssl, sys
ip, name, ca = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((ip, 443), timeout=10) as s:
    with ctx.wrap_socket(s, server_hostname=name) as t:
        print(base64.b64encode(t.getpeercert(binary_form=True)).decode())
"""


def served_cert(host: Host, ip: str, ca: Path) -> x509.Certificate:
    """The certificate the server presents for NAME, verified against `ca` (Pebble's root)."""
    res = host.run([sys.executable, "-c", _CERT_SNIPPET, ip, NAME, str(ca)], timeout=30)
    assert res.returncode == 0, res.stderr
    return x509.load_der_x509_certificate(base64.b64decode(res.stdout.strip()))


class AcmeLab:
    """Pebble, pyheadscale with tls_letsencrypt_* pointing at it, and hosts that resolve NAME."""

    def __init__(self, topology: Topology, workdir: Path, challenge: str,
                 validity: int = 7776000) -> None:
        self.topology = topology
        self.server_host = topology.add_server_host()
        self.acme_host = topology.add_host("acme")
        try:
            self.pebble = Pebble(self.acme_host, workdir / "pebble",
                                 answer_ip=self.server_host.ip, validity=validity)
        except PebbleError as exc:
            pytest.fail(str(exc), pytrace=False)
        self.trust = self.pebble.trust_bundle(workdir / "trust.pem")
        topology.set_hosts_file(self.server_host, {NAME: self.server_host.ip})
        self.cache = workdir / "acme-cache"
        overrides: dict[str, Any] = {
            "server_url": f"https://{NAME}", "listen_addr": "0.0.0.0:443",
            "tls_letsencrypt_hostname": NAME, "tls_letsencrypt_challenge_type": challenge,
            "tls_letsencrypt_listen": ":http", "tls_letsencrypt_cache_dir": str(self.cache),
            "acme_url": self.pebble.directory_url, "acme_email": "admin@acme.test",
        }
        # The ACME client trusts Pebble's API through SSL_CERT_FILE, as Go's would.
        self.tn = Tailnet(self.server_host, workdir / "tn", overrides=overrides, tls=False,
                          client_ca=self.trust, env={"SSL_CERT_FILE": str(self.trust)},
                          start_timeout=90)

    def client_host(self, name: str) -> Host:
        host = self.topology.add_host(name)
        self.topology.set_hosts_file(host, {NAME: self.server_host.ip})
        return host

    def cert(self) -> x509.Certificate:
        return served_cert(self.server_host, self.server_host.ip, self.pebble.root_file)

    def close(self) -> None:
        self.tn.close()


@pytest.fixture
def acme_lab(topology: Topology, workdir: Path) -> Iterator[Callable[..., AcmeLab]]:
    made: list[AcmeLab] = []

    def make(challenge: str, **kw: Any) -> AcmeLab:
        lab = AcmeLab(topology, workdir, challenge, **kw)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


def _join_pair(lab: AcmeLab, factory: Callable[..., Tailscaled]
               ) -> tuple[Tailscaled, Tailscaled, str, str]:
    a = factory(lab.client_host("a"), OLDEST, ssl_cert_file=lab.pebble.root_file)
    b = factory(lab.client_host("b"), NEWEST, ssl_cert_file=lab.pebble.root_file)
    ip_a, ip_b = lab.tn.join(a), lab.tn.join(b)
    for src, dst in ((a, ip_b), (b, ip_a)):
        wait_peer(src, dst)
        paths, out = ping_paths(src, dst, count=2)
        assert paths, out
    return a, b, ip_a, ip_b


def test_http01_join_ping_and_restart_reuses_the_cache(
    acme_lab: Callable[..., AcmeLab], tailscaled_factory: Callable[..., Tailscaled]
) -> None:
    lab = acme_lab("HTTP-01")
    cert = lab.cert()
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName) \
        .value.get_values_for_type(x509.DNSName) == [NAME]
    assert "Pebble" in cert.issuer.rfc4514_string(), cert.issuer
    assert (lab.cache / NAME).exists() and (lab.cache / "acme_account+key").exists()
    a, b, ip_a, ip_b = _join_pair(lab, tailscaled_factory)

    lab.tn.server.restart(timeout=60)
    assert lab.cert().serial_number == cert.serial_number  # the cached one, not a new order
    log = lab.tn.server.log_text()
    assert log.count("using the cached certificate for " + NAME) == 1, log[-3000:]
    assert log.count("ACME: new certificate") == 1, log[-3000:]
    assert f"answering the http-01 challenge for {NAME}" in log, log[-3000:]
    for src, dst in ((a, ip_b), (b, ip_a)):
        paths, out = ping_paths(src, dst, count=2)
        assert paths, out


def _control_conns(host: Host, server_ip: str) -> set[str]:
    """Local ports of `host`'s established TCP connections to the server's port 443."""
    out = host.run(["ss", "-tnH", "state", "established", "dst", f"{server_ip}:443"]).stdout
    return set(re.findall(r"\S+:(\d+)\s+\S+:443", out))


def test_tls_alpn01_short_lived_certificate_renewed_live(
    acme_lab: Callable[..., AcmeLab], tailscaled_factory: Callable[..., Tailscaled]
) -> None:
    # 60 s certificates: renewal is due after 40 s (a third of the lifetime before the end).
    lab = acme_lab("TLS-ALPN-01", validity=60)
    first = lab.cert()
    pid = lab.tn.server.proc.pid if lab.tn.server.proc else None
    a, b, ip_a, ip_b = _join_pair(lab, tailscaled_factory)
    before = _control_conns(a.host, lab.server_host.ip)
    assert before, "client a holds no connection to the server"

    deadline = time.monotonic() + 120
    renewed = first
    while time.monotonic() < deadline and renewed.serial_number == first.serial_number:
        time.sleep(2)
        renewed = lab.cert()
    assert renewed.serial_number != first.serial_number, lab.tn.server.log_tail()
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert lab.tn.server.running and lab.tn.server.proc and lab.tn.server.proc.pid == pid
    # The connections made before the renewal are still up, and the tailnet still works.
    assert before & _control_conns(a.host, lab.server_host.ip), (before, lab.tn.server.log_tail())
    for src, dst in ((a, ip_b), (b, ip_a)):
        paths, out = ping_paths(src, dst, count=2)
        assert paths, out
    assert a.status_json()["BackendState"] == "Running"
    log = lab.tn.server.log_text()
    assert log.count(f"answering the tls-alpn-01 challenge for {NAME}") >= 2, log[-3000:]
