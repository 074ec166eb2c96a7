"""Typed configuration: Headscale 0.29's config.yaml schema, defaults and checks, plus HEADSCALE_* env.

Entry points: `load_config` (what every command calls), `find_config_file` and `default_config`
(the embedded default used when no file exists). Every problem becomes one `ConfigError` whose
message is a single line naming the key path, e.g. `config: dns.base_domain: required when ...`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from fractions import Fraction
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

log = logging.getLogger("pyheadscale.config")

ENV_PREFIX = "HEADSCALE_"
CONFIG_NAMES = ("config.json", "config.toml", "config.yaml", "config.yml")  # viper's ext order
SYSTEM_CONFIG_DIR = Path("/etc/headscale")
CGNAT_V4 = IPv4Network("100.64.0.0/10")
TAILSCALE_ULA_V6 = IPv6Network("fd7a:115c:a1e0::/48")
MIN_EPHEMERAL_INACTIVITY = timedelta(seconds=65)  # map keepalive (60s) plus slack, as Headscale
LOG_LEVELS = ("panic", "fatal", "error", "warn", "info", "debug", "trace", "disabled")


class ConfigError(Exception):
    """A configuration problem; str() is the one-line message the CLI prints before exit 1."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message


def _err(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config: {key}: {problem}", key)


def _q(value: Any) -> str:
    """Quote a value Go-style for messages ("x" for strings)."""
    return json.dumps(value, default=str) if isinstance(value, str) else str(value)


# --- durations ------------------------------------------------------------------------------

_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
       "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_PROM = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_PROM_MS = (365 * 86400_000, 7 * 86400_000, 86400_000, 3600_000, 60_000, 1000, 1)


def parse_go_duration(value: Any) -> timedelta:
    """Go's time.ParseDuration ("800ms", "1h30m", "1.5h", "0"); as viper, a YAML 0 is 0.

    A bare non-zero number is refused: viper would read it as nanoseconds, always a mistake.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"30s\" or \"1h30m\", got {_q(value)}")
    text = str(value).strip()
    if text in ("0", "+0", "-0"):
        return timedelta(0)
    body = text.lstrip("+-")
    sign = -1 if text.startswith("-") else 1
    total, pos = Fraction(0), 0
    for m in _GO_PART.finditer(body):
        if m.start() != pos:
            break
        total += Fraction(m.group(1)) * _NS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body) or len(text) - len(body) > 1:
        hint = " (missing unit: ns, us, ms, s, m or h)" if body.replace(".", "").isdigit() else ""
        raise ValueError(f"not a valid duration: {_q(text)}{hint}")
    return timedelta(microseconds=sign * round(total / 1000))


def parse_prometheus_duration(value: Any) -> timedelta:
    """Prometheus model.ParseDuration as Headscale uses for node.expiry ("180d", "1w2d", "0")."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"180d\", got {_q(value)}")
    text = str(value).strip()
    if text in ("", "0"):
        return timedelta(0)
    m = _PROM.fullmatch(text)
    if m is None or not any(m.groups()):
        raise ValueError(f"not a valid duration: {_q(text)} (whole numbers with units "
                         "y, w, d, h, m, s, ms, e.g. \"180d\"; \"0\" means no expiry)")
    ms = sum(int(g) * unit for g, unit in zip(m.groups(), _PROM_MS, strict=True) if g)
    return timedelta(milliseconds=ms)


