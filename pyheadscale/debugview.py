"""The JSON (and text) bodies of the /debug endpoints, in Headscale 0.29's shapes.

Headscale marshals Go structs: `DebugOverviewInfo`, `DebugDERPInfo`, `types.DebugRoutes`,
`DebugBatcherInfo` have json tags (snake_case); `types.Config` and `types.Node` have none,
so their keys are the Go field names, durations are integer nanoseconds and file modes
numbers. Secrets are left out as Headscale's `json:"-"` tags leave them out (the database
password, the OIDC client secret, the CLI API key), and so are the pre-auth key's hash and
legacy plaintext key inside a node. Everything here is a pure function of the state it is
given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pyheadscale.config import Config
from pyheadscale.durations import format_go_duration
from pyheadscale.state.model import IPNetwork, Node, PreAuthKey, User
from pyheadscale.state.routes import is_exit_route
from pyheadscale.tailcfg import KeyKind, encode_key

JSON = dict[str, Any]


def go_time(dt: datetime | None) -> str | None:
    """time.Time as encoding/json writes it (RFC 3339 with nanoseconds when non-zero)."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    frac = f".{dt.microsecond:06d}".rstrip("0") if dt.microsecond else ""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def ns(d: timedelta) -> int:
    """time.Duration: integer nanoseconds."""
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000


def _url(u: str) -> JSON:
    """url.URL as encoding/json writes it (exported fields)."""
    p = urlsplit(u)
    return {"Scheme": p.scheme, "Opaque": "", "User": None, "Host": p.netloc, "Path": p.path,
            "RawPath": "", "OmitHost": False, "ForceQuery": False, "RawQuery": p.query,
            "Fragment": p.fragment, "RawFragment": ""}


def _str(v: object | None) -> str:
    return "" if v is None else str(v)


