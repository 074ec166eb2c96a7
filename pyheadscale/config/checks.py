"""Checks on a validated raw tree: pydantic's errors as one-line ConfigErrors, then Headscale's
cross-field rules (validateServerConfig, LoadServerConfig and helpers), with its messages."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from pyheadscale.config.errors import key_error, quoted
from pyheadscale.config.schema import Config, OIDCConfig
from pyheadscale.durations import format_go_duration

CGNAT_V4 = IPv4Network("100.64.0.0/10")
TAILSCALE_ULA_V6 = IPv6Network("fd7a:115c:a1e0::/48")
MIN_EPHEMERAL_INACTIVITY = timedelta(seconds=65)  # map keepalive (60s) plus slack, as Headscale
LOG_LEVELS = ("panic", "fatal", "error", "warn", "info", "debug", "trace", "disabled")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(error: Mapping[str, Any]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind.startswith("bool_"):
        return f"must be true or false, got {quoted(value)}"
    if kind.startswith("int_"):
        return f"must be an integer, got {quoted(value)}"
    if kind.startswith("string_"):
        return f"must be a string, got {quoted(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {quoted(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping, got {quoted(value)}"
    return f"{error['msg']}, got {quoted(value)}"


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise key_error(_loc(first["loc"]), _problem(first)) from None


def _check_hostport(key: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            raise key_error(key, "required")
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise key_error(key, f"must be host:port, got {quoted(value)}")
    if host.startswith("[") != host.endswith("]"):
        raise key_error(key, f"must be host:port, got {quoted(value)}")


def _check_tls_pair(section: str, cert: Path | None, key: Path | None) -> None:
    """A certificate and its key come together (`section` is "" or "derp.server.")."""
    if bool(cert) != bool(key):
        missing, other = (("tls_key_path", "tls_cert_path") if cert
                          else ("tls_cert_path", "tls_key_path"))
        raise key_error(f"{section}{missing}", f"required when {section}{other} is set")


def _check_server_url(cfg: Config) -> None:
    url = cfg.server_url
    if not (url.startswith("http://") or url.startswith("https://")):
        raise key_error("server_url", "must start with http:// or https://")
    try:
        host = urlsplit(url).hostname
        urlsplit(url).port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise key_error("server_url", f"not a valid URL: {quoted(url)}: {e}") from None
    if not host:
        raise key_error("server_url", f"has no host: {quoted(url)}")
    base = cfg.dns.base_domain.lower().rstrip(".")
    if not base:
        return
    # Tailscale clients take over base_domain, so the server must live outside it.
    if host == base:
        raise key_error("server_url", "cannot use the same domain as base_domain in a way that "
                                      "could make the DERP and headscale server unreachable")
    if host.endswith("." + base):
        raise key_error("server_url", "cannot be part of base_domain in a way that could make the "
                                      "DERP and headscale server unreachable")


def parse_listen(addr: str) -> tuple[str, int]:
    """``host:port`` where port may be a service name (``:http`` is port 80), as Go's."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ValueError(f"{addr!r} is not host:port")
    try:
        number = int(port) if port.isdigit() else socket.getservbyname(port, "tcp")
    except OSError:
        raise ValueError(f"unknown port {port!r} in {addr!r}") from None
    return host.strip("[]"), number


