"""pyheadscale behind a real reverse proxy (nginx from Debian), and trusted_proxies.

nginx terminates TLS for https://<proxy> and passes everything, the /ts2021 upgrade, the
relay's /derp and WebSockets included, to pyheadscale's plain listener.  Official clients
(oldest and newest pinned) join and ping through it; the Python test client registers over
the /ts2021 WebSocket through it.  The access log names the proxy while trusted_proxies is
empty, and the clients once the proxy is listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.derp_helpers import Tailnet, ping_paths, wait_peer
from tests.integration.netns import Host, Topology
from tests.integration.nginx import Nginx, NginxError
from tests.integration.server import REPO, VENV_PYTHON, make_test_ca
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST, OLDEST

pytestmark = pytest.mark.integration


_WS_REGISTER = """
import asyncio, sys, orjson
from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.testclient import connect

async def main(url, key):
    machine, node = generate_private_key(), generate_private_key()
    async with await connect(url, machine, capver=113, websocket=True) as conn:
        body = {"Version": 113, "NodeKey": "nodekey:" + public_key(node).hex(),
                "OldNodeKey": "nodekey:" + "0" * 64, "Auth": {"AuthKey": key},
                "Expiry": "0001-01-01T00:00:00Z", "Followup": "",
                "Hostinfo": {"Hostname": "ws-client"}}
        status, _, resp = await conn.request("POST", "/machine/register", orjson.dumps(body))
        print(status, orjson.loads(resp).get("MachineAuthorized"))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _access(server_log: str, path: str) -> list[str]:
    """The `remote=` values of the access-log lines for `path`."""
    return re.findall(rf"path={re.escape(path)} proto=\S+ remote=(\S+) ", server_log)


class ProxyLab:
    def __init__(self, topology: Topology, workdir: Path) -> None:
        self.server_host = topology.add_server_host()
        self.proxy_host = topology.add_host("proxy")
        ip = self.proxy_host.ip
        self.ca = make_test_ca(workdir / "proxy-tls", ips=(ip,))
        overrides: dict[str, Any] = {
            "server_url": f"https://{ip}", "listen_addr": "0.0.0.0:8080",
            # The relay is on the main listener, reached through the proxy like the rest.
            "derp": {"server": {"ipv4": ip}},
        }
        try:  # first: the server's own health check goes through it
            self.nginx = Nginx(self.proxy_host, workdir / "nginx", self.ca,
                               f"{self.server_host.ip}:8080")
        except NginxError as exc:
            pytest.fail(str(exc), pytrace=False)
        self.tn = Tailnet(self.server_host, workdir / "tn", overrides=overrides, tls=False,
                          client_ca=self.ca.ca_cert)

    def trust_proxy(self, trusted: list[str]) -> None:
        """Restart the server with trusted_proxies set to `trusted`."""
        srv = self.tn.server
        srv.config["trusted_proxies"] = trusted
        srv.config_path.write_text(yaml.safe_dump(srv.config, sort_keys=False))
        srv.restart(timeout=60)

    def ws_register(self, host: Host) -> str:
        res = host.run([str(VENV_PYTHON), "-c", _WS_REGISTER, self.tn.server.url,
                        self.tn.authkey], timeout=60,
                       env={"SSL_CERT_FILE": str(self.ca.ca_cert), "PYTHONPATH": str(REPO)})
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.strip()


@pytest.fixture
def proxy_lab(topology: Topology, workdir: Path) -> Iterator[ProxyLab]:
    lab = ProxyLab(topology, workdir)
    yield lab
    lab.tn.close()


def test_clients_through_nginx_and_trusted_proxies(
    proxy_lab: ProxyLab, topology: Topology,
    tailscaled_factory: Callable[..., Tailscaled],
) -> None:
    lab = proxy_lab
    a_host, b_host, w_host = topology.add_host("a"), topology.add_host("b"), topology.add_host("w")
    a = tailscaled_factory(a_host, OLDEST, ssl_cert_file=lab.ca.ca_cert)
    b = tailscaled_factory(b_host, NEWEST, ssl_cert_file=lab.ca.ca_cert)
    ip_a, ip_b = lab.tn.join(a), lab.tn.join(b)
    for src, dst in ((a, ip_b), (b, ip_a)):
        wait_peer(src, dst)
        paths, out = ping_paths(src, dst, count=2)
        assert paths, out
    assert lab.ws_register(w_host) == "200 True"

    # trusted_proxies empty: every request seems to come from the proxy.
    log = lab.tn.server.log_text()
    proxy_ip = lab.proxy_host.ip
    seen = _access(log, "/ts2021")
    assert seen and set(seen) == {proxy_ip}, seen
    assert set(_access(log, "/key")) == {proxy_ip}, _access(log, "/key")

    # Listed: the clients' own addresses, for the upgrade, the WebSocket and plain requests.
    before = len(_access(lab.tn.server.log_text(), "/ts2021"))
    lab.trust_proxy([f"{proxy_ip}/32"])
    assert lab.ws_register(w_host) == "200 True"
    want = {a_host.ip, b_host.ip, w_host.ip}
    deadline = time.monotonic() + 90  # the daemons redial the restarted server on their own
    after: list[str] = []
    while time.monotonic() < deadline and not want <= set(after):
        time.sleep(1)
        after = _access(lab.tn.server.log_text(), "/ts2021")[before:]
    assert want <= set(after), after
    for src, dst in ((a, ip_b), (b, ip_a)):
        wait_peer(src, dst)
        paths, out = ping_paths(src, dst, count=2)
        assert paths, out
    log = lab.tn.server.log_text()
    assert proxy_ip not in after, after
    # /derp through the proxy was taken over too (the map points at the proxy's 443).
    assert set(_access(log, "/derp")) <= {proxy_ip, a_host.ip, b_host.ip}, _access(log, "/derp")