def config(cfg: Config, tailcfg_dns: Mapping[str, Any] | None) -> JSON:
    """GET /debug/config: Headscale's types.Config, secrets left out."""
    db, derp, srv, oidc, t = cfg.database, cfg.derp, cfg.derp.server, cfg.oidc, cfg.tuning
    pg = db.postgres
    return {
        "ServerURL": cfg.server_url, "Addr": cfg.listen_addr, "MetricsAddr": cfg.metrics_listen_addr,
        "GRPCAddr": cfg.grpc_listen_addr, "GRPCAllowInsecure": cfg.grpc_allow_insecure,
        "TrustedProxies": [str(p) for p in cfg.trusted_proxies],
        "Node": {"Expiry": ns(cfg.node.expiry),
                 "Ephemeral": {"InactivityTimeout": ns(cfg.node.ephemeral.inactivity_timeout)},
                 "Routes": {"HA": {"ProbeInterval": ns(cfg.node.routes.ha.probe_interval),
                                   "ProbeTimeout": ns(cfg.node.routes.ha.probe_timeout)}}},
        "PrefixV4": _str(cfg.prefixes.v4) or None, "PrefixV6": _str(cfg.prefixes.v6) or None,
        "IPAllocation": cfg.prefixes.allocation,
        "NoisePrivateKeyPath": _str(cfg.noise.private_key_path),
        "BaseDomain": cfg.dns.base_domain,
        "Log": {"Format": cfg.log.format or "text", "Level": cfg.log.level},
        "DisableUpdateCheck": cfg.disable_check_updates,
        "Database": {
            "Type": "sqlite3" if db.type == "sqlite" else db.type, "Debug": db.debug,
            "Gorm": {"Debug": db.debug, "SlowThreshold": db.gorm.slow_threshold * 1_000_000,
                     "SkipErrRecordNotFound": db.gorm.skip_err_record_not_found,
                     "ParameterizedQueries": db.gorm.parameterized_queries,
                     "PrepareStmt": db.gorm.prepare_stmt},
            "Sqlite": {"Path": _str(db.sqlite.path), "WriteAheadLog": db.sqlite.write_ahead_log,
                       "WALAutoCheckPoint": db.sqlite.wal_autocheckpoint},
            "Postgres": {"Host": pg.host, "Port": pg.port or 0, "Name": pg.name, "User": pg.user,
                         "Ssl": _str(pg.ssl).lower(), "MaxOpenConnections": pg.max_open_conns,
                         "MaxIdleConnections": pg.max_idle_conns,
                         "ConnMaxIdleTimeSecs": pg.conn_max_idle_time_secs},
        },
        "DERP": {
            "ServerEnabled": srv.enabled,
            "AutomaticallyAddEmbeddedDerpRegion": srv.automatically_add_embedded_derp_region,
            "ServerRegionID": srv.region_id, "ServerRegionCode": srv.region_code,
            "ServerRegionName": srv.region_name,
            "ServerPrivateKeyPath": _str(srv.private_key_path),
            "ServerVerifyClients": srv.verify_clients, "STUNAddr": srv.stun_listen_addr,
            "URLs": [_url(u) for u in derp.urls], "Paths": [str(p) for p in derp.paths],
            "DERPMap": None, "AutoUpdate": derp.auto_update_enabled,
            "UpdateFrequency": ns(derp.update_frequency),
            "IPv4": _str(srv.ipv4), "IPv6": _str(srv.ipv6),
        },
        "TLS": {"CertPath": _str(cfg.tls_cert_path), "KeyPath": _str(cfg.tls_key_path),
                "LetsEncrypt": {"Listen": cfg.tls_letsencrypt_listen,
                                "Hostname": cfg.tls_letsencrypt_hostname,
                                "CacheDir": _str(cfg.tls_letsencrypt_cache_dir),
                                "ChallengeType": cfg.tls_letsencrypt_challenge_type}},
        "ACMEURL": cfg.acme_url, "ACMEEmail": cfg.acme_email,
        "DNSConfig": {
            "MagicDNS": cfg.dns.magic_dns, "BaseDomain": cfg.dns.base_domain,
            "OverrideLocalDNS": cfg.dns.override_local_dns,
            "Nameservers": {"Global": list(cfg.dns.nameservers.global_),
                            "Split": {k: list(v) for k, v in cfg.dns.nameservers.split.items()}},
            "SearchDomains": list(cfg.dns.search_domains),
            "ExtraRecords": [{"Name": r.name, "Type": r.type, "Value": r.value}
                             for r in cfg.dns.extra_records],
            "ExtraRecordsPath": _str(cfg.dns.extra_records_path),
        },
        "TailcfgDNSConfig": dict(tailcfg_dns) if tailcfg_dns is not None else None,
        "UnixSocket": cfg.unix_socket, "UnixSocketPermission": cfg.unix_socket_permission,
        "OIDC": {
            "OnlyStartIfOIDCIsAvailable": oidc.only_start_if_oidc_is_available,
            "Issuer": oidc.issuer, "ClientID": oidc.client_id, "Scope": list(oidc.scope),
            "ExtraParams": dict(oidc.extra_params), "AllowedDomains": list(oidc.allowed_domains),
            "AllowedUsers": list(oidc.allowed_users),
            "AllowedGroups": list(oidc.allowed_groups),
            "EmailVerifiedRequired": oidc.email_verified_required,
            "UseExpiryFromToken": oidc.use_expiry_from_token,
            "PKCE": {"Enabled": oidc.pkce.enabled, "Method": oidc.pkce.method},
        },
        "LogTail": {"Enabled": cfg.logtail.enabled}, "Taildrop": {"Enabled": cfg.taildrop.enabled},
        "AutoUpdate": {"Enabled": cfg.auto_update.enabled},
        "CLI": {"Address": cfg.cli.address, "Timeout": ns(cfg.cli.timeout),
                "Insecure": cfg.cli.insecure},
        "Policy": {"Path": _str(cfg.policy.path), "Mode": cfg.policy.mode},
        "Tuning": {"NotifierSendTimeout": ns(t.notifier_send_timeout),
                   "BatchChangeDelay": ns(t.batch_change_delay),
                   "NodeMapSessionBufferedChanSize": t.node_mapsession_buffered_chan_size,
                   "BatcherWorkers": t.batcher_workers,
                   "RegisterCacheExpiration": ns(t.register_cache_expiration),
                   "RegisterCacheMaxEntries": t.register_cache_max_entries,
                   "NodeStoreBatchSize": t.node_store_batch_size,
                   "NodeStoreBatchTimeout": ns(t.node_store_batch_timeout)},
    }


def _expired(n: Node, now: datetime) -> bool:
    return n.expiry is not None and n.expiry < now