def check(cfg: Config, warns: list[str]) -> None:
    """Headscale's cross-field checks (validateServerConfig, LoadServerConfig and helpers)."""
    _check_server_url(cfg)
    _check_hostport("listen_addr", cfg.listen_addr, required=True)
    _check_hostport("metrics_listen_addr", cfg.metrics_listen_addr, required=False)
    if cfg.noise.private_key_path is None:
        raise key_error("noise.private_key_path", "required (the Noise protocol private key; "
                                                  "created when missing)")

    if cfg.prefixes.v4 is None and cfg.prefixes.v6 is None:
        raise key_error("prefixes",
                        "no IPv4 or IPv6 prefix configured, minimum one prefix is required")
    if cfg.prefixes.allocation not in ("sequential", "random"):
        raise key_error("prefixes.allocation", f"invalid prefix allocation strategy: "
                        f"{quoted(cfg.prefixes.allocation)}, allowed options: sequential, random")
    v4, v6 = cfg.prefixes.v4, cfg.prefixes.v6
    if (v4 and not v4.subnet_of(CGNAT_V4)) or (v6 and not v6.subnet_of(TAILSCALE_ULA_V6)):
        warns.append("prefixes: ranges outside 100.64.0.0/10 and fd7a:115c:a1e0::/48 are NOT "
                     "supported: the Tailscale client assumes these ranges")

    if cfg.tls_letsencrypt_hostname and (cfg.tls_cert_path or cfg.tls_key_path):
        raise key_error("tls_letsencrypt_hostname", "set either tls_letsencrypt_hostname or "
                                                    "tls_cert_path/tls_key_path, not both")
    _check_tls_pair("", cfg.tls_cert_path, cfg.tls_key_path)
    if cfg.tls_letsencrypt_challenge_type not in ("HTTP-01", "TLS-ALPN-01"):
        raise key_error("tls_letsencrypt_challenge_type", "the only supported values are "
                        "HTTP-01 and TLS-ALPN-01, got "
                        f"{quoted(cfg.tls_letsencrypt_challenge_type)}")
    if cfg.tls_letsencrypt_hostname and cfg.tls_letsencrypt_challenge_type == "HTTP-01":
        try:
            parse_listen(cfg.tls_letsencrypt_listen)
        except ValueError as e:
            raise key_error("tls_letsencrypt_listen", str(e)) from None
    if cfg.tls_letsencrypt_hostname and cfg.tls_letsencrypt_cache_dir is None:
        raise key_error("tls_letsencrypt_cache_dir", "required with tls_letsencrypt_hostname")
    if cfg.tls_letsencrypt_hostname and (urlsplit(cfg.acme_url).scheme not in ("http", "https")
                                         or not urlsplit(cfg.acme_url).hostname):
        raise key_error("acme_url", f"not an http(s) URL: {quoted(cfg.acme_url)}")
    if (cfg.tls_letsencrypt_hostname and cfg.tls_letsencrypt_challenge_type == "TLS-ALPN-01"
            and not cfg.listen_addr.endswith(":443")):
        warns.append("when using tls_letsencrypt_hostname with TLS-ALPN-01 as challenge type, "
                     "headscale must be reachable on port 443, i.e. listen_addr should probably "
                     "end in :443")

    eph = cfg.node.ephemeral.inactivity_timeout
    if eph <= MIN_EPHEMERAL_INACTIVITY:
        raise key_error("node.ephemeral.inactivity_timeout",
                        f"({format_go_duration(eph)}) is set too low, must be more than "
                        f"{format_go_duration(MIN_EPHEMERAL_INACTIVITY)}")
    ha = cfg.node.routes.ha
    if ha.probe_interval > timedelta(0):
        if ha.probe_interval < timedelta(seconds=2):
            raise key_error("node.routes.ha.probe_interval",
                            f"({format_go_duration(ha.probe_interval)}) must be >= 2s")
        if ha.probe_timeout < timedelta(seconds=1):
            raise key_error("node.routes.ha.probe_timeout",
                            f"({format_go_duration(ha.probe_timeout)}) must be >= 1s")
        if ha.probe_timeout >= ha.probe_interval:
            raise key_error("node.routes.ha.probe_timeout",
                            f"({format_go_duration(ha.probe_timeout)}) must be less than "
                            "node.routes.ha.probe_interval "
                            f"({format_go_duration(ha.probe_interval)})")
    if cfg.tuning.node_store_batch_size <= 0:
        raise key_error("tuning.node_store_batch_size",
                        f"must be positive, got {cfg.tuning.node_store_batch_size}")
    if cfg.tuning.node_store_batch_timeout <= timedelta(0):
        raise key_error("tuning.node_store_batch_timeout", "must be positive, got "
                        f"{format_go_duration(cfg.tuning.node_store_batch_timeout)}")
    if cfg.tuning.batch_change_delay < timedelta(0):
        raise key_error("tuning.batch_change_delay", "must not be negative")
    _check_map_admission(cfg)

    dns = cfg.dns
    if dns.magic_dns and not dns.base_domain:
        raise key_error("dns.base_domain", "required when dns.magic_dns is true")
    if dns.override_local_dns and not dns.nameservers.global_:
        raise key_error("dns.nameservers.global", "must be set when dns.override_local_dns is true")
    if dns.extra_records and dns.extra_records_path:
        raise key_error("dns.extra_records", "dns.extra_records and dns.extra_records_path are "
                                             "mutually exclusive, remove one of them")

    _check_derp(cfg)

    db = cfg.database
    if db.type not in ("sqlite", "postgres"):
        raise key_error("database.type", f"invalid database type {quoted(db.type)}, must be "
                                         "sqlite, sqlite3 or postgres")
    if db.type == "sqlite" and db.sqlite.path is None:
        raise key_error("database.sqlite.path", "required when database.type is sqlite")
    if db.type == "postgres" and db.postgres.port is not None and not 0 < db.postgres.port < 65536:
        raise key_error("database.postgres.port", f"not a valid port: {db.postgres.port}")

    if cfg.log.level not in LOG_LEVELS:
        raise key_error("log.level", f"invalid level {quoted(cfg.log.level)}, valid levels: "
                                     "panic, fatal, error, warn, info, debug, trace")
    if cfg.log.format not in ("text", "json", ""):
        raise key_error("log.format", f"could not parse log format {quoted(cfg.log.format)}, "
                                      "valid choices are 'json' or 'text'")
    if cfg.policy.mode not in ("file", "database"):
        raise key_error("policy.mode", f"must be file or database, got {quoted(cfg.policy.mode)}")
    _check_oidc(cfg.oidc)
    _check_unsupported(cfg, warns)
    _check_admin_console(cfg)


