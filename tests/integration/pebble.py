"""Let's Encrypt's Pebble (a real ACME server) and pebble-challtestsrv (its DNS) in a host.

Both are built from the Go module proxy by tests/bench/build_go.py.  Pebble's VA resolves
every name through challtestsrv, which answers all A queries with the address given here (the
pyheadscale host), and validates HTTP-01 on port 80 and TLS-ALPN-01 on port 443 as the real
CA does.  Pebble makes a new root at every start; ``root_pem`` is what clients must trust.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.bench import build_go
from tests.integration.netns import Host
from tests.integration.server import CertAuthority, http_get_from, make_test_ca

API_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053


class PebbleError(RuntimeError):
    pass


class Pebble:
    """Pebble + challtestsrv in `host`; certificates valid for `validity` seconds."""

    def __init__(self, host: Host, workdir: Path, *, answer_ip: str,
                 validity: int = 7776000) -> None:
        try:
            pebble = build_go.ensure(build_go.PEBBLE)
            challtestsrv = build_go.ensure(build_go.CHALLTESTSRV)
        except build_go.BuildError as exc:
            raise PebbleError(f"Pebble unavailable: {exc}") from exc
        self.host = host
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # Pebble's own HTTPS (API and management) uses a certificate from a test CA.
        self.api_ca: CertAuthority = make_test_ca(workdir / "api-tls", ips=(host.ip,))
        config = {"pebble": {
            "listenAddress": f"0.0.0.0:{API_PORT}",
            "managementListenAddress": f"0.0.0.0:{MANAGEMENT_PORT}",
            "certificate": str(self.api_ca.cert), "privateKey": str(self.api_ca.key),
            "httpPort": 80, "tlsPort": 443,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "retryAfter": {"authz": 1, "order": 1},
            "keyAlgorithm": "ecdsa",
            "profiles": {"default": {"description": "test", "validityPeriod": validity}},
        }}
        cfg_file = workdir / "pebble-config.json"
        cfg_file.write_text(json.dumps(config))
        self.log = workdir / "pebble.log"
        with open(self.log, "ab") as log:
            host.popen([str(challtestsrv), "-defaultIPv4", answer_ip, "-defaultIPv6", "",
                        "-dnsserver", f"{host.ip}:{DNS_PORT}", "-http01", "", "-https01", "",
                        "-tlsalpn01", "", "-doh", "", "-management", "127.0.0.1:8055"],
                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            # No random validation sleeps, no deliberately rejected nonces, no reuse of
            # earlier authorizations: every issuance proves the challenge again.
            host.popen([str(pebble), "-config", str(cfg_file),
                        "-dnsserver", f"{host.ip}:{DNS_PORT}"],
                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                            "PEBBLE_AUTHZREUSE": "0"})
        self.root_file = workdir / "pebble-root.pem"
        deadline = time.monotonic() + 30
        status, body = 0, b""
        while time.monotonic() < deadline:
            status, body = http_get_from(host, f"https://{host.ip}:{MANAGEMENT_PORT}/roots/0",
                                         ca_file=self.api_ca.ca_cert, timeout=3)
            if status == 200:
                break
            time.sleep(0.3)
        if status != 200:
            raise PebbleError(f"Pebble did not start ({status} {body[:200]!r}):\n"
                              f"{self.log.read_text(errors='replace')[-2000:]}")
        self.root_file.write_bytes(body)

    @property
    def directory_url(self) -> str:
        return f"https://{self.host.ip}:{API_PORT}/dir"

    def trust_bundle(self, path: Path) -> Path:
        """One PEM with Pebble's issuing root and its API's CA (for the ACME client's HTTPS)."""
        path.write_bytes(self.root_file.read_bytes() + self.api_ca.ca_cert.read_bytes())
        return path
