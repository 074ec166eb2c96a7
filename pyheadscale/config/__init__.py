"""Typed configuration: Headscale 0.29's config.yaml schema, defaults, checks, HEADSCALE_* env.

Entry points: `load_config` (what every command calls), `find_config_file` and `default_config`
(the embedded default used when no file exists). Every problem becomes one `ConfigError` whose
message is a single line naming the key path, e.g. `config: dns.base_domain: required when ...`.

The parts: errors.py (ConfigError), fields.py (how
one value is read), schema.py (the sections and `Config`), loading.py (file, environment,
deprecated keys, file references), checks.py (cross-field rules), default.py (the embedded
default). This module only puts them in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyheadscale.config.checks import (
    CGNAT_V4,
    LOG_LEVELS,
    MIN_EPHEMERAL_INACTIVITY,
    TAILSCALE_ULA_V6,
    check,
    validate,
)
from pyheadscale.config.default import embedded_default
from pyheadscale.config.errors import ConfigError, quoted
from pyheadscale.config.fields import (
    GoDuration,
    OptPath,
    OptStr,
    PromDuration,
    ProxyPrefix,
    StrList,
    read_go_duration,
    read_prometheus_duration,
)
from pyheadscale.config.loading import (
    ENV_PREFIX,
    anchor_paths,
    apply_env,
    deprecations,
    drop_nulls,
    env_var_name,
    read_file,
    read_oidc_secret,
)
from pyheadscale.config.schema import (
    INTERNAL_FIELDS,
    AdminConsoleConfig,
    AutoUpdateConfig,
    CLIConfig,
    Config,
    DatabaseConfig,
    DERPConfig,
    DERPServerConfig,
    DNSConfig,
    EphemeralConfig,
    ExtraRecord,
    GormConfig,
    HARoutesConfig,
    LogConfig,
    LogtailConfig,
    NameserversConfig,
    NodeConfig,
    NoiseConfig,
    OIDCConfig,
    PKCEConfig,
    PolicyConfig,
    PolicyGroupsConfig,
    PostgresConfig,
    PreAuthKeysConfig,
    PrefixesConfig,
    RoutesConfig,
    SqliteConfig,
    TaildropConfig,
    TuningConfig,
    default_data_dir,
)

log = logging.getLogger("pyheadscale.config")

CONFIG_NAMES = ("config.json", "config.toml", "config.yaml", "config.yml")  # viper's ext order
SYSTEM_CONFIG_DIR = Path("/etc/headscale")


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


def _build(raw: dict[str, Any], env: Mapping[str, str], *, base: Path | None,
           warns: list[str]) -> Config:
    raw = drop_nulls(raw)
    apply_env(raw, env)
    warns.extend(deprecations(raw))
    known = {f.alias or n for n, f in Config.model_fields.items() if n not in INTERNAL_FIELDS}
    for key in list(raw):
        if key not in known:
            warns.append(f"unknown configuration key {quoted(key)} ignored")
            del raw[key]
    data_dir_set = "data_dir" in raw
    cfg = validate(raw)
    if base is not None:
        anchor_paths(cfg, base)
        if data_dir_set and not cfg.data_dir.is_absolute():
            cfg.data_dir = base / cfg.data_dir
    if not data_dir_set:
        cfg.data_dir = default_data_dir(env)
    check(cfg, warns)
    read_oidc_secret(cfg.oidc, env)
    cfg.warnings = list(dict.fromkeys(warns))
    return cfg


def default_config(data_dir: Path) -> Config:
    """The embedded default used when no config file exists (no environment applied)."""
    return _build(embedded_default(Path(data_dir)), {}, base=None, warns=[])


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None, *, log_warnings: bool = True) -> Config:
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
        legacy = Path("data")  # where earlier versions kept the embedded default's files
        if (legacy / "noise_private.key").is_file() and legacy.resolve() != data_dir.resolve():
            warns.append(f"{legacy.resolve()} holds an earlier server's keys and database, but "
                         f"the embedded default now uses {data_dir}: move them there or set "
                         "PYHEADSCALE_DATA_DIR")
        cfg = _build(embedded_default(data_dir), env, base=None, warns=warns)
    else:
        file = Path(os.path.expanduser(file))
        cfg = _build(read_file(file), env, base=file.resolve().parent, warns=warns)
        cfg.config_file = file
    if log_warnings:  # `serve` logs them itself, once its log format is set up
        for w in cfg.warnings:
            log.warning("%s", w)
    return cfg


def load_cli_config(path: str | os.PathLike[str] | None = None,
                    env: Mapping[str, str] | None = None) -> Config:
    """What the admin CLI needs to reach a server, found as load_config finds its file: as
    Headscale's LoadCLIConfig, only unix_socket and cli.* are read and checked, so a file
    holding just a `cli:` section works and a server setting the CLI does not use cannot
    stop it. Every other field of the result keeps its default."""
    env = os.environ if env is None else env
    file = Path(path) if path is not None and str(path) != "" else find_config_file(env)
    if file is None:
        raw = embedded_default(Path(env.get(env_var_name("data_dir")) or default_data_dir(env)))
    else:
        file = Path(os.path.expanduser(file))
        raw = read_file(file)
    raw = drop_nulls(raw)
    apply_env(raw, env)
    cfg = validate({k: raw[k] for k in ("unix_socket", "cli") if k in raw})
    if file is not None and cfg.unix_socket and not Path(cfg.unix_socket).is_absolute():
        cfg.unix_socket = str(file.resolve().parent / cfg.unix_socket)  # as anchor_paths
    return cfg


__all__ = [
    "CGNAT_V4", "CONFIG_NAMES", "ENV_PREFIX", "INTERNAL_FIELDS", "LOG_LEVELS",
    "MIN_EPHEMERAL_INACTIVITY", "SYSTEM_CONFIG_DIR", "TAILSCALE_ULA_V6",
    "AdminConsoleConfig", "AutoUpdateConfig", "CLIConfig", "Config", "ConfigError",
    "DERPConfig", "DERPServerConfig",
    "DNSConfig", "DatabaseConfig", "EphemeralConfig", "ExtraRecord", "GoDuration", "GormConfig",
    "HARoutesConfig", "LogConfig", "LogtailConfig", "NameserversConfig", "NodeConfig",
    "NoiseConfig", "OIDCConfig", "OptPath", "OptStr", "PKCEConfig", "PolicyConfig",
    "PolicyGroupsConfig", "PostgresConfig", "PreAuthKeysConfig", "PrefixesConfig",
    "PromDuration", "ProxyPrefix", "RoutesConfig", "SqliteConfig", "StrList", "TaildropConfig",
    "TuningConfig",
    "default_config", "default_data_dir", "env_var_name", "find_config_file", "load_cli_config",
    "load_config", "read_go_duration", "read_prometheus_duration",
]