# Headscale keys that tune parts pyheadscale does not have. Headscale's default asks for
# nothing, so it is accepted; any other value would be silently ignored, so it is refused.
_NO_EQUIVALENT: dict[str, tuple[object, str]] = {
    "notifier_send_timeout": (timedelta(milliseconds=800), "map updates wait in a per-session "
                              "queue that never blocks the sender, so there is no send timeout"),
    "node_mapsession_buffered_chan_size": (30, "a map session's queue holds changes, not "
                                           "responses, and collapses to a full update instead "
                                           "of filling up"),
    "batcher_workers": (0, "map responses are built on one event loop, without workers"),
    "node_store_batch_size": (100, "state changes apply at once; there is no NodeStore write "
                              "batching (tuning.batch_change_delay batches what clients get)"),
    "node_store_batch_timeout": (timedelta(milliseconds=500), "state changes apply at once; "
                                 "there is no NodeStore write batching"),
}


def _check_unsupported(cfg: Config, warns: list[str]) -> None:
    for name, (default, why) in _NO_EQUIVALENT.items():
        value = getattr(cfg.tuning, name)
        if value != default:
            shown = format_go_duration(value) if isinstance(value, timedelta) else value
            raise key_error(f"tuning.{name}", f"not supported by pyheadscale ({why}); remove "
                                              f"the key (got {shown})")
    if {"grpc_listen_addr", "grpc_allow_insecure"} & cfg.model_fields_set:
        # Kept a warning: Headscale's example config sets it, and the REST API and the unix
        # socket offer everything its gRPC API does.
        warns.append("grpc_listen_addr: not supported, pyheadscale serves no gRPC; remote "
                     "CLIs use the REST API (cli.address with an API key) and local ones the "
                     "unix socket")


# tuning.node_mapsession_open_*: more places than this only lengthen every first map's wait.
# A wait under a second refuses polls that a moment later would have been served (each
# refusal costs the client a backoff); a waiting map request must be answered (503) well
# inside the 120 s in which tailscaled expects the first map of its poll, leaving time to
# build and send the map once admitted.
MAX_OPEN_LIMIT = 1024
MIN_OPEN_TIMEOUT = timedelta(seconds=1)
MAX_OPEN_TIMEOUT = timedelta(seconds=100)


def _check_map_admission(cfg: Config) -> None:
    limit, wait = cfg.tuning.node_mapsession_open_limit, cfg.tuning.node_mapsession_open_timeout
    if not 1 <= limit <= MAX_OPEN_LIMIT:
        raise key_error("tuning.node_mapsession_open_limit",
                        f"must be between 1 and {MAX_OPEN_LIMIT}, got {limit}")
    if not MIN_OPEN_TIMEOUT <= wait <= MAX_OPEN_TIMEOUT:
        raise key_error("tuning.node_mapsession_open_timeout",
                        f"must be between {format_go_duration(MIN_OPEN_TIMEOUT)} and "
                        f"{format_go_duration(MAX_OPEN_TIMEOUT)} (clients give up on a map "
                        f"request after 120s without a map), got {format_go_duration(wait)}")


