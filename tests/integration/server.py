"""Run pyheadscale inside a topology host, plus a throwaway test CA for its TLS listener.

Addresses (docs/protocol.md, "The /ts2021 upgrade"): clients treat http:// with a non-private IP
literal as "https on 443 after any quick redial", so the default is server_url
https://198.51.100.1 with TLS on 443 and a certificate from the test CA (clients get the CA
via SSL_CERT_FILE). Port 80 stays closed: for an https control URL clients first try
http://host:80/ts2021, and a refused connection makes them go to 443 at once.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import ipaddress
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.netns import SERVER_IP, Host
from tests.integration.procs import NamespacedProcess

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


class ServerError(RuntimeError):
    """pyheadscale did not start or a CLI call could not be used."""


# -- test CA -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertAuthority:
    """A CA certificate plus one server certificate/key signed by it, all as PEM files."""

    ca_cert: Path
    cert: Path
    key: Path


def make_test_ca(
    directory: str | Path, ips: tuple[str, ...] = (SERVER_IP,), dns_names: tuple[str, ...] = ()
) -> CertAuthority:
    """Generate a CA and a server certificate valid for `ips` (IP SANs) and `dns_names`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyheadscale test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.DNSName(n) for n in dns_names]
    cn = (dns_names or ips)[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = CertAuthority(ca_cert=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
    out.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out.key.chmod(0o600)
    return out


# -- config --------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge; override values replace (lists are not concatenated)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_config(
    workdir: Path, host_ip: str, ca: CertAuthority | None, unix_socket: str
) -> dict[str, Any]:
    """A Headscale-schema config for a server at `host_ip` (TLS on 443 when `ca` is given)."""
    tls = ca is not None
    cfg: dict[str, Any] = {
        "server_url": f"https://{host_ip}" if tls else f"http://{host_ip}:8080",
        "listen_addr": "0.0.0.0:443" if tls else "0.0.0.0:8080",
        "metrics_listen_addr": "127.0.0.1:9090",
        "tls_cert_path": str(ca.cert) if ca else "",
        "tls_key_path": str(ca.key) if ca else "",
        "data_dir": str(workdir),
        "noise": {"private_key_path": str(workdir / "noise_private.key")},
        "prefixes": {
            "v4": "100.64.0.0/10",
            "v6": "fd7a:115c:a1e0::/48",
            "allocation": "sequential",
        },
        "database": {"type": "sqlite", "sqlite": {"path": str(workdir / "db.sqlite")}},
        "derp": {
            "server": {
                "enabled": True,
                "region_id": 999,
                "region_code": "headscale",
                "region_name": "Headscale Embedded DERP",
                "verify_clients": True,
                "stun_listen_addr": "0.0.0.0:3478",
                "private_key_path": str(workdir / "derp_server_private.key"),
                "automatically_add_embedded_derp_region": True,
                "ipv4": host_ip,
                # With TLS the relay is on the main listener (as in Headscale) and shares its
                # test-CA certificate, which every pinned client trusts through
                # SSL_CERT_FILE; without TLS it gets a separate, self-signed listener.
            },
            # Never fetch Tailscale's production DERP map: the lab has no route out anyway.
            "urls": [],
            "paths": [],
            "auto_update_enabled": False,
        },
        "disable_check_updates": True,
        "unix_socket": unix_socket,
        "unix_socket_permission": "0770",
        "log": {"level": "info", "format": "text"},
        "policy": {"mode": "file", "path": ""},
        "dns": {
            "magic_dns": True,
            "base_domain": "tailnet.test",
            "override_local_dns": False,
            "nameservers": {"global": []},
        },
        "node": {"expiry": "0", "ephemeral": {"inactivity_timeout": "120s"}},
    }
    return cfg


# -- the server ----------------------------------------------------------------------------


class PyHeadscale(NamespacedProcess):
    """pyheadscale serving inside `host`'s namespace; logs in `workdir/server.log`."""

    stop_timeout = 15.0

    def __init__(
        self,
        host: Host,
        workdir: str | Path,
        config_overrides: Mapping[str, Any] | None = None,
        *,
        tls: bool = True,
        ca: CertAuthority | None = None,
        python: str | Path = VENV_PYTHON,
        start: bool = True,
        start_timeout: float = 30,
        client_ca: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`client_ca`: what clients must trust when the certificate is not the test CA's
        (ACME); `env`: extra environment for the server process."""
        self._client_ca = client_ca
        self._env = dict(env or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(host, self.workdir / "server.log")
        self.python = str(python)
        self.ca = (ca or make_test_ca(self.workdir / "tls", ips=(host.ip,))) if tls else None
        sock = self.short_socket(self.workdir / "headscale.sock", "phhs-")
        self.config = deep_merge(
            default_config(self.workdir, host.ip, self.ca, str(sock)), config_overrides or {}
        )
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.own_url: str | None = None
        if start:
            self.start(timeout=start_timeout)

    def __repr__(self) -> str:
        return f"<PyHeadscale {self.url} on {self.host.name}>"

    @property
    def url(self) -> str:
        return str(self.config["server_url"]).rstrip("/")

    @property
    def ca_file(self) -> Path | None:
        """The PEM to hand clients as SSL_CERT_FILE (None without TLS)."""
        if self._client_ca is not None:
            return self._client_ca
        return self.ca.ca_cert if self.ca else None

    def start(self, timeout: float = 30) -> None:
        if self.running:
            raise ServerError(f"{self!r} already running")
        self.spawn([self.python, "-m", "pyheadscale", "-c", str(self.config_path), "serve"],
                   env={"PYTHONUNBUFFERED": "1", **self._env}, cwd=REPO)
        self.wait_healthy(timeout)

    def http_get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET `path` from inside the server's namespace (status, body); status 0 = no answer.
        `own_url`, when set, is asked instead of server_url (an instance behind a load
        balancer)."""
        base = self.own_url or self.url
        return http_get_from(self.host, base + path, ca_file=self.ca_file, timeout=timeout)

    def wait_healthy(self, timeout: float = 30) -> None:
        last: tuple[int, bytes] = (0, b"")

        def healthy() -> bool:
            nonlocal last
            last = self.http_get("/health", timeout=3)
            return last[0] == 200

        self.wait_ready(healthy, timeout, ServerError,
                        lambda: f"/health not 200 (last {last[0]} {last[1][:200]!r})", 0.3)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m pyheadscale -c CONFIG <args>` inside the server's namespace."""
        argv = [self.python, "-m", "pyheadscale", "-c", str(self.config_path), *args]
        return self.host.run(argv, timeout=timeout, env={"PYTHONUNBUFFERED": "1"})

    def cli_json(self, *args: str, timeout: float = 60) -> Any:
        res = self.cli(*args, "--output", "json", timeout=timeout)
        if res.returncode != 0:
            raise ServerError(f"headscale {' '.join(args)} failed: {res.stderr.strip()}")
        return json.loads(res.stdout)


# A tiny HTTP(S) client run with the harness's Python inside a namespace: it prints
# "<status>\n" then the body (base64), so the caller gets exact bytes back.
_GET_SNIPPET = """
import base64, ssl, sys, urllib.request, urllib.error
url, ca, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca) if ca else None
try:
    with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
print(status)
print(base64.b64encode(body).decode())
"""


def http_get_from(
    host: Host, url: str, *, ca_file: str | Path | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    """GET `url` from inside `host`'s namespace. Returns (status, body); (0, error) on failure."""
    try:
        res = host.run(
            [sys.executable, "-c", _GET_SNIPPET, url, str(ca_file or ""), str(timeout)],
            timeout=timeout + 10,
        )
    except subprocess.TimeoutExpired:
        return 0, b"timeout"
    if res.returncode != 0:
        return 0, res.stderr.strip().encode()[-500:]
    lines = res.stdout.splitlines()
    return int(lines[0]), base64.b64decode(lines[1]) if len(lines) > 1 else b""


__all__ = [
    "PyHeadscale",
    "ServerError",
    "CertAuthority",
    "deep_merge",
    "default_config",
    "http_get_from",
    "make_test_ca",
]
