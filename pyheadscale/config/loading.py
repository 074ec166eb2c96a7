"""From a file and the environment to the raw key tree the schema validates.

Reading config.{yaml,yml,json,toml}, HEADSCALE_* overrides (viper's AutomaticEnv), Headscale's
deprecated and removed keys (its deprecator, same messages), and the file references resolved
after validation (paths relative to the config file, oidc.client_secret_path).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pyheadscale.config.errors import ConfigError, key_error, quoted
from pyheadscale.config.schema import INTERNAL_FIELDS, Config, OIDCConfig

ENV_PREFIX = "HEADSCALE_"


# --- the file ---------------------------------------------------------------------------------

def read_file(path: Path) -> dict[str, Any]:
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


def drop_nulls(value: Any) -> Any:
    # An empty YAML key (`oidc:` with every child commented out) means "not set".
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
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


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
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


def deprecations(raw: dict[str, Any]) -> list[str]:
    warns: list[str] = []
    fatals: list[tuple[str, str]] = []

    def moved(old: str, new: str) -> str:
        return (f"The {quoted(old)} configuration key is deprecated. "
                f"Please use {quoted(new)} instead. {quoted(old)} has been removed.")

    for new, old in _RENAMED:
        if _is_set(raw, old):
            if _is_set(raw, new):
                warns.append(moved(old, new))
            else:
                fatals.append((old, moved(old, new)))
    for old in ("dns.use_username_in_magic_dns", "dns_config.use_username_in_magic_dns",
                "oidc.strip_email_domain", "oidc.map_legacy_users"):
        if _is_set(raw, old):
            fatals.append((old, f"The {quoted(old)} configuration key has been removed. "
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



# --- file references, resolved after validation ------------------------------------------------

_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def read_oidc_secret(oidc: OIDCConfig, env: Mapping[str, str]) -> None:
    # Go's os.ExpandEnv: unknown variables expand to "" (systemd's ${CREDENTIALS_DIRECTORY}).
    if not oidc.client_secret_path:
        return
    path = _ENV_REF.sub(lambda m: env.get(m.group(1) or m.group(2), ""), oidc.client_secret_path)
    try:
        oidc.client_secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise key_error("oidc.client_secret_path", f"cannot read {path}: {reason}") from None


def anchor_paths(cfg: Config, base: Path) -> None:
    """As Headscale's AbsolutePathFromConfigPath: relative file paths are taken from the
    config file's directory."""
    def anchored(path: Path | None) -> Path | None:
        return base / path if path is not None and not path.is_absolute() else path

    srv = cfg.derp.server
    cfg.noise.private_key_path = anchored(cfg.noise.private_key_path)
    cfg.database.sqlite.path = anchored(cfg.database.sqlite.path)
    cfg.tls_cert_path = anchored(cfg.tls_cert_path)
    cfg.tls_key_path = anchored(cfg.tls_key_path)
    cfg.tls_letsencrypt_cache_dir = anchored(cfg.tls_letsencrypt_cache_dir)
    cfg.policy.path = anchored(cfg.policy.path)
    srv.private_key_path = anchored(srv.private_key_path)
    srv.tls_cert_path = anchored(srv.tls_cert_path)
    srv.tls_key_path = anchored(srv.tls_key_path)
    srv.mesh_key_path = anchored(srv.mesh_key_path)
    # Headscale leaves a relative unix_socket to the working directory, so its CLI finds the
    # server's socket only from where the server was started; anchored, both agree anywhere.
    if cfg.unix_socket and not Path(cfg.unix_socket).is_absolute():
        cfg.unix_socket = str(base / cfg.unix_socket)