def _check_derp(cfg: Config) -> None:
    derp, srv = cfg.derp, cfg.derp.server
    for i, url in enumerate(derp.urls):
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise key_error(f"derp.urls[{i}]", f"not an http(s) URL: {quoted(url)}")
    if derp.auto_update_enabled and derp.update_frequency <= timedelta(0):
        raise key_error("derp.update_frequency", "must be positive when derp.auto_update_enabled")
    _check_tls_pair("derp.server.", srv.tls_cert_path, srv.tls_key_path)
    if not srv.enabled:
        return
    if not srv.stun_listen_addr:
        raise key_error("derp.server.stun_listen_addr",
                        "must be set if derp.server.enabled is true")
    _check_hostport("derp.server.stun_listen_addr", srv.stun_listen_addr, required=True)
    if srv.listen_addr:
        _check_hostport("derp.server.listen_addr", srv.listen_addr, required=True)
    elif srv.tls_cert_path:
        raise key_error("derp.server.tls_cert_path",
                        "applies only to the separate relay listener: set "
                        "derp.server.listen_addr, or remove it to serve DERP on the main "
                        "listener with the server's own certificate")
    if srv.private_key_path is None:
        raise key_error("derp.server.private_key_path", "required when derp.server.enabled is true")
    if not 0 < srv.region_id <= 2**53 - 1:
        raise key_error("derp.server.region_id",
                        f"must be a positive region ID, got {srv.region_id}")
    if not srv.automatically_add_embedded_derp_region and not derp.paths:
        raise key_error("derp.server.automatically_add_embedded_derp_region",
                        "disabling it requires to configure the derp server in derp.paths")
    if not srv.hostname:
        raise key_error("derp.server.hostname",
                        "required: server_url has no host to derive it from")
    if srv.mesh_with and srv.mesh_key_path is None:
        raise key_error("derp.server.mesh_with", "requires derp.server.mesh_key_path")


def _check_oidc(oidc: OIDCConfig) -> None:
    if oidc.client_secret and oidc.client_secret_path:
        raise key_error("oidc.client_secret_path",
                        "oidc.client_secret and oidc.client_secret_path are mutually exclusive")
    if not oidc.issuer:
        return
    if oidc.pkce.method not in ("plain", "S256"):
        raise key_error("oidc.pkce.method", "pkce.method must be either 'plain' or 'S256'")
    parts = urlsplit(oidc.issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise key_error("oidc.issuer", f"must be a valid http(s) URL: got {quoted(oidc.issuer)}")
    if not oidc.client_id:
        raise key_error("oidc.client_id", "required when oidc.issuer is set")
    if not oidc.client_secret and not oidc.client_secret_path:
        raise key_error("oidc.client_secret",
                        "oidc.client_secret or oidc.client_secret_path is required when "
                        "oidc.issuer is set")


# Paths the server itself serves: the console may not shadow them.
_RESERVED_PATHS = ("/api", "/key", "/ts2021", "/machine", "/register", "/oidc", "/derp", "/auth",
                   "/bootstrap-dns", "/generate_204", "/health", "/version", "/verify",
                   "/apple", "/windows", "/robots.txt", "/swagger", "/metrics", "/debug")


def _check_admin_console(cfg: Config) -> None:
    ac = cfg.admin_console
    path = ac.path
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path):
        raise key_error("admin_console.path", "must be an absolute path like /admin (letters, "
                        f"digits and ._~- between slashes, no trailing slash), got {quoted(path)}")
    for reserved in _RESERVED_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise key_error("admin_console.path",
                            f"{quoted(path)} would shadow the server's own {reserved}")
    for key in ("session_idle_timeout", "session_max_age", "sign_in_link_ttl"):
        if getattr(ac, key) <= timedelta(0):
            raise key_error(f"admin_console.{key}", "must be positive")
    if ac.session_idle_timeout > ac.session_max_age:
        raise key_error("admin_console.session_idle_timeout",
                        "must not be longer than admin_console.session_max_age")
