"""nginx (Debian's package) as a TLS-terminating reverse proxy in a namespace host.

The configuration is the one Headscale's documentation gives (Upgrade and Connection passed
on, X-Real-IP and X-Forwarded-For set), plus a keep-alive upstream pool, so upgrade requests
(/ts2021, /derp) may arrive on upstream connections that already carried other requests.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.integration.netns import Host
from tests.integration.server import CertAuthority, http_get_from

_CONF = """
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream pyheadscale {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 443 ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://pyheadscale;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_redirect http:// https://;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


class NginxError(RuntimeError):
    pass


class Nginx:
    """nginx on `host`:443 (certificate from `ca`) proxying to `upstream` ("ip:port")."""

    def __init__(self, host: Host, workdir: Path, ca: CertAuthority, upstream: str) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise NginxError("nginx is not installed (Debian package nginx; .ci/run installs it)")
        self.host = host
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(_CONF.format(d=workdir, upstream=upstream, cert=ca.cert, key=ca.key))
        self.log = workdir / "nginx.out"
        with open(self.log, "ab") as out:
            host.popen([binary, "-c", str(conf), "-p", str(workdir), "-e",
                        str(workdir / "error.log")],
                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, _ = http_get_from(host, f"https://{host.ip}/health", ca_file=ca.ca_cert,
                                      timeout=3)
            if status:  # any HTTP answer: nginx is up (the upstream may not be yet)
                return
            time.sleep(0.3)
        raise NginxError(f"nginx did not start:\n{self.error_log()}")

    def error_log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""