def owner_name(n: Node, users: Mapping[int, User]) -> str:
    """Headscale's node.Owner().Name(): the user's name, or "tagged-devices" for tagged nodes."""
    if n.user_id is None or n.is_tagged:
        return "tagged-devices"
    u = users.get(n.user_id)
    return u.name if u is not None else ""


def overview(nodes: Iterable[Node], users: Mapping[int, User], *, policy_mode: str,
             policy_path: str, derp_regions: int | None, primary_routes: int,
             now: datetime) -> JSON:
    """DebugOverviewInfo."""
    nodes = list(nodes)
    per_user: dict[str, int] = {}
    for n in nodes:
        name = owner_name(n, users)
        per_user[name] = per_user.get(name, 0) + 1
    policy: JSON = {"mode": policy_mode}
    if policy_mode == "file" and policy_path:
        policy["path"] = policy_path
    return {
        "nodes": {"total": len(nodes), "online": sum(1 for n in nodes if n.online),
                  "expired": sum(1 for n in nodes if _expired(n, now)),
                  "ephemeral": sum(1 for n in nodes if n.ephemeral)},
        "users": per_user, "total_users": len(users), "policy": policy,
        "derp": {"configured": derp_regions is not None, "regions": derp_regions or 0},
        "primary_routes": primary_routes,
    }


def overview_text(info: JSON) -> str:
    n = info["nodes"]
    lines = ["=== Headscale State Overview ===", "", f"Nodes: {n['total']} total",
             f"  - Online: {n['online']}", f"  - Expired: {n['expired']}",
             f"  - Ephemeral: {n['ephemeral']}", "", f"Users: {info['total_users']} total"]
    lines += [f"  - {name}: {count} nodes" for name, count in sorted(info["users"].items())]
    lines += ["", "Policy:", f"  - Mode: {info['policy']['mode']}"]
    if "path" in info["policy"]:
        lines.append(f"  - Path: {info['policy']['path']}")
    d = info["derp"]
    lines += ["", f"DERP: {d['regions']} regions configured" if d["configured"]
              else "DERP: not configured", "",
              f"Primary Routes: {info['primary_routes']} active", "",
              "Registration Cache: active", ""]
    return "\n".join(lines) + "\n"


def derp(derp_map: Mapping[str, Any]) -> JSON:
    """DebugDERPInfo."""
    regions = derp_map.get("Regions") or {}
    out: JSON = {"configured": bool(derp_map), "total_regions": len(regions)}
    if regions:
        out["regions"] = {
            str(rid): {"region_id": int(r.get("RegionID", rid)),
                       "region_name": r.get("RegionName", ""),
                       "nodes": [{k: v for k, v in (
                           ("name", n.get("Name", "")), ("hostname", n.get("HostName", "")),
                           ("derp_port", n.get("DERPPort", 0)),
                           ("stun_port", n.get("STUNPort", 0))) if k != "stun_port" or v}
                           for n in r.get("Nodes") or ()]}
            for rid, r in sorted(regions.items(), key=lambda kv: int(kv[0]))}
    return out