def format_go_duration(td: timedelta) -> str:
    """Go's Duration.String(), for messages that quote Headscale's ("1m5s", "800ms", "0s")."""
    us = td // timedelta(microseconds=1)
    if us == 0:
        return "0s"
    sign, us = ("-", -us) if us < 0 else ("", us)
    if us < 1000:
        return f"{sign}{us}µs"
    if us < 1_000_000:
        return f"{sign}{_trim(us / 1000)}ms"
    h, rest = divmod(us, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    out = f"{h}h" if h else ""
    out += f"{m}m" if h or m else ""
    return f"{sign}{out}{_trim(rest / 1_000_000)}s"


def format_prometheus_duration(td: timedelta) -> str:
    """The inverse of parse_prometheus_duration ("0", "180d", "1d12h")."""
    ms = td // timedelta(milliseconds=1)
    if ms <= 0:
        return "0"
    out = ""
    for unit, size in zip(("d", "h", "m", "s", "ms"), _PROM_MS[2:], strict=True):
        count, ms = divmod(ms, size)
        out += f"{count}{unit}" if count else ""
    return out


def _trim(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


# --- field types ----------------------------------------------------------------------------

def _words(value: Any) -> Any:
    # viper's GetStringSlice splits a string (e.g. from env) on whitespace.
    if value is None:
        return []
    return value.split() if isinstance(value, str) else value


def _json_if_str(value: Any) -> Any:
    # viper decodes map-valued env vars as JSON; we do the same for lists of objects.
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise ValueError(f"not valid JSON: {e}") from None
    return value


def _empty_none(value: Any) -> Any:
    return None if value == "" else value


def _prefix(version: int) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value in (None, ""):
            return None
        try:
            if "/" not in str(value):
                raise ValueError
            net = ip_network(str(value).strip(), strict=False)  # netip accepts host bits too
        except ValueError:
            raise ValueError(f"not a valid IPv{version} prefix: {_q(str(value))}") from None
        if net.version != version:
            raise ValueError(f"not a valid IPv{version} prefix: {_q(str(value))}")
        return net
    return parse


def _proxy_prefix(value: Any) -> Any:
    try:
        net = ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a valid CIDR prefix: {_q(str(value))}") from None
    if net.prefixlen == 0:
        raise ValueError(f"{_q(str(value))}: 0.0.0.0/0 and ::/0 are not allowed")
    return net


def _ip(version: int) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value in (None, ""):
            return None
        try:
            addr = ip_address(str(value).strip())
        except ValueError:
            raise ValueError(f"not a valid IPv{version} address: {_q(str(value))}") from None
        if addr.version != version:
            raise ValueError(f"not a valid IPv{version} address: {_q(str(value))}")
        return addr
    return parse


def _file_mode(value: Any) -> Any:
    # YAML 1.1 already reads an unquoted 0770 as octal, so ints are taken as the mode itself.
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        text = str(value).strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f"not an octal file mode: {_q(str(value))}") from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"not an octal file mode: {_q(str(value))}")
    return mode


def _ssl(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "t", "f"):
        return value.strip().lower() in ("true", "1", "t")
    if not isinstance(value, bool | str):
        raise ValueError(f"must be true, false or a libpq sslmode name, got {_q(value)}")
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# Dumped (mode="json") in the YAML's own syntax, so a dumped config loads back.
GoDuration = Annotated[timedelta, BeforeValidator(parse_go_duration),
                      PlainSerializer(format_go_duration, return_type=str, when_used="json")]
PromDuration = Annotated[timedelta, BeforeValidator(parse_prometheus_duration),
                         PlainSerializer(format_prometheus_duration, return_type=str,
                                         when_used="json")]
StrList = Annotated[list[str], BeforeValidator(_words)]
OptPath = Annotated[Path | None, BeforeValidator(_empty_none)]
OptStr = Annotated[str | None, BeforeValidator(_empty_none)]
ProxyPrefix = Annotated[IPv4Network | IPv6Network, BeforeValidator(_proxy_prefix)]


