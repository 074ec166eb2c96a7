"""The embedded default: a working single-host config used when no config file exists.

Everything listens on 127.0.0.1 and lives under one data directory; nothing is fetched from
the Internet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def embedded_default(data_dir: Path) -> dict[str, Any]:
    d = data_dir
    return {
        "server_url": "http://127.0.0.1:8080",
        "listen_addr": "127.0.0.1:8080",
        "metrics_listen_addr": "127.0.0.1:9090",
        "noise": {"private_key_path": str(d / "noise_private.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48",
                     "allocation": "sequential"},
        "derp": {
            "server": {
                "enabled": True, "region_id": 999, "region_code": "headscale",
                "region_name": "Headscale Embedded DERP", "verify_clients": True,
                "stun_listen_addr": "127.0.0.1:3478",
                "private_key_path": str(d / "derp_server_private.key"),
                "automatically_add_embedded_derp_region": True,
                "listen_addr": "127.0.0.1:8443",
            },
            # Nothing fetched from the Internet by default: the embedded region is the map.
            "urls": [], "paths": [], "auto_update_enabled": False, "update_frequency": "3h",
        },
        "node": {"expiry": "0", "ephemeral": {"inactivity_timeout": "30m"}},
        "database": {"type": "sqlite",
                     "sqlite": {"path": str(d / "db.sqlite"), "write_ahead_log": True}},
        "tls_letsencrypt_cache_dir": str(d / "cache"),
        "log": {"level": "info", "format": "text"},
        "policy": {"mode": "file", "path": ""},
        # Clients keep their own resolvers; MagicDNS names live under tailnet.internal.
        "dns": {"magic_dns": True, "base_domain": "tailnet.internal",
                "override_local_dns": False, "nameservers": {"global": [], "split": {}}},
        "unix_socket": str(d / "headscale.sock"),
        "unix_socket_permission": "0770",
        "data_dir": str(d),
    }
