"""HAProxy (Debian's package) as the TCP load balancer in front of several pyheadscale
instances, in a namespace host.

TCP mode: TLS, the /ts2021 upgrade and the long-lived Noise streams pass through untouched,
and each instance terminates TLS itself. Health checks are plain TCP connects (an instance
answering HTTP 503 on /health while PostgreSQL is down still serves its clients from
memory, so it must not be taken out). Clients are placed deterministically: each backend
prefers one instance and falls back to the others (`backup`), and the frontend picks the
backend by client source address, so a test knows which instance holds which client and
where it goes when that instance dies.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.integration.netns import Host
from tests.integration.procs import NamespacedProcess

_GLOBAL = """global
    maxconn 4096
    pidfile {d}/haproxy.pid
    stats socket {d}/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 3s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    option redispatch
    retries 2
"""


class HAProxyError(RuntimeError):
    pass


class HAProxy(NamespacedProcess):
    """HAProxy on `host`:`port` over `backends` (name -> "ip:port"). `prefer` maps client
    source addresses to the backend name they should reach first; others go to the first
    backend first."""

    def __init__(self, host: Host, workdir: Path, backends: Mapping[str, str], *,
                 port: int = 443, prefer: Mapping[str, str] | None = None) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise HAProxyError("haproxy is not installed (Debian package haproxy; .ci/run "
                               "installs it)")
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        names = list(backends)
        lines = [_GLOBAL.format(d=workdir), f"frontend control\n    bind {host.ip}:{port}"]
        for src, name in (prefer or {}).items():
            lines.append(f"    use_backend prefer_{name} if {{ src {src} }}")
        lines.append(f"    default_backend prefer_{names[0]}")
        for first in names:
            lines.append(f"backend prefer_{first}")
            for name in [first] + [n for n in names if n != first]:
                backup = "" if name == first else " backup"
                lines.append(f"    server {name} {backends[name]} check inter 500ms "
                             f"fall 2 rise 2 on-marked-down shutdown-sessions{backup}")
        self.config = workdir / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        super().__init__(host, workdir / "haproxy.log")
        check = host.run([binary, "-c", "-f", str(self.config)], timeout=30)
        if check.returncode != 0:
            raise HAProxyError(f"bad haproxy config: {check.stdout}{check.stderr}")
        self.spawn([binary, "-db", "-f", str(self.config)], env={})
        probe = f"import socket; socket.create_connection(('{host.ip}', {port}), 2)"
        self.wait_ready(
            lambda: host.run([sys.executable, "-c", probe], timeout=10).returncode == 0,
            20, HAProxyError, lambda: f"nothing listening on {host.ip}:{port}")

    def __repr__(self) -> str:
        return f"<HAProxy on {self.host.name}>"