class _Section(BaseModel):
    """A typed YAML section: unknown keys are errors, numbers are accepted where text is."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True,
                              validate_by_name=True, validate_by_alias=True)


# --- sections -------------------------------------------------------------------------------

class NoiseConfig(_Section):
    private_key_path: OptPath = None


class PrefixesConfig(_Section):
    v4: Annotated[IPv4Network | None, BeforeValidator(_prefix(4))] = None
    v6: Annotated[IPv6Network | None, BeforeValidator(_prefix(6))] = None
    allocation: str = "sequential"


class DERPServerConfig(_Section):
    enabled: bool = False
    # Headscale has no code defaults for the next three; the example's values are used.
    region_id: int = 999
    region_code: str = "headscale"
    region_name: str = "Headscale Embedded DERP"
    verify_clients: bool = True
    stun_listen_addr: str = ""
    private_key_path: OptPath = None
    automatically_add_embedded_derp_region: bool = True
    ipv4: Annotated[IPv4Address | None, BeforeValidator(_ip(4))] = None
    ipv6: Annotated[IPv6Address | None, BeforeValidator(_ip(6))] = None
    # pyheadscale-only: the embedded DERP has its own TLS listener.
    listen_addr: OptStr = None  # default: listen_addr's host, port 8443
    hostname: OptStr = None  # default: host of server_url
    tls_cert_path: OptPath = None  # both absent: a self-signed certificate is generated
    tls_key_path: OptPath = None
    insecure_for_tests: bool = False
    # pyheadscale-only: mesh with the other relays of this region (derper's --mesh-psk-file
    # and --mesh-with); a region with several relays is described in derp.paths.
    mesh_key_path: OptPath = None
    mesh_with: StrList = Field(default_factory=list)


class DERPConfig(_Section):
    server: DERPServerConfig = Field(default_factory=DERPServerConfig)
    urls: StrList = Field(default_factory=list)
    paths: Annotated[list[Path], BeforeValidator(_words)] = Field(default_factory=list)
    auto_update_enabled: bool = False
    update_frequency: GoDuration = timedelta(hours=3)


class EphemeralConfig(_Section):
    inactivity_timeout: GoDuration = timedelta(seconds=120)


class HARoutesConfig(_Section):
    probe_interval: GoDuration = timedelta(seconds=10)
    probe_timeout: GoDuration = timedelta(seconds=5)


class RoutesConfig(_Section):
    ha: HARoutesConfig = Field(default_factory=HARoutesConfig)


class NodeConfig(_Section):
    # Zero means nodes never expire by default (Headscale's "0").
    expiry: PromDuration = timedelta(0)
    ephemeral: EphemeralConfig = Field(default_factory=EphemeralConfig)
    routes: RoutesConfig = Field(default_factory=RoutesConfig)


class PreAuthKeysConfig(_Section):
    revoked_retention: GoDuration = timedelta(hours=168)


class GormConfig(_Section):
    # No viper defaults in Headscale, so absent keys read as false / 0.
    prepare_stmt: bool = False
    parameterized_queries: bool = False
    skip_err_record_not_found: bool = False
    slow_threshold: int = 0  # milliseconds


class SqliteConfig(_Section):
    path: OptPath = None
    write_ahead_log: bool = True
    wal_autocheckpoint: int = 1000


class PostgresConfig(_Section):
    host: str = ""
    port: Annotated[int | None, BeforeValidator(_empty_none)] = None
    name: str = ""
    user: str = ""
    pass_: str = Field("", alias="pass", repr=False)
    ssl: Annotated[bool | str, BeforeValidator(_ssl)] = False
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


class DatabaseConfig(_Section):
    type: Annotated[str, BeforeValidator(_lower)] = ""  # "sqlite" (from sqlite/sqlite3) | "postgres"
    debug: bool = False
    gorm: GormConfig = Field(default_factory=GormConfig)
    sqlite: SqliteConfig = Field(default_factory=SqliteConfig)
    postgres: PostgresConfig = Field(default_factory=lambda: PostgresConfig.model_validate({}))


class LogConfig(_Section):
    level: Annotated[str, BeforeValidator(_lower)] = "info"
    format: Annotated[str, BeforeValidator(_lower)] = "text"


class PolicyConfig(_Section):
    mode: Annotated[str, BeforeValidator(_lower)] = "file"
    path: OptPath = None

    @property
    def is_empty(self) -> bool:
        """File mode without a path: no policy, everything is allowed."""
        return self.mode == "file" and self.path is None


class NameserversConfig(_Section):
    global_: StrList = Field(default_factory=list, alias="global")
    split: Annotated[dict[str, StrList], BeforeValidator(_json_if_str)] = Field(
        default_factory=dict)


class ExtraRecord(_Section):
    name: str
    type: str = ""  # "" lets the client infer A or AAAA from the value
    value: str


class DNSConfig(_Section):
    magic_dns: bool = True
    base_domain: str = ""
    override_local_dns: bool = True
    nameservers: NameserversConfig = Field(default_factory=NameserversConfig)
    search_domains: StrList = Field(default_factory=list)
    extra_records: Annotated[list[ExtraRecord], BeforeValidator(_json_if_str)] = Field(
        default_factory=list)
    extra_records_path: OptPath = None


class PKCEConfig(_Section):
    enabled: bool = False
    method: str = "S256"


def _group_prefix(value: Any) -> Any:
    # The prefix goes verbatim into `group:<prefix><label>`; keep it in the label alphabet.
    if isinstance(value, str) and not re.fullmatch(r"[a-z0-9._-]*", value):
        raise ValueError(f"must use only a-z, 0-9, '.', '_' and '-', got {_q(value)}")
    return value


class PolicyGroupsConfig(_Section):
    """pyheadscale-only: IdP groups usable in the policy (see pyheadscale/policy/idpgroups.py)."""

    enabled: bool = False
    prefix: Annotated[str, BeforeValidator(_group_prefix)] = ""


class OIDCConfig(_Section):
    only_start_if_oidc_is_available: bool = True
    issuer: str = ""
    client_id: str = ""
    client_secret: str = Field("", repr=False)  # filled from client_secret_path when that is set
    client_secret_path: OptStr = None
    use_expiry_from_token: bool = False
    scope: StrList = Field(default_factory=lambda: ["openid", "profile", "email"])
    email_verified_required: bool = True
    extra_params: Annotated[dict[str, str], BeforeValidator(_json_if_str)] = Field(
        default_factory=dict)
    allowed_domains: StrList = Field(default_factory=list)
    allowed_users: StrList = Field(default_factory=list)
    allowed_groups: StrList = Field(default_factory=list)
    pkce: PKCEConfig = Field(default_factory=PKCEConfig)
    policy_groups: PolicyGroupsConfig = Field(default_factory=PolicyGroupsConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


class LogtailConfig(_Section):
    enabled: bool = False


class TaildropConfig(_Section):
    enabled: bool = True


class AutoUpdateConfig(_Section):
    enabled: bool = False


class CLIConfig(_Section):
    address: str = ""
    api_key: str = Field("", repr=False)
    timeout: GoDuration = timedelta(seconds=5)
    insecure: bool = False


class TuningConfig(_Section):
    notifier_send_timeout: GoDuration = timedelta(milliseconds=800)
    # pyheadscale batches over tens of milliseconds (Headscale's 800ms feels laggy).
    batch_change_delay: GoDuration = timedelta(milliseconds=50)
    node_mapsession_buffered_chan_size: int = 30
    batcher_workers: int = 0  # 0: 3/4 of the CPUs, at least 1 (resolved on load)
    register_cache_expiration: GoDuration = timedelta(minutes=15)
    register_cache_cleanup: GoDuration = timedelta(minutes=20)  # Headscale <=0.28 constant
    register_cache_max_entries: int = 1024
    node_store_batch_size: int = 100
    node_store_batch_timeout: GoDuration = timedelta(milliseconds=500)


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("PYHEADSCALE_DATA_DIR") or "./data")


class Config(BaseModel):
    """The whole configuration; attribute names mirror the YAML keys (pass_/global_ excepted)."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True,
                              validate_by_name=True, validate_by_alias=True)

    server_url: str = ""
    listen_addr: str = ""
    metrics_listen_addr: str = ""
    grpc_listen_addr: str = ":50443"  # v0.29 gRPC; accepted, unused by pyheadscale
    grpc_allow_insecure: bool = False
    trusted_proxies: Annotated[list[ProxyPrefix], BeforeValidator(_words)] = Field(
        default_factory=list)
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
    unix_socket_permission: Annotated[int, BeforeValidator(_file_mode)] = 0o770
    oidc: OIDCConfig = Field(default_factory=lambda: OIDCConfig.model_validate({}))
    logtail: LogtailConfig = Field(default_factory=LogtailConfig)
    taildrop: TaildropConfig = Field(default_factory=TaildropConfig)
    auto_update: AutoUpdateConfig = Field(default_factory=AutoUpdateConfig)
    cli: CLIConfig = Field(default_factory=lambda: CLIConfig.model_validate({}))
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    # pyheadscale-only: where generated files live (keys, certificates, the default database).
    data_dir: Path = Field(default_factory=default_data_dir)
    # Not YAML keys: filled by load_config.
    config_file: Path | None = None
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _derived(self) -> Config:
        """Fill the defaults that depend on other keys, so any construction path gets them."""
        srv = self.derp.server
        if srv.hostname is None:
            srv.hostname = urlsplit(self.server_url).hostname or None
        if srv.listen_addr is None:
            host = self.listen_addr.rpartition(":")[0] if ":" in self.listen_addr else ""
            srv.listen_addr = f"{host}:8443"
        if self.tuning.batcher_workers <= 0:
            self.tuning.batcher_workers = max((os.cpu_count() or 1) * 3 // 4, 1)
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


# --- locating and reading the file ----------------------------------------------------------

def find_config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """HEADSCALE_CONFIG, else the first config.{json,toml,yaml,yml} in /etc/headscale,
    $HOME/.headscale, then the current directory (viper's search as Headscale sets it up)."""
    env = os.environ if env is None else env
    if env.get("HEADSCALE_CONFIG"):
        return Path(env["HEADSCALE_CONFIG"])
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    for folder in (SYSTEM_CONFIG_DIR, home / ".headscale", Path(".")):
        for name in CONFIG_NAMES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: cannot parse {path}: not UTF-8 text") from None
    where = f"config: cannot parse {path}"
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f": line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
        raise ConfigError(f"{where}{pos}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: line {e.lineno} column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, "
                          f"got {type(data).__name__}")
    return data


# --- raw-dict helpers -------------------------------------------------------------------------

_MISSING = object()


def _get(raw: Mapping[str, Any], path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_set(raw: Mapping[str, Any], path: str) -> bool:
    value = _get(raw, path)
    return value is not _MISSING and value is not None


def _set(raw: dict[str, Any], path: str, value: Any) -> bool:
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return False  # a scalar where a section belongs: validation reports it
        node = child
    node[leaf] = value
    return True


def _drop_nulls(value: Any) -> Any:
    # An empty YAML key (`oidc:` with every child commented out) means "not set".
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        if name in INTERNAL_FIELDS:
            continue
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_leaf_paths(ann, key + "."))
        else:
            out.append(key)
    return out


# Old keys still looked up (viper.IsSet also sees the environment).
_DEPRECATED_KEYS = (
    "acl_policy_path", "dns_config.magic_dns", "dns_config.base_domain",
    "dns_config.override_local_dns", "dns_config.nameservers", "dns_config.restricted_nameservers",
    "dns_config.domains", "dns_config.extra_records", "dns_config.use_username_in_magic_dns",
    "dns.use_username_in_magic_dns", "oidc.strip_email_domain", "oidc.map_legacy_users",
    "oidc.expiry", "randomize_client_port", "ephemeral_node_inactivity_timeout",
)


def env_var_name(key: str) -> str:
    """viper's AutomaticEnv name: HEADSCALE_ + the key upper-cased with dots as underscores."""
    return ENV_PREFIX + key.upper().replace(".", "_")


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for key in (*_leaf_paths(Config), *_DEPRECATED_KEYS):
        value = env.get(env_var_name(key))
        if value:  # viper ignores empty variables unless AllowEmptyEnv
            _set(raw, key, value)


# --- deprecated and removed keys (Headscale's deprecator, same messages) ---------------------

_RENAMED = (
    ("policy.path", "acl_policy_path"),
    ("dns.magic_dns", "dns_config.magic_dns"),
    ("dns.base_domain", "dns_config.base_domain"),
    ("dns.override_local_dns", "dns_config.override_local_dns"),
    ("dns.nameservers.global", "dns_config.nameservers"),
    ("dns.nameservers.split", "dns_config.restricted_nameservers"),
    ("dns.search_domains", "dns_config.domains"),
    ("dns.extra_records", "dns_config.extra_records"),
)
_RANDOMIZE_HINT = (
    'Set "randomizeClientPort": true at the top level of your policy file (see policy.path / '
    'policy.mode), or grant the cap per-node via a "nodeAttrs" entry. See CHANGELOG.md '
    "(BREAKING / Configuration).")


def _deprecations(raw: dict[str, Any]) -> list[str]:
    warns: list[str] = []
    fatals: list[tuple[str, str]] = []

    def moved(old: str, new: str) -> str:
        return (f"The {_q(old)} configuration key is deprecated. Please use {_q(new)} instead. "
                f"{_q(old)} has been removed.")

    for new, old in _RENAMED:
        if _is_set(raw, old):
            if _is_set(raw, new):
                warns.append(moved(old, new))
            else:
                fatals.append((old, moved(old, new)))
    for old in ("dns.use_username_in_magic_dns", "dns_config.use_username_in_magic_dns",
                "oidc.strip_email_domain", "oidc.map_legacy_users"):
        if _is_set(raw, old):
            fatals.append((old, f"The {_q(old)} configuration key has been removed. "
                                "Please see the changelog for more details."))
    if _is_set(raw, "randomize_client_port"):
        fatals.append(("randomize_client_port", 'The "randomize_client_port" configuration key '
                                                f"has been removed. {_RANDOMIZE_HINT}"))
    if _is_set(raw, "oidc.expiry"):
        fatals.append(("oidc.expiry", 'The "oidc.expiry" configuration key has been removed. '
                                      'Please use "node.expiry" instead.'))
    if fatals:
        raise ConfigError("config: " + "; ".join(f"{k}: {m}" for k, m in fatals), fatals[0][0])

    old_eph, new_eph = "ephemeral_node_inactivity_timeout", "node.ephemeral.inactivity_timeout"
    if _is_set(raw, old_eph):
        warns.append(moved(old_eph, new_eph))
        if not _is_set(raw, new_eph) or _get(raw, new_eph) == "":
            _set(raw, new_eph, raw[old_eph])
    for old in ("acl_policy_path", "dns_config", old_eph):
        raw.pop(old, None)
    return warns


# --- validation -------------------------------------------------------------------------------

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
        return f"must be true or false, got {_q(value)}"
    if kind.startswith("int_"):
        return f"must be an integer, got {_q(value)}"
    if kind.startswith("string_"):
        return f"must be a string, got {_q(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {_q(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping, got {_q(value)}"
    return f"{error['msg']}, got {_q(value)}"


def _validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise _err(_loc(first["loc"]), _problem(first)) from None


def _check_hostport(key: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            raise _err(key, "required")
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise _err(key, f"must be host:port, got {_q(value)}")
    if host.startswith("[") != host.endswith("]"):
        raise _err(key, f"must be host:port, got {_q(value)}")


def _check_server_url(cfg: Config) -> None:
    url = cfg.server_url
    if not (url.startswith("http://") or url.startswith("https://")):
        raise _err("server_url", "must start with http:// or https://")
    try:
        host = urlsplit(url).hostname
        urlsplit(url).port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise _err("server_url", f"not a valid URL: {_q(url)}: {e}") from None
    if not host:
        raise _err("server_url", f"has no host: {_q(url)}")
    base = cfg.dns.base_domain.lower().rstrip(".")
    if not base:
        return
    # Tailscale clients take over base_domain, so the server must live outside it.
    if host == base:
        raise _err("server_url", "cannot use the same domain as base_domain in a way that could "
                                 "make the DERP and headscale server unreachable")
    if host.endswith("." + base):
        raise _err("server_url", "cannot be part of base_domain in a way that could make the "
                                 "DERP and headscale server unreachable")


def _check(cfg: Config, warns: list[str]) -> None:
    """Headscale's cross-field checks (validateServerConfig, LoadServerConfig and helpers)."""
    _check_server_url(cfg)
    _check_hostport("listen_addr", cfg.listen_addr, required=True)
    _check_hostport("metrics_listen_addr", cfg.metrics_listen_addr, required=False)
    if cfg.noise.private_key_path is None:
        raise _err("noise.private_key_path", "required (the Noise protocol private key; "
                                             "created when missing)")

    if cfg.prefixes.v4 is None and cfg.prefixes.v6 is None:
        raise _err("prefixes", "no IPv4 or IPv6 prefix configured, minimum one prefix is required")
    if cfg.prefixes.allocation not in ("sequential", "random"):
        raise _err("prefixes.allocation", f"invalid prefix allocation strategy: "
                   f"{_q(cfg.prefixes.allocation)}, allowed options: sequential, random")
    v4, v6 = cfg.prefixes.v4, cfg.prefixes.v6
    if (v4 and not v4.subnet_of(CGNAT_V4)) or (v6 and not v6.subnet_of(TAILSCALE_ULA_V6)):
        warns.append("prefixes: ranges outside 100.64.0.0/10 and fd7a:115c:a1e0::/48 are NOT "
                     "supported: the Tailscale client assumes these ranges")

    if cfg.tls_letsencrypt_hostname and (cfg.tls_cert_path or cfg.tls_key_path):
        raise _err("tls_letsencrypt_hostname", "set either tls_letsencrypt_hostname or "
                                               "tls_cert_path/tls_key_path, not both")
    if bool(cfg.tls_cert_path) != bool(cfg.tls_key_path):
        missing, other = (("tls_key_path", "tls_cert_path") if cfg.tls_cert_path
                          else ("tls_cert_path", "tls_key_path"))
        raise _err(missing, f"required when {other} is set")
    if cfg.tls_letsencrypt_challenge_type not in ("HTTP-01", "TLS-ALPN-01"):
        raise _err("tls_letsencrypt_challenge_type", "the only supported values are HTTP-01 and "
                   f"TLS-ALPN-01, got {_q(cfg.tls_letsencrypt_challenge_type)}")
    if (cfg.tls_letsencrypt_hostname and cfg.tls_letsencrypt_challenge_type == "TLS-ALPN-01"
            and not cfg.listen_addr.endswith(":443")):
        warns.append("when using tls_letsencrypt_hostname with TLS-ALPN-01 as challenge type, "
                     "headscale must be reachable on port 443, i.e. listen_addr should probably "
                     "end in :443")

    eph = cfg.node.ephemeral.inactivity_timeout
    if eph <= MIN_EPHEMERAL_INACTIVITY:
        raise _err("node.ephemeral.inactivity_timeout", f"({format_go_duration(eph)}) is set too "
                   f"low, must be more than {format_go_duration(MIN_EPHEMERAL_INACTIVITY)}")
    ha = cfg.node.routes.ha
    if ha.probe_interval > timedelta(0):
        if ha.probe_interval < timedelta(seconds=2):
            raise _err("node.routes.ha.probe_interval",
                       f"({format_go_duration(ha.probe_interval)}) must be >= 2s")
        if ha.probe_timeout < timedelta(seconds=1):
            raise _err("node.routes.ha.probe_timeout",
                       f"({format_go_duration(ha.probe_timeout)}) must be >= 1s")
        if ha.probe_timeout >= ha.probe_interval:
            raise _err("node.routes.ha.probe_timeout",
                       f"({format_go_duration(ha.probe_timeout)}) must be less than "
                       f"node.routes.ha.probe_interval ({format_go_duration(ha.probe_interval)})")
    if cfg.tuning.node_store_batch_size <= 0:
        raise _err("tuning.node_store_batch_size",
                   f"must be positive, got {cfg.tuning.node_store_batch_size}")
    if cfg.tuning.node_store_batch_timeout <= timedelta(0):
        raise _err("tuning.node_store_batch_timeout", "must be positive, got "
                   f"{format_go_duration(cfg.tuning.node_store_batch_timeout)}")
    if cfg.tuning.batch_change_delay < timedelta(0):
        raise _err("tuning.batch_change_delay", "must not be negative")

    dns = cfg.dns
    if dns.magic_dns and not dns.base_domain:
        raise _err("dns.base_domain", "required when dns.magic_dns is true")
    if dns.override_local_dns and not dns.nameservers.global_:
        raise _err("dns.nameservers.global", "must be set when dns.override_local_dns is true")
    if dns.extra_records and dns.extra_records_path:
        raise _err("dns.extra_records", "dns.extra_records and dns.extra_records_path are "
                                        "mutually exclusive, remove one of them")

    _check_derp(cfg)

    db = cfg.database
    if db.type not in ("sqlite", "postgres"):
        raise _err("database.type", f"invalid database type {_q(db.type)}, must be sqlite, "
                                    "sqlite3 or postgres")
    if db.type == "sqlite" and db.sqlite.path is None:
        raise _err("database.sqlite.path", "required when database.type is sqlite")
    if db.type == "postgres" and db.postgres.port is not None and not 0 < db.postgres.port < 65536:
        raise _err("database.postgres.port", f"not a valid port: {db.postgres.port}")

    if cfg.log.level not in LOG_LEVELS:
        raise _err("log.level", f"invalid level {_q(cfg.log.level)}, valid levels: "
                                "panic, fatal, error, warn, info, debug, trace")
    if cfg.log.format not in ("text", "json", ""):
        raise _err("log.format", f"could not parse log format {_q(cfg.log.format)}, "
                                 "valid choices are 'json' or 'text'")
    if cfg.policy.mode not in ("file", "database"):
        raise _err("policy.mode", f"must be file or database, got {_q(cfg.policy.mode)}")
    _check_oidc(cfg.oidc)


def _check_derp(cfg: Config) -> None:
    derp, srv = cfg.derp, cfg.derp.server
    for i, url in enumerate(derp.urls):
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise _err(f"derp.urls[{i}]", f"not an http(s) URL: {_q(url)}")
    if derp.auto_update_enabled and derp.update_frequency <= timedelta(0):
        raise _err("derp.update_frequency", "must be positive when derp.auto_update_enabled")
    if bool(srv.tls_cert_path) != bool(srv.tls_key_path):
        missing, other = (("tls_key_path", "tls_cert_path") if srv.tls_cert_path
                          else ("tls_cert_path", "tls_key_path"))
        raise _err(f"derp.server.{missing}", f"required when derp.server.{other} is set")
    if not srv.enabled:
        return
    if not srv.stun_listen_addr:
        raise _err("derp.server.stun_listen_addr",
                   "must be set if derp.server.enabled is true")
    _check_hostport("derp.server.stun_listen_addr", srv.stun_listen_addr, required=True)
    _check_hostport("derp.server.listen_addr", srv.listen_addr or "", required=True)
    if srv.private_key_path is None:
        raise _err("derp.server.private_key_path", "required when derp.server.enabled is true")
    if not 0 < srv.region_id <= 2**53 - 1:
        raise _err("derp.server.region_id", f"must be a positive region ID, got {srv.region_id}")
    if not srv.automatically_add_embedded_derp_region and not derp.paths:
        raise _err("derp.server.automatically_add_embedded_derp_region",
                   "disabling it requires to configure the derp server in derp.paths")
    if not srv.hostname:
        raise _err("derp.server.hostname", "required: server_url has no host to derive it from")
    if srv.mesh_with and srv.mesh_key_path is None:
        raise _err("derp.server.mesh_with", "requires derp.server.mesh_key_path")


def _check_oidc(oidc: OIDCConfig) -> None:
    if oidc.client_secret and oidc.client_secret_path:
        raise _err("oidc.client_secret_path",
                   "oidc.client_secret and oidc.client_secret_path are mutually exclusive")
    if not oidc.issuer:
        return
    if oidc.pkce.method not in ("plain", "S256"):
        raise _err("oidc.pkce.method", "pkce.method must be either 'plain' or 'S256'")
    parts = urlsplit(oidc.issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _err("oidc.issuer", f"must be a valid http(s) URL: got {_q(oidc.issuer)}")
    if not oidc.client_id:
        raise _err("oidc.client_id", "required when oidc.issuer is set")
    if not oidc.client_secret and not oidc.client_secret_path:
        raise _err("oidc.client_secret",
                   "oidc.client_secret or oidc.client_secret_path is required when "
                   "oidc.issuer is set")


_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _read_oidc_secret(oidc: OIDCConfig, env: Mapping[str, str]) -> None:
    # Go's os.ExpandEnv: unknown variables expand to "" (systemd's ${CREDENTIALS_DIRECTORY}).
    if not oidc.client_secret_path:
        return
    path = _ENV_REF.sub(lambda m: env.get(m.group(1) or m.group(2), ""), oidc.client_secret_path)
    try:
        oidc.client_secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise _err("oidc.client_secret_path", f"cannot read {path}: {reason}") from None


_RELATIVE_TO_CONFIG = (
    ("noise", "private_key_path"), ("database.sqlite", "path"), ("", "tls_cert_path"),
    ("", "tls_key_path"), ("", "tls_letsencrypt_cache_dir"), ("derp.server", "private_key_path"),
    ("derp.server", "tls_cert_path"), ("derp.server", "tls_key_path"), ("policy", "path"),
    ("derp.server", "mesh_key_path"),
)


def _anchor_paths(cfg: Config, base: Path) -> None:
    """As Headscale's AbsolutePathFromConfigPath: relative file paths are taken from the
    config file's directory."""
    for section, attr in _RELATIVE_TO_CONFIG:
        obj: Any = cfg
        for part in filter(None, section.split(".")):
            obj = getattr(obj, part)
        value = getattr(obj, attr)
        if value is not None and not value.is_absolute():
            setattr(obj, attr, base / value)


# --- public entry points ----------------------------------------------------------------------

def _build(raw: dict[str, Any], env: Mapping[str, str], *, base: Path | None,
           warns: list[str]) -> Config:
    raw = _drop_nulls(raw)
    _apply_env(raw, env)
    warns.extend(_deprecations(raw))
    known = {f.alias or n for n, f in Config.model_fields.items() if n not in INTERNAL_FIELDS}
    for key in list(raw):
        if key not in known:
            warns.append(f"unknown configuration key {_q(key)} ignored")
            del raw[key]
    data_dir_set = "data_dir" in raw
    cfg = _validate(raw)
    if base is not None:
        _anchor_paths(cfg, base)
        if data_dir_set and not cfg.data_dir.is_absolute():
            cfg.data_dir = base / cfg.data_dir
    if not data_dir_set:
        cfg.data_dir = default_data_dir(env)
    _check(cfg, warns)
    _read_oidc_secret(cfg.oidc, env)
    cfg.warnings = list(dict.fromkeys(warns))
    return cfg


def _embedded(data_dir: Path) -> dict[str, Any]:
    d = data_dir
    return {
        "server_url": "http://127.0.0.1:8080",
        "listen_addr": "127.0.0.1:8080",
        "metrics_listen_addr": "127.0.0.1:9090",
        "grpc_listen_addr": "127.0.0.1:50443",
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


def default_config(data_dir: Path) -> Config:
    """The embedded default used when no config file exists (no environment applied)."""
    return _build(_embedded(Path(data_dir)), {}, base=None, warns=[])


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Load `path` (-c/--config), else $HEADSCALE_CONFIG, else the first file found by
    find_config_file, else the embedded default; HEADSCALE_* variables override the file.

    Raises ConfigError with a one-line message; warnings are logged and kept in cfg.warnings.
    """
    env = os.environ if env is None else env
    file = Path(path) if path is not None and str(path) != "" else find_config_file(env)
    warns: list[str] = []
    if file is None:
        data_dir = Path(env.get(env_var_name("data_dir")) or default_data_dir(env))
        warns.append(f"no config file found, using the embedded default (data directory "
                     f"{data_dir})")
        cfg = _build(_embedded(data_dir), env, base=None, warns=warns)
    else:
        file = Path(os.path.expanduser(file))
        cfg = _build(_read_file(file), env, base=file.resolve().parent, warns=warns)
        cfg.config_file = file
    for w in cfg.warnings:
        log.warning("%s", w)
    return cfg


__all__ = [
    "Config", "ConfigError", "default_config", "default_data_dir", "env_var_name",
    "find_config_file", "format_go_duration", "load_config", "parse_go_duration",
    "parse_prometheus_duration",
]