def derp_text(info: JSON) -> str:
    if not info["configured"]:
        return "DERP Map: not configured\n"
    lines = ["=== DERP Map Configuration ===", "", f"Total Regions: {info['total_regions']}", ""]
    for rid, r in (info.get("regions") or {}).items():
        lines += [f"Region {rid}: {r['region_name']}", f"  - Nodes: {len(r['nodes'])}"]
        for n in r["nodes"]:
            lines.append(f"    - {n['name']} ({n['hostname']}:{n['derp_port']})")
            if n.get("stun_port"):
                lines.append(f"      STUN: {n['stun_port']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _user(u: User | None) -> JSON | None:
    if u is None:
        return None
    created = go_time(u.created_at)
    return {"ID": u.id, "CreatedAt": created, "UpdatedAt": created, "DeletedAt": None,
            "Name": u.name, "DisplayName": u.display_name, "Email": u.email,
            "ProviderIdentifier": {"String": u.provider_identifier or "",
                                   "Valid": u.provider_identifier is not None},
            "Provider": u.provider, "ProfilePicURL": u.profile_pic_url}


def _auth_key(k: PreAuthKey | None) -> JSON | None:
    if k is None:
        return None
    return {"ID": k.id, "Prefix": k.prefix, "UserID": k.user_id, "Reusable": k.reusable,
            "Ephemeral": k.ephemeral, "Used": k.used, "Tags": list(k.tags),
            "CreatedAt": go_time(k.created_at), "Expiration": go_time(k.expiration)}


def _prefixes(routes: Iterable[IPNetwork]) -> list[str]:
    return [str(r) for r in routes]


def node(n: Node, users: Mapping[int, User], keys: Mapping[int, PreAuthKey], *,
         unhealthy: bool, connected: bool) -> JSON:
    """types.Node as /debug/nodestore shows it."""
    key = keys.get(n.auth_key_id) if n.auth_key_id is not None else None
    return {
        "ID": n.id, "MachineKey": encode_key(KeyKind.MACHINE, n.machine_key),
        "NodeKey": encode_key(KeyKind.NODE, n.node_key),
        "DiscoKey": encode_key(KeyKind.DISCO, n.disco_key),
        "Endpoints": list(n.endpoints), "Hostinfo": n.hostinfo or None,
        "IPv4": _str(n.ipv4) or None, "IPv6": _str(n.ipv6) or None,
        "Hostname": n.hostname, "GivenName": n.given_name, "UserID": n.user_id,
        "User": _user(users.get(n.user_id)) if n.user_id is not None else None,
        "RegisterMethod": n.register_method, "Tags": list(n.tags) or None,
        "AuthKeyID": n.auth_key_id, "AuthKey": _auth_key(key),
        "Expiry": go_time(n.expiry), "LastSeen": go_time(n.last_seen),
        "ApprovedRoutes": _prefixes(n.approved_routes) or None,
        "CreatedAt": go_time(n.created_at), "UpdatedAt": go_time(n.updated_at),
        "DeletedAt": None, "IsOnline": n.online, "Unhealthy": unhealthy,
        "ActiveSessions": 1 if connected else 0, "SessionEpoch": 0,
    }


def approved_served(n: Node) -> list[IPNetwork]:
    """AllApprovedRoutes: approved routes the node also announces (subnets, then exits)."""
    announced = set(n.announced_routes)
    served = [r for r in n.approved_routes if r in announced]
    return [r for r in served if not is_exit_route(r)] + [r for r in served if is_exit_route(r)]


def _sort_key(r: IPNetwork) -> tuple[int, int, int]:
    return (r.version, int(r.network_address), r.prefixlen)


def routes(nodes: Iterable[Node], primaries: Mapping[int, Iterable[IPNetwork]],
           unhealthy: Iterable[int]) -> JSON:
    """types.DebugRoutes."""
    available = {str(n.id): _prefixes(sorted(approved_served(n), key=_sort_key))
                 for n in sorted(nodes, key=lambda n: n.id)
                 if n.online and approved_served(n)}
    primary = {str(p): nid for nid, prefixes in sorted(primaries.items()) for p in prefixes
               if not is_exit_route(ipaddress.ip_network(p) if isinstance(p, str) else p)}
    out: JSON = {"available_routes": available, "primary_routes": primary}
    bad = sorted(set(unhealthy))
    if bad:
        out["unhealthy_nodes"] = bad
    return out


def routes_text(info: JSON) -> str:
    return "".join(f"{prefix}: {nid}\n" for prefix, nid in sorted(info["primary_routes"].items()))


def batcher(node_ids: Iterable[int], connected: Iterable[int]) -> JSON:
    """DebugBatcherInfo: every node the server knows, connected or not."""
    up = set(connected)
    ids = sorted(set(node_ids) | up)
    return {"connected_nodes": {str(i): {"connected": i in up,
                                         "active_connections": 1 if i in up else 0}
                                for i in ids},
            "total_nodes": len(ids)}


def batcher_text(info: JSON) -> str:
    lines = ["=== Batcher Connected Nodes ===", ""]
    up = 0
    for nid, st in sorted(info["connected_nodes"].items(), key=lambda kv: int(kv[0])):
        if st["connected"]:
            up += 1
            lines.append(f"Node {nid}:\tconnected ({st['active_connections']} connections)")
        else:
            lines.append(f"Node {nid}:\tdisconnected")
    lines += ["", f"Summary: {up} connected, {info['total_nodes']} total"]
    return "\n".join(lines) + "\n"


def registration_cache(current: int, expiration: timedelta, max_entries: int) -> JSON:
    return {"type": "expirable-lru", "expiration": format_go_duration(expiration),
            "max_entries": max_entries, "current_len": current, "status": "active"}
