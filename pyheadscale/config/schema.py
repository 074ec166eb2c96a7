"""The config schema: one pydantic model per section of Headscale 0.29's config.yaml.

Attribute names mirror the YAML keys (`pass_` and `global_` excepted); defaults are Headscale's
code defaults unless a comment says otherwise. Cross-field rules live in checks.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from pyheadscale.config.fields import (
    ByteSize,
    FileMode,
    GoDuration,
    GroupPrefix,
    IPv4Addr,
    IPv4Prefix,
    IPv6Addr,
    IPv6Prefix,
    LowerStr,
    NodeKeyText,
    OptInt,
    OptPath,
    OptStr,
    PathList,
    PositiveDuration,
    PromDuration,
    ProxyPrefixList,
    Section,
    SSLSetting,
    StrList,
    StrListMap,
    StrMap,
    json_if_str,
    words,
)


class NoiseConfig(Section):
    private_key_path: OptPath = None


class PrefixesConfig(Section):
    v4: IPv4Prefix = None
    v6: IPv6Prefix = None
    allocation: str = "sequential"


def _mesh_peer(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class MeshPeer(Section):
    """pyheadscale-only: a relay of the same region to mesh with (docs/limits.md).

    `url` is host:port or a full URL. Without `public_key` the peer's TLS certificate is
    verified (system CAs, or derp.server.mesh_ca_cert_path); with it, the peer must present
    that DERP key before the mesh key is sealed to it."""

    url: str
    public_key: NodeKeyText = None


class DERPServerConfig(Section):
    enabled: bool = False
    # Headscale has no code defaults for the next three; the example's values are used.
    region_id: int = 999
    region_code: str = "headscale"
    region_name: str = "Headscale Embedded DERP"
    verify_clients: bool = True
    stun_listen_addr: str = ""
    private_key_path: OptPath = None
    automatically_add_embedded_derp_region: bool = True
    ipv4: IPv4Addr = None
    ipv6: IPv6Addr = None
    # pyheadscale-only: a separate TLS listener for the relay.  Unset: the relay is on the
    # main listener when server_url is https, else on listen_addr's host, port 8443.
    listen_addr: OptStr = None
    hostname: str = ""  # default: host of server_url
    tls_cert_path: OptPath = None  # both absent: a self-signed certificate is generated
    tls_key_path: OptPath = None
    insecure_for_tests: bool = False
    # pyheadscale-only: mesh with the other relays of this region (derper's --mesh-psk-file
    # and --mesh-with); a region with several relays is described in derp.paths.
    mesh_key_path: OptPath = None
    mesh_with: Annotated[list[Annotated[MeshPeer, BeforeValidator(_mesh_peer)]],
                         BeforeValidator(words)] = Field(default_factory=list)
    mesh_ca_cert_path: OptPath = None  # CA to verify mesh peers with (default: the system's)


class DERPConfig(Section):
    server: DERPServerConfig = Field(default_factory=DERPServerConfig)
    urls: StrList = Field(default_factory=list)
    paths: PathList = Field(default_factory=list)
    auto_update_enabled: bool = False
    update_frequency: GoDuration = timedelta(hours=3)


class EphemeralConfig(Section):
    inactivity_timeout: GoDuration = timedelta(seconds=120)


class HARoutesConfig(Section):
    probe_interval: GoDuration = timedelta(seconds=10)
    probe_timeout: GoDuration = timedelta(seconds=5)


class RoutesConfig(Section):
    ha: HARoutesConfig = Field(default_factory=HARoutesConfig)


class NodeConfig(Section):
    # Zero means nodes never expire by default (Headscale's "0").
    expiry: PromDuration = timedelta(0)
    ephemeral: EphemeralConfig = Field(default_factory=EphemeralConfig)
    routes: RoutesConfig = Field(default_factory=RoutesConfig)


class PreAuthKeysConfig(Section):
    revoked_retention: GoDuration = timedelta(hours=168)


class GormConfig(Section):
    # No viper defaults in Headscale, so absent keys read as false / 0.
    prepare_stmt: bool = False
    parameterized_queries: bool = False
    skip_err_record_not_found: bool = False
    slow_threshold: int = 0  # milliseconds


class SqliteConfig(Section):
    path: OptPath = None
    write_ahead_log: bool = True
    wal_autocheckpoint: int = 1000


class PostgresConfig(Section):
    host: str = ""
    port: OptInt = None
    name: str = ""
    user: str = ""
    pass_: str = Field("", alias="pass", repr=False)
    ssl: SSLSetting = False
    max_open_conns: int = 10
    max_idle_conns: int = 10
    conn_max_idle_time_secs: int = 3600

    @property
    def sslmode(self) -> str | None:
        """libpq sslmode as Headscale derives it: false -> disable, true -> driver default."""
        if self.ssl is False:
            return "disable"
        if self.ssl is True:
            return None
        return str(self.ssl)


class DatabaseConfig(Section):
    type: LowerStr = ""  # "sqlite" (from sqlite/sqlite3) | "postgres"
    debug: bool = False
    gorm: GormConfig = Field(default_factory=GormConfig)
    sqlite: SqliteConfig = Field(default_factory=SqliteConfig)
    postgres: PostgresConfig = Field(default_factory=lambda: PostgresConfig.model_validate({}))


class LogConfig(Section):
    level: LowerStr = "info"
    format: LowerStr = "text"


class PolicyConfig(Section):
    mode: LowerStr = "file"
    path: OptPath = None

    @property
    def is_empty(self) -> bool:
        """File mode without a path: no policy, everything is allowed."""
        return self.mode == "file" and self.path is None


class NameserversConfig(Section):
    global_: StrList = Field(default_factory=list, alias="global")
    split: StrListMap = Field(default_factory=dict)


class ExtraRecord(Section):
    name: str
    type: str = ""  # "" lets the client infer A or AAAA from the value
    value: str


class DNSConfig(Section):
    magic_dns: bool = True
    base_domain: str = ""
    override_local_dns: bool = True
    nameservers: NameserversConfig = Field(default_factory=NameserversConfig)
    search_domains: StrList = Field(default_factory=list)
    extra_records: Annotated[list[ExtraRecord], BeforeValidator(json_if_str)] = Field(
        default_factory=list)
    extra_records_path: OptPath = None


class PKCEConfig(Section):
    enabled: bool = False
    method: str = "S256"


class PolicyGroupsConfig(Section):
    """pyheadscale-only: IdP groups usable in the policy (see pyheadscale/policy/idpgroups.py)."""

    enabled: bool = False
    prefix: GroupPrefix = ""


class OIDCConfig(Section):
    only_start_if_oidc_is_available: bool = True
    issuer: str = ""
    client_id: str = ""
    client_secret: str = Field("", repr=False)  # filled from client_secret_path when that is set
    client_secret_path: OptStr = None
    use_expiry_from_token: bool = False
    scope: StrList = Field(default_factory=lambda: ["openid", "profile", "email"])
    email_verified_required: bool = True
    extra_params: StrMap = Field(default_factory=dict)
    allowed_domains: StrList = Field(default_factory=list)
    allowed_users: StrList = Field(default_factory=list)
    allowed_groups: StrList = Field(default_factory=list)
    pkce: PKCEConfig = Field(default_factory=PKCEConfig)
    policy_groups: PolicyGroupsConfig = Field(default_factory=PolicyGroupsConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


class AdminConsoleConfig(Section):
    """pyheadscale-only: the web admin console served by the server (docs/console.md)."""

    enabled: bool = True
    path: str = "/admin"
    # A session ends after this long without a request, and in any case after max_age.
    session_idle_timeout: GoDuration = timedelta(minutes=30)
    session_max_age: GoDuration = timedelta(hours=12)
    sign_in_link_ttl: GoDuration = timedelta(minutes=10)
    # Who may sign in with OIDC: an e-mail address, a user name, or group:<IdP group>.
    admins: StrList = Field(default_factory=list)
    auditors: StrList = Field(default_factory=list)  # read-only


class LogtailConfig(Section):
    enabled: bool = False


class TaildropConfig(Section):
    enabled: bool = True


class AutoUpdateConfig(Section):
    enabled: bool = False


class CLIConfig(Section):
    address: str = ""
    api_key: str = Field("", repr=False)
    timeout: GoDuration = timedelta(seconds=5)
    insecure: bool = False


class TuningConfig(Section):
    notifier_send_timeout: GoDuration = timedelta(milliseconds=800)
    # pyheadscale batches over tens of milliseconds (Headscale's 800ms feels laggy).
    batch_change_delay: GoDuration = timedelta(milliseconds=100)
    node_mapsession_buffered_chan_size: int = 30
    batcher_workers: int = 0  # Headscale: 0 is 3/4 of the CPUs
    register_cache_expiration: GoDuration = timedelta(minutes=15)
    register_cache_max_entries: int = 1024
    node_store_batch_size: int = 100
    node_store_batch_timeout: GoDuration = timedelta(milliseconds=500)
    # pyheadscale-only: new map sessions opening at once, and how long one waits for its
    # turn before it is answered 503 (control/admission.py, whose LIMIT and MAX_WAIT_S are the
    # same numbers, tested; bounds in config/checks.py).
    node_mapsession_open_limit: int = 16
    node_mapsession_open_timeout: GoDuration = timedelta(seconds=45)


class LimitsConfig(Section):
    """pyheadscale-only: what an anonymous or hostile peer can make the server hold.

    Every default is documented with its reason in docs/limits.md."""

    # Every TCP listener (main, metrics, the relay's own TLS listener).
    request_head_timeout: PositiveDuration = timedelta(seconds=30)
    keepalive_timeout: PositiveDuration = timedelta(seconds=75)
    max_connections_per_source: int = Field(0, ge=0)  # 0: no limit
    # Noise (/ts2021) connections.
    noise_handshake_timeout: PositiveDuration = timedelta(seconds=10)
    unregistered_idle_timeout: PositiveDuration = timedelta(seconds=60)
    # HTTP/2 inside Noise.
    http2_max_concurrent_streams: int = Field(100, ge=1)
    http2_max_buffered_body: ByteSize = 1 << 20  # per connection
    http2_max_buffered_body_total: ByteSize = 64 << 20  # all connections together
    http2_body_timeout: PositiveDuration = timedelta(seconds=30)
    http2_max_queued_control_frames: int = Field(10_000, ge=16)
    # Interactive (web/OIDC) registrations waiting for an admin or the user.
    pending_per_source: int = Field(16, ge=1)
    pending_per_machine: int = Field(4, ge=1)  # open login URLs of one machine key
    pending_hostinfo_bytes: ByteSize = 8 << 20  # all pending registrations together
    registration_rate: float = Field(1.0, gt=0)  # per second and source address
    registration_burst: int = Field(20, ge=1)


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """PYHEADSCALE_DATA_DIR, else $XDG_DATA_HOME/pyheadscale (~/.local/share/pyheadscale).

    Never the working directory: the server and the CLI must resolve the same directory (and
    so the same CLI socket) wherever each is started from.
    """
    env = os.environ if env is None else env
    if env.get("PYHEADSCALE_DATA_DIR"):
        return Path(env["PYHEADSCALE_DATA_DIR"])
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is ignored
        return Path(xdg) / "pyheadscale"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "share" / "pyheadscale"


class Config(BaseModel):
    """The whole configuration; attribute names mirror the YAML keys (pass_/global_ excepted)."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True,
                              validate_by_name=True, validate_by_alias=True)

    server_url: str = ""
    listen_addr: str = ""
    metrics_listen_addr: str = ""
    grpc_listen_addr: str = ":50443"  # v0.29 gRPC; accepted, unused by pyheadscale
    grpc_allow_insecure: bool = False
    trusted_proxies: ProxyPrefixList = Field(default_factory=list)
    # pyheadscale-only: browser origins allowed to call /api/v1 (web UIs on another origin).
    cors_allowed_origins: StrList = Field(default_factory=list)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    prefixes: PrefixesConfig = Field(default_factory=PrefixesConfig)
    derp: DERPConfig = Field(default_factory=DERPConfig)
    disable_check_updates: bool = False
    node: NodeConfig = Field(default_factory=NodeConfig)
    preauth_keys: PreAuthKeysConfig = Field(default_factory=PreAuthKeysConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    acme_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_email: str = ""
    tls_letsencrypt_hostname: str = ""
    tls_letsencrypt_cache_dir: OptPath = Path("/var/www/.cache")
    tls_letsencrypt_challenge_type: str = "HTTP-01"
    tls_letsencrypt_listen: str = ":http"
    tls_cert_path: OptPath = None
    tls_key_path: OptPath = None
    log: LogConfig = Field(default_factory=LogConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    dns: DNSConfig = Field(default_factory=DNSConfig)
    unix_socket: str = "/var/run/headscale/headscale.sock"
    unix_socket_permission: FileMode = 0o770
    oidc: OIDCConfig = Field(default_factory=lambda: OIDCConfig.model_validate({}))
    logtail: LogtailConfig = Field(default_factory=LogtailConfig)
    taildrop: TaildropConfig = Field(default_factory=TaildropConfig)
    auto_update: AutoUpdateConfig = Field(default_factory=AutoUpdateConfig)
    cli: CLIConfig = Field(default_factory=lambda: CLIConfig.model_validate({}))
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    admin_console: AdminConsoleConfig = Field(default_factory=AdminConsoleConfig)
    # pyheadscale-only: bounds for anonymous and hostile peers (docs/limits.md).
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig.model_validate({}))
    # pyheadscale-only: where generated files live (keys, certificates, the default database).
    data_dir: Path = Field(default_factory=default_data_dir)
    # Not YAML keys: filled by load_config.
    config_file: Path | None = None
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _derived(self) -> Config:
        """Fill the defaults that depend on other keys, so any construction path gets them."""
        srv = self.derp.server
        if not srv.hostname:
            srv.hostname = urlsplit(self.server_url).hostname or ""
        if not srv.listen_addr:
            # DERP is served on the main listener (the map points at server_url) when
            # server_url is https; clients speak DERP only over TLS, so a plain-http server
            # gets a separate TLS listener on port 8443 instead.
            srv.listen_addr = None
            if urlsplit(self.server_url).scheme != "https":
                host = self.listen_addr.rpartition(":")[0] if ":" in self.listen_addr else ""
                srv.listen_addr = f"{host}:8443"
        if self.tuning.register_cache_expiration <= timedelta(0):
            self.tuning.register_cache_expiration = timedelta(minutes=15)
        if self.tuning.register_cache_max_entries <= 0:
            self.tuning.register_cache_max_entries = 1024
        if self.database.type == "sqlite3":
            self.database.type = "sqlite"
        return self

    def domain(self) -> str:
        """The server_url's host name (Headscale's Config.Domain), else dns.base_domain."""
        return urlsplit(self.server_url).hostname or self.dns.base_domain


INTERNAL_FIELDS = frozenset({"config_file", "warnings"})
