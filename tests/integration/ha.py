"""A highly available pyheadscale for the tests: two instances on one PostgreSQL behind
HAProxy, all in network namespaces, with official clients placed on either instance.

    lb     198.51.100.1   HAProxy, TCP :443 (server_url https://198.51.100.1)
    inst1  198.51.100.11  pyheadscale: TLS :443 with the embedded relay, STUN :3478
    inst2  198.51.100.12  pyheadscale
    db     198.51.100.20  PostgreSQL :5432 (Debian's server binaries)
    c*     198.51.100.x   official tailscaled, each preferring one instance

Both instances serve the same Noise key (one file) and a certificate valid for the load
balancer's address and their own (their relays are the DERP region's nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests.integration.haproxy import HAProxy
from tests.integration.netns import Host, Topology
from tests.integration.server import REPO, VENV_PYTHON, PyHeadscale, make_test_ca
from tests.integration.tailscale import Tailscaled
from tests.pgserver import PostgresServer

INSTANCE_IPS = {"inst1": "198.51.100.11", "inst2": "198.51.100.12"}
DB_IP = "198.51.100.20"
DB_NAME = "headscale"
BASE_DOMAIN = "tailnet.test"
REGISTER_MANY = REPO / "tests" / "integration" / "register_many.py"
API_WRITER = REPO / "tests" / "integration" / "api_writer.py"


class HALab:
    def __init__(self, topology: Topology, workdir: Path, clients: dict[str, str]) -> None:
        """`clients`: client host name -> the instance HAProxy sends it to first."""
        self.topology = topology
        self.workdir = workdir
        self.lb = topology.add_server_host("lb")
        self.hosts = {name: topology.add_host(name, ip=ip) for name, ip in INSTANCE_IPS.items()}
        self.db_host = topology.add_host("db", ip=DB_IP)
        self.client_hosts = {name: topology.add_host(name) for name in clients}
        self.nodes: dict[str, Tailscaled] = {}
        self.servers: dict[str, PyHeadscale] = {}
        self.haproxy: HAProxy | None = None
        self.pg = PostgresServer(netns=self.db_host.ns, listen=DB_IP)
        self.pg.start()
        try:
            self._start(clients)
        except BaseException:
            self.close()
            raise

    def _start(self, clients: dict[str, str]) -> None:
        params = self.pg.create_database(DB_NAME)
        self.engine = self.pg.local_engine(DB_NAME)
        self.ca = make_test_ca(self.workdir / "tls", ips=(self.lb.ip, *INSTANCE_IPS.values()))
        for name, host in self.hosts.items():
            srv = PyHeadscale(host, self.workdir / name, self._config(host, params),
                              ca=self.ca, start=False)
            srv.own_url = f"https://{host.ip}"  # server_url is the load balancer's
            self.servers[name] = srv
        for srv in self.servers.values():  # the first creates the shared Noise key
            srv.start(timeout=60)
        prefer = {self.client_hosts[c].ip: inst for c, inst in clients.items()}
        self.haproxy = HAProxy(self.lb, self.workdir / "haproxy",
                               {n: f"{ip}:443" for n, ip in INSTANCE_IPS.items()},
                               prefer=prefer)
        self.cli_json("inst1", "users", "create", "alice")
        key = self.cli_json("inst2", "preauthkeys", "create", "--user", "1", "--reusable",
                            "--expiration", "24h")
        self.authkey: str = key["key"]

    def _config(self, host: Host, db: dict[str, Any]) -> dict[str, Any]:
        return {
            "server_url": f"https://{self.lb.ip}",
            "noise": {"private_key_path": str(self.workdir / "noise_private.key")},
            "database": {"type": "postgres", "postgres": {
                "host": db["host"], "port": db["port"], "name": db["name"],
                "user": db["user"], "pass": db["password"]}},
            "derp": {"server": {"ipv4": host.ip, "hostname": host.ip}},
            "policy": {"mode": "database", "path": ""},
            "dns": {"base_domain": BASE_DOMAIN},
        }

    # -- instances -------------------------------------------------------------------------

    def cli(self, inst: str, *args: str, timeout: float = 60) -> Any:
        return self.servers[inst].cli(*args, timeout=timeout)

    def cli_json(self, inst: str, *args: str) -> Any:
        return self.servers[inst].cli_json(*args)

    def holders(self) -> dict[str, str]:
        """Client host name -> the instance holding its map session, from the database."""
        with self.engine.connect() as c:
            rows = c.execute(text(
                "SELECT n.hostname, i.info FROM cluster_presence p "
                "JOIN nodes n ON n.id = p.node_id "
                "JOIN cluster_instances i ON i.id = p.instance_id")).all()
        by_ip = {ip: name for name, ip in INSTANCE_IPS.items()}
        out = {}
        for hostname, info in rows:
            ip = (json.loads(info).get("derp") or {}).get("node", {}).get("IPv4")
            out[str(hostname)] = by_ip.get(ip, "?")
        return out

    def instance_count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text("SELECT count(*) FROM cluster_instances")).scalar_one())

    # -- clients ---------------------------------------------------------------------------

    def join(self, name: str, version: str) -> Tailscaled:
        ts = Tailscaled(self.client_hosts[name], version, self.workdir / f"ts-{name}",
                        ssl_cert_file=self.ca.ca_cert)
        self.nodes[name] = ts
        r = ts.up(f"https://{self.lb.ip}", authkey=self.authkey, hostname=name, timeout=90)
        assert r.returncode == 0, f"{name} ({version}) did not join: {r.stdout}{r.stderr}"
        ts.wait_state("Running", timeout=60)
        return ts

    def ip(self, name: str) -> str:
        ips = self.nodes[name].ip("4")
        assert ips, f"{name} has no tailnet address"
        return ips[0]

    def derp_peer(self, name: str) -> set[str]:
        """The instances whose relay `name` holds a connection to (from `ss`): its control
        connection goes to the load balancer, so a connection to an instance's own address
        on 443 is a DERP connection."""
        out = self.client_hosts[name].run(["ss", "-tnH", "state", "established"]).stdout
        return {inst for inst, ip in INSTANCE_IPS.items() if f"{ip}:443" in out}

    # -- load --------------------------------------------------------------------------------

    def register_many(self, host: Host, inst: str, count: int, hostname: str) -> Any:
        """Start `count` Python-client registrations straight at `inst` (not through the
        load balancer) from `host`; returns the process (its stdout is one JSON line)."""
        return host.popen(
            [str(VENV_PYTHON), str(REGISTER_MANY), f"https://{INSTANCE_IPS[inst]}",
             self.authkey, str(count), hostname],
            env={"SSL_CERT_FILE": str(self.ca.ca_cert), "PYTHONPATH": str(REPO)},
            stdout=-1, stderr=-1, text=True)

    def close(self) -> None:
        for ts in self.nodes.values():
            ts.close()
        for srv in self.servers.values():
            srv.close()
        if self.haproxy is not None:
            self.haproxy.close()
        if hasattr(self, "engine"):
            self.engine.dispose()
        self.pg.stop()


__all__ = ["API_WRITER", "BASE_DOMAIN", "HALab", "INSTANCE_IPS"]
