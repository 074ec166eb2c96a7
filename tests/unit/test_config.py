"""pyheadscale.config: Headscale 0.29's config.yaml schema, defaults, env overrides and errors.

Expected defaults and messages come from Headscale's hscontrol/types/config.go (v0.29.2).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyheadscale import config as config_mod
from pyheadscale.config import (
    Config,
    ConfigError,
    default_config,
    find_config_file,
    load_config,
    read_go_duration,
    read_prometheus_duration,
)
from pyheadscale.durations import format_go_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"

# The smallest file Headscale 0.29 accepts: every key without a usable code default.
MINIMAL: dict[str, Any] = {
    "server_url": "https://hs.example.net",
    "listen_addr": "127.0.0.1:8080",
    "noise": {"private_key_path": "/var/lib/headscale/noise_private.key"},
    "prefixes": {"v4": "100.64.0.0/10"},
    "database": {"type": "sqlite", "sqlite": {"path": "/var/lib/headscale/db.sqlite"}},
    "dns": {"base_domain": "tail.example.com", "nameservers": {"global": ["1.1.1.1"]}},
}


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def merged(**patch: Any) -> dict[str, Any]:
    """MINIMAL with dotted-key overrides applied (value None deletes the key)."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in patch.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def load(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, data), env=env or {})


# --- errors -------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("wrong type bool", merged(dns__magic_dns="maybe"),
     'config: dns.magic_dns: must be true or false, got "maybe"'),
    ("wrong type int", merged(derp__server__region_id="nine"),
     'config: derp.server.region_id: must be an integer, got "nine"'),
    ("section not a mapping", merged(dns=5), "config: dns: must be a mapping, got 5"),
    ("unknown key in section", merged(dns__base_domian="x.example"),
     "config: dns.base_domian: unknown key"),
    ("unknown nested key", merged(database__sqlite__wal=True),
     "config: database.sqlite.wal: unknown key"),
    ("bad v4 prefix", merged(prefixes__v4="100.64.0.0/33"),
     'config: prefixes.v4: not a valid IPv4 prefix: "100.64.0.0/33"'),
    ("v6 prefix in v4", merged(prefixes__v4="fd7a:115c:a1e0::/48"),
     'config: prefixes.v4: not a valid IPv4 prefix: "fd7a:115c:a1e0::/48"'),
    ("bad v6 prefix", merged(prefixes__v6="fd7a:115c:a1e0::/129"),
     'config: prefixes.v6: not a valid IPv6 prefix: "fd7a:115c:a1e0::/129"'),
    ("no prefix", merged(prefixes={"v4": "", "v6": ""}),
     "config: prefixes: no IPv4 or IPv6 prefix configured, minimum one prefix is required"),
    ("bad allocation", merged(prefixes__allocation="roundrobin"),
     'config: prefixes.allocation: invalid prefix allocation strategy: "roundrobin", '
     "allowed options: sequential, random"),
    ("bad duration", merged(derp__update_frequency="3hours"),
     'config: derp.update_frequency: not a valid duration: "3hours"'),
    ("duration without unit", merged(cli__timeout="30"),
     'config: cli.timeout: not a valid duration: "30" (missing unit: ns, us, ms, s, m or h)'),
    ("node.expiry with fraction", merged(node__expiry="1.5d"),
     'config: node.expiry: not a valid duration: "1.5d"'),
    ("ephemeral too low", merged(node__ephemeral__inactivity_timeout="60s"),
     "config: node.ephemeral.inactivity_timeout: (1m0s) is set too low, must be more than 1m5s"),
    ("ha timeout >= interval", merged(node__routes={"ha": {"probe_interval": "5s",
                                                           "probe_timeout": "5s"}}),
     "config: node.routes.ha.probe_timeout: (5s) must be less than "
     "node.routes.ha.probe_interval (5s)"),
    ("ha interval too small", merged(node__routes={"ha": {"probe_interval": "1s"}}),
     "config: node.routes.ha.probe_interval: (1s) must be >= 2s"),
    ("magic_dns without base_domain", merged(dns__base_domain=None),
     "config: dns.base_domain: required when dns.magic_dns is true"),
    ("override_local_dns without nameservers", merged(dns__nameservers=None),
     "config: dns.nameservers.global: must be set when dns.override_local_dns is true"),
    ("extra_records and path", merged(dns__extra_records=[{"name": "a.tail.example.com",
                                                           "value": "100.64.0.9"}],
                                      dns__extra_records_path="/tmp/records.json"),
     "config: dns.extra_records: dns.extra_records and dns.extra_records_path are mutually "
     "exclusive, remove one of them"),
    ("extra record without value", merged(dns__extra_records=[{"name": "a.tail.example.com"}]),
     "config: dns.extra_records[0].value: required"),
    ("server_url without scheme", merged(server_url="hs.example.net:443"),
     "config: server_url: must start with http:// or https://"),
    ("server_url missing", merged(server_url=None),
     "config: server_url: must start with http:// or https://"),
    ("server_url same as base_domain", merged(server_url="https://tail.example.com"),
     "config: server_url: cannot use the same domain as base_domain in a way that could make "
     "the DERP and headscale server unreachable"),
    ("server_url inside base_domain", merged(server_url="https://hs.tail.example.com:8443"),
     "config: server_url: cannot be part of base_domain in a way that could make the DERP and "
     "headscale server unreachable"),
    ("listen_addr missing", merged(listen_addr=None), "config: listen_addr: required"),
    ("listen_addr without port", merged(listen_addr="127.0.0.1"),
     'config: listen_addr: must be host:port, got "127.0.0.1"'),
    ("noise key missing", merged(noise=None), "config: noise.private_key_path: required"),
    ("tls cert without key", merged(tls_cert_path="/etc/hs/cert.pem"),
     "config: tls_key_path: required when tls_cert_path is set"),
    ("tls key without cert", merged(tls_key_path="/etc/hs/key.pem"),
     "config: tls_cert_path: required when tls_key_path is set"),
    ("letsencrypt and cert", merged(tls_letsencrypt_hostname="hs.example.net",
                                    tls_cert_path="/c", tls_key_path="/k"),
     "config: tls_letsencrypt_hostname: set either tls_letsencrypt_hostname or "
     "tls_cert_path/tls_key_path, not both"),
    ("bad challenge", merged(tls_letsencrypt_challenge_type="DNS-01"),
     "config: tls_letsencrypt_challenge_type: the only supported values are HTTP-01 and "
     'TLS-ALPN-01, got "DNS-01"'),
    ("acme listen not host:port", merged(tls_letsencrypt_hostname="hs.example.net",
                                         tls_letsencrypt_listen="80"),
     "config: tls_letsencrypt_listen: '80' is not host:port"),
    ("acme listen unknown service", merged(tls_letsencrypt_hostname="hs.example.net",
                                           tls_letsencrypt_listen=":nonesuch"),
     "config: tls_letsencrypt_listen: unknown port 'nonesuch' in ':nonesuch'"),
    ("acme url not a URL", merged(tls_letsencrypt_hostname="hs.example.net",
                                  acme_url="acme.example.net/dir"),
     'config: acme_url: not an http(s) URL: "acme.example.net/dir"'),
    ("bad database type", merged(database__type="mysql"),
     'config: database.type: invalid database type "mysql", must be sqlite, sqlite3 or postgres'),
    ("database type missing", merged(database__type=None),
     'config: database.type: invalid database type "", must be sqlite, sqlite3 or postgres'),
    ("sqlite path missing", merged(database__sqlite=None),
     "config: database.sqlite.path: required when database.type is sqlite"),
    ("derp without stun", merged(derp={"server": {"enabled": True,
                                                  "private_key_path": "/k"}}),
     "config: derp.server.stun_listen_addr: must be set if derp.server.enabled is true"),
    ("derp without region, no paths", merged(derp={"server": {
        "enabled": True, "private_key_path": "/k", "stun_listen_addr": "0.0.0.0:3478",
        "automatically_add_embedded_derp_region": False}}),
     "config: derp.server.automatically_add_embedded_derp_region: disabling it requires to "
     "configure the derp server in derp.paths"),
    ("derp cert without key", merged(derp={"server": {"tls_cert_path": "/c"}}),
     "config: derp.server.tls_key_path: required when derp.server.tls_cert_path is set"),
    ("derp ipv4 not v4", merged(derp={"server": {"ipv4": "2001:db8::1"}}),
     'config: derp.server.ipv4: not a valid IPv4 address: "2001:db8::1"'),
    ("derp url not http", merged(derp={"urls": ["ftp://x.example/map"]}),
     'config: derp.urls[0]: not an http(s) URL: "ftp://x.example/map"'),
    ("trusted proxy everything", merged(trusted_proxies=["10.0.0.0/8", "::/0"]),
     'config: trusted_proxies[1]: "::/0": 0.0.0.0/0 and ::/0 are not allowed'),
    ("trusted proxy garbage", merged(trusted_proxies=["proxy"]),
     'config: trusted_proxies[0]: not a valid CIDR prefix: "proxy"'),
    ("bad log level", merged(log={"level": "verbose"}),
     'config: log.level: invalid level "verbose", valid levels: panic, fatal, error, warn, '
     "info, debug, trace"),
    ("bad log format", merged(log={"format": "xml"}),
     "config: log.format: could not parse log format \"xml\", valid choices are 'json' or "
     "'text'"),
    ("bad policy mode", merged(policy={"mode": "git"}),
     'config: policy.mode: must be file or database, got "git"'),
    ("bad socket mode", merged(unix_socket_permission="rwx"),
     'config: unix_socket_permission: not an octal file mode: "rwx"'),
    ("oidc without client_id", merged(oidc={"issuer": "https://id.example.com"}),
     "config: oidc.client_id: required when oidc.issuer is set"),
    ("oidc without secret", merged(oidc={"issuer": "https://id.example.com",
                                         "client_id": "hs"}),
     "config: oidc.client_secret: oidc.client_secret or oidc.client_secret_path is required "
     "when oidc.issuer is set"),
    ("oidc secret twice", merged(oidc={"client_secret": "s", "client_secret_path": "/s"}),
     "config: oidc.client_secret_path: oidc.client_secret and oidc.client_secret_path are "
     "mutually exclusive"),
    ("oidc bad pkce", merged(oidc={"issuer": "https://id.example.com", "client_id": "hs",
                                   "client_secret": "s", "pkce": {"method": "S512"}}),
     "config: oidc.pkce.method: pkce.method must be either 'plain' or 'S256'"),
    ("oidc issuer not a URL", merged(oidc={"issuer": "id.example.com", "client_id": "hs",
                                           "client_secret": "s"}),
     'config: oidc.issuer: must be a valid http(s) URL: got "id.example.com"'),
    ("tuning batch size", merged(tuning={"node_store_batch_size": 0}),
     "config: tuning.node_store_batch_size: must be positive, got 0"),
    # Removed keys: Headscale's deprecator messages.
    ("randomize_client_port removed", merged(randomize_client_port=True),
     'config: randomize_client_port: The "randomize_client_port" configuration key has been '
     'removed. Set "randomizeClientPort": true at the top level of your policy file'),
    ("acl_policy_path alone", merged(acl_policy_path="/etc/headscale/acl.hujson"),
     'config: acl_policy_path: The "acl_policy_path" configuration key is deprecated. Please '
     'use "policy.path" instead. "acl_policy_path" has been removed.'),
    ("dns_config alone", {**merged(dns=None), "dns_config": {"magic_dns": True}},
     'config: dns_config.magic_dns: The "dns_config.magic_dns" configuration key is deprecated. '
     'Please use "dns.magic_dns" instead. "dns_config.magic_dns" has been removed.'),
    ("use_username_in_magic_dns", merged(dns__use_username_in_magic_dns=True),
     'config: dns.use_username_in_magic_dns: The "dns.use_username_in_magic_dns" configuration '
     "key has been removed. Please see the changelog for more details."),
    ("oidc.strip_email_domain", merged(oidc={"strip_email_domain": True}),
     'config: oidc.strip_email_domain: The "oidc.strip_email_domain" configuration key has '
     "been removed."),
    ("oidc.map_legacy_users", merged(oidc={"map_legacy_users": False}),
     'config: oidc.map_legacy_users: The "oidc.map_legacy_users" configuration key has been '
     "removed."),
    ("oidc.expiry", merged(oidc={"expiry": "180d"}),
     'config: oidc.expiry: The "oidc.expiry" configuration key has been removed. Please use '
     '"node.expiry" instead.'),
    ("console path relative", merged(admin_console={"path": "admin"}),
     "config: admin_console.path: must be an absolute path like /admin"),
    ("console path trailing slash", merged(admin_console={"path": "/admin/"}),
     "config: admin_console.path: must be an absolute path like /admin"),
    ("console path shadows the API", merged(admin_console={"path": "/api/ui"}),
     'config: admin_console.path: "/api/ui" would shadow the server\'s own /api'),
    ("console idle longer than max", merged(admin_console={"session_idle_timeout": "2h",
                                                           "session_max_age": "1h"}),
     "config: admin_console.session_idle_timeout: must not be longer than "
     "admin_console.session_max_age"),
    ("console zero link ttl", merged(admin_console={"sign_in_link_ttl": "0s"}),
     "config: admin_console.sign_in_link_ttl: must be positive"),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in BAD],
                         ids=[n for n, _, _ in BAD])
def test_bad_config_raises_one_line_error(tmp_path: Path, data: dict[str, Any],
                                          expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_error_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, merged(dns__magic_dns="maybe"))
    assert info.value.key == "dns.magic_dns"


def test_malformed_yaml_reports_position(tmp_path: Path) -> None:
    path = write(tmp_path, "server_url: http://127.0.0.1:8080\nlisten_addr: 127.0.0.1:8080\n"
                           "dns: base_domain: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    # PyYAML points at the second ':' on line 3 (1-based column 17).
    assert str(info.value) == (f"config: cannot parse {path}: line 3 column 17: "
                               "mapping values are not allowed here")


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    path = write(tmp_path, "prefixes:\n  v4: [100.64.0.0/10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"config: cannot parse {path}: line ")
    assert "\n" not in str(info.value)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- server_url\n- listen_addr\n")
    with pytest.raises(ConfigError, match=r"^config: cannot parse .*: the top level must be a "
                                          r"mapping of keys, got list$"):
        load_config(path, env={})


def test_bad_json_and_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '{"server_url": ', "config.json")
    with pytest.raises(ConfigError, match=r"^config: cannot parse .*config\.json: line 1 "):
        load_config(path, env={})
    path = write(tmp_path, "server_url = \n", "config.toml")
    with pytest.raises(ConfigError, match=r"^config: cannot parse .*config\.toml: "):
        load_config(path, env={})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert str(info.value) == f"config: cannot read {tmp_path / 'nope.yaml'}: No such file or directory"


def test_multiple_removed_keys_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, merged(randomize_client_port=True, oidc={"expiry": "1d"}))
    message = str(info.value)
    assert "\n" not in message
    assert "randomize_client_port" in message and '"oidc.expiry"' in message


# --- deprecations that only warn ------------------------------------------------------------

def test_old_key_with_new_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = merged(acl_policy_path="/old.hujson", policy={"path": "/new.hujson"})
    with caplog.at_level(logging.WARNING, logger="pyheadscale.config"):
        cfg = load(tmp_path, data)
    assert cfg.policy.path == Path("/new.hujson")
    expected = ('The "acl_policy_path" configuration key is deprecated. Please use "policy.path" '
                'instead. "acl_policy_path" has been removed.')
    assert expected in cfg.warnings
    assert expected in caplog.text


def test_old_ephemeral_key_still_works(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged(ephemeral_node_inactivity_timeout="45m"))
    assert cfg.node.ephemeral.inactivity_timeout == timedelta(minutes=45)
    assert any('"ephemeral_node_inactivity_timeout" configuration key is deprecated' in w
               for w in cfg.warnings)
    # The new key wins when both are set.
    cfg = load(tmp_path, merged(ephemeral_node_inactivity_timeout="45m",
                                node={"ephemeral": {"inactivity_timeout": "10m"}}))
    assert cfg.node.ephemeral.inactivity_timeout == timedelta(minutes=10)


def test_unknown_top_level_key_warns(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged(serverurl="https://typo.example"))
    assert 'unknown configuration key "serverurl" ignored' in cfg.warnings


def test_nonstandard_prefix_warns(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged(prefixes={"v4": "10.0.0.0/8"}))
    assert cfg.prefixes.v4 == IPv4Network("10.0.0.0/8")
    assert any("NOT supported" in w for w in cfg.warnings)
    assert not load(tmp_path, merged(prefixes={"v4": "100.64.0.0/24"})).warnings


# --- environment overrides ------------------------------------------------------------------

def test_env_overrides_win_over_file(tmp_path: Path) -> None:
    data = merged(database={"type": "postgres", "postgres": {"host": "db", "pass": "file"}},
                  cli={"timeout": "5s"})
    env = {
        "HEADSCALE_DNS_BASE_DOMAIN": "env.example.org",
        "HEADSCALE_DATABASE_POSTGRES_PASS": "s3cret",
        "HEADSCALE_DATABASE_POSTGRES_PORT": "6543",
        "HEADSCALE_DATABASE_POSTGRES_SSL": "false",
        "HEADSCALE_DNS_NAMESERVERS_GLOBAL": "9.9.9.9  149.112.112.112",
        "HEADSCALE_DNS_NAMESERVERS_SPLIT": '{"corp.example.com": ["10.0.0.53"]}',
        "HEADSCALE_DNS_MAGIC_DNS": "false",
        "HEADSCALE_NODE_EXPIRY": "180d",
        "HEADSCALE_CLI_ADDRESS": "hs.example.net:443",
        "HEADSCALE_CLI_API_KEY": "hskey-api-abc",
        "HEADSCALE_CLI_TIMEOUT": "1m30s",
        "HEADSCALE_LOG_LEVEL": "debug",
        "HEADSCALE_DERP_SERVER_INSECURE_FOR_TESTS": "true",
        "HEADSCALE_LISTEN_ADDR": "",  # empty variables are ignored, as viper does
    }
    cfg = load(tmp_path, data, env)
    assert cfg.dns.base_domain == "env.example.org"
    assert cfg.database.postgres.pass_ == "s3cret"
    assert cfg.database.postgres.host == "db"
    assert cfg.database.postgres.port == 6543
    assert cfg.database.postgres.ssl is False and cfg.database.postgres.sslmode == "disable"
    assert cfg.dns.nameservers.global_ == ["9.9.9.9", "149.112.112.112"]
    assert cfg.dns.nameservers.split == {"corp.example.com": ["10.0.0.53"]}
    assert cfg.dns.magic_dns is False
    assert cfg.node.expiry == timedelta(days=180)
    assert cfg.cli.address == "hs.example.net:443"
    assert cfg.cli.api_key == "hskey-api-abc"
    assert cfg.cli.timeout == timedelta(seconds=90)
    assert cfg.log.level == "debug"
    assert cfg.derp.server.insecure_for_tests is True
    assert cfg.listen_addr == "127.0.0.1:8080"


def test_env_value_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: cli.timeout: not a valid duration: \"soon\""):
        load(tmp_path, MINIMAL, {"HEADSCALE_CLI_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match=r"^config: dns.nameservers.split: not valid JSON"):
        load(tmp_path, MINIMAL, {"HEADSCALE_DNS_NAMESERVERS_SPLIT": "corp=10.0.0.53"})


def test_env_removed_key_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: randomize_client_port: "):
        load(tmp_path, MINIMAL, {"HEADSCALE_RANDOMIZE_CLIENT_PORT": "true"})


def test_env_applies_to_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG_DIR", tmp_path / "etc")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={"HOME": str(tmp_path / "home"), "PYHEADSCALE_DATA_DIR": "dd",
                           "HEADSCALE_DNS_BASE_DOMAIN": "lab.internal"})
    assert cfg.config_file is None
    assert cfg.dns.base_domain == "lab.internal"
    assert cfg.data_dir == Path("dd")
    assert cfg.noise.private_key_path == Path("dd/noise_private.key")


# --- search order ---------------------------------------------------------------------------

@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    etc, home, cwd = tmp_path / "etc", tmp_path / "home", tmp_path / "cwd"
    for d in (etc, home / ".headscale", cwd):
        d.mkdir(parents=True)
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG_DIR", etc)
    monkeypatch.chdir(cwd)
    return {"etc": etc, "home": home, "cwd": cwd}


def test_search_order(dirs: dict[str, Path]) -> None:
    env = {"HOME": str(dirs["home"])}
    assert find_config_file(env) is None
    (dirs["cwd"] / "config.yaml").write_text(yaml.safe_dump(MINIMAL))
    assert find_config_file(env) == Path("config.yaml")
    (dirs["home"] / ".headscale" / "config.yml").write_text(yaml.safe_dump(MINIMAL))
    assert find_config_file(env) == dirs["home"] / ".headscale" / "config.yml"
    (dirs["etc"] / "config.yaml").write_text(yaml.safe_dump(MINIMAL))
    assert find_config_file(env) == dirs["etc"] / "config.yaml"
    # Within one directory viper tries json, toml, yaml, yml in that order.
    (dirs["etc"] / "config.json").write_text(json.dumps(MINIMAL))
    assert find_config_file(env) == dirs["etc"] / "config.json"
    # HEADSCALE_CONFIG beats the search, even when that file does not exist.
    env["HEADSCALE_CONFIG"] = str(dirs["cwd"] / "other.yaml")
    assert find_config_file(env) == dirs["cwd"] / "other.yaml"


def test_explicit_path_beats_env(dirs: dict[str, Path]) -> None:
    a = write(dirs["cwd"], merged(dns__base_domain="a.example.org"), "a.yaml")
    b = write(dirs["cwd"], merged(dns__base_domain="b.example.org"), "b.yaml")
    env = {"HOME": str(dirs["home"]), "HEADSCALE_CONFIG": str(b)}
    assert load_config(a, env=env).dns.base_domain == "a.example.org"
    cfg = load_config(None, env=env)
    assert cfg.dns.base_domain == "b.example.org" and cfg.config_file == b


def test_searched_json_and_toml_files_load(dirs: dict[str, Path]) -> None:
    env = {"HOME": str(dirs["home"])}
    (dirs["home"] / ".headscale" / "config.toml").write_text(
        'server_url = "https://hs.example.net"\nlisten_addr = "0.0.0.0:8080"\n'
        '[noise]\nprivate_key_path = "noise.key"\n[prefixes]\nv6 = "fd7a:115c:a1e0::/48"\n'
        '[database]\ntype = "sqlite3"\n[database.sqlite]\npath = "db.sqlite"\n'
        '[dns]\nmagic_dns = false\noverride_local_dns = false\n')
    cfg = load_config(env=env)
    assert cfg.config_file == dirs["home"] / ".headscale" / "config.toml"
    assert cfg.prefixes.v4 is None and cfg.prefixes.v6 == IPv6Network("fd7a:115c:a1e0::/48")
    assert cfg.database.type == "sqlite"
    # Relative paths are anchored at the config file's directory, as Headscale does.
    assert cfg.noise.private_key_path == (dirs["home"] / ".headscale" / "noise.key").resolve()
    (dirs["etc"] / "config.json").write_text(json.dumps(MINIMAL))
    assert load_config(env=env).config_file == dirs["etc"] / "config.json"


def test_no_file_uses_embedded_default(dirs: dict[str, Path]) -> None:
    cfg = load_config(env={"HOME": str(dirs["home"])})
    assert cfg.config_file is None
    data = dirs["home"] / ".local" / "share" / "pyheadscale"
    assert cfg.data_dir == data
    assert cfg.unix_socket == str(data / "headscale.sock")
    assert any("no config file found" in w for w in cfg.warnings)
    expected = default_config(data)
    assert cfg.model_dump(exclude={"warnings"}) == expected.model_dump(exclude={"warnings"})


def test_embedded_default_does_not_depend_on_the_working_directory(
        dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server and the CLI find the same data directory (and CLI socket) wherever each
    runs: XDG_DATA_HOME when it is absolute, else ~/.local/share, never the cwd."""
    env = {"HOME": str(dirs["home"])}
    here = load_config(env=env)
    monkeypatch.chdir(dirs["etc"])
    assert load_config(env=env).unix_socket == here.unix_socket
    xdg = dirs["home"] / "xdg"
    assert load_config(env={**env, "XDG_DATA_HOME": str(xdg)}).data_dir == xdg / "pyheadscale"
    assert load_config(env={**env, "XDG_DATA_HOME": "relative"}).data_dir == here.data_dir


def test_earlier_data_directory_is_pointed_out(dirs: dict[str, Path]) -> None:
    (dirs["cwd"] / "data").mkdir()
    (dirs["cwd"] / "data" / "noise_private.key").write_text("privkey:...")
    cfg = load_config(env={"HOME": str(dirs["home"])})
    assert any("earlier server's keys" in w and "PYHEADSCALE_DATA_DIR" in w
               for w in cfg.warnings), cfg.warnings


# --- defaults -------------------------------------------------------------------------------

def test_defaults_equal_headscale(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.warnings == []
    # viper.SetDefault values in Headscale v0.29.2 LoadConfig, and constants used when unset.
    expected = {
        "policy.mode": "file", "policy.path": None,
        "tls_letsencrypt_cache_dir": Path("/var/www/.cache"),
        "tls_letsencrypt_challenge_type": "HTTP-01",
        "tls_letsencrypt_listen": ":http",
        "acme_url": "https://acme-v02.api.letsencrypt.org/directory",
        "log.level": "info", "log.format": "text",
        "dns.magic_dns": True, "dns.override_local_dns": True,
        "dns.nameservers.split": {}, "dns.search_domains": [], "dns.extra_records": [],
        "derp.server.enabled": False, "derp.server.verify_clients": True,
        "derp.server.automatically_add_embedded_derp_region": True,
        "derp.update_frequency": timedelta(hours=3), "derp.auto_update_enabled": False,
        "derp.urls": [], "derp.paths": [],
        "unix_socket": "/var/run/headscale/headscale.sock",
        "unix_socket_permission": 0o770,
        "grpc_listen_addr": ":50443", "grpc_allow_insecure": False,
        "metrics_listen_addr": "",
        "cli.timeout": timedelta(seconds=5), "cli.insecure": False, "cli.address": "",
        "database.postgres.ssl": False, "database.postgres.max_open_conns": 10,
        "database.postgres.max_idle_conns": 10,
        "database.postgres.conn_max_idle_time_secs": 3600,
        "database.sqlite.write_ahead_log": True, "database.sqlite.wal_autocheckpoint": 1000,
        "database.debug": False,
        "oidc.scope": ["openid", "profile", "email"],
        "oidc.only_start_if_oidc_is_available": True, "oidc.use_expiry_from_token": False,
        "oidc.pkce.enabled": False, "oidc.pkce.method": "S256",
        "oidc.email_verified_required": True, "oidc.issuer": "",
        "logtail.enabled": False, "taildrop.enabled": True, "auto_update.enabled": False,
        "node.expiry": timedelta(0),
        "node.ephemeral.inactivity_timeout": timedelta(seconds=120),
        "node.routes.ha.probe_interval": timedelta(seconds=10),
        "node.routes.ha.probe_timeout": timedelta(seconds=5),
        "preauth_keys.revoked_retention": timedelta(hours=168),
        "tuning.notifier_send_timeout": timedelta(milliseconds=800),
        "tuning.node_mapsession_buffered_chan_size": 30,
        "tuning.node_store_batch_size": 100,
        "tuning.node_store_batch_timeout": timedelta(milliseconds=500),
        "tuning.register_cache_expiration": timedelta(minutes=15),
        "tuning.register_cache_max_entries": 1024,
        "prefixes.allocation": "sequential", "prefixes.v6": None,
        "disable_check_updates": False, "trusted_proxies": [],
        "tls_cert_path": None, "tls_key_path": None, "tls_letsencrypt_hostname": "",
    }
    for key, value in expected.items():
        obj: Any = cfg
        for part in key.replace("global", "global_").split("."):
            obj = getattr(obj, part)
        assert obj == value, key
    # pyheadscale deliberately batches faster than Headscale's 800ms.
    assert timedelta(0) < cfg.tuning.batch_change_delay <= timedelta(milliseconds=100)
    assert cfg.tuning.batcher_workers == 0  # Headscale's "3/4 of the CPUs"


def test_embedded_default(tmp_path: Path) -> None:
    d = tmp_path / "state"
    cfg = default_config(d)
    assert cfg.warnings == []
    assert cfg.data_dir == d
    assert cfg.server_url == "http://127.0.0.1:8080"
    assert cfg.listen_addr == "127.0.0.1:8080"
    assert cfg.metrics_listen_addr == "127.0.0.1:9090"
    assert cfg.database.type == "sqlite" and cfg.database.sqlite.path == d / "db.sqlite"
    assert cfg.noise.private_key_path == d / "noise_private.key"
    srv = cfg.derp.server
    assert srv.enabled and srv.region_id == 999 and srv.region_code == "headscale"
    assert srv.private_key_path == d / "derp_server_private.key"
    assert srv.stun_listen_addr == "127.0.0.1:3478"
    assert srv.hostname == "127.0.0.1" and srv.listen_addr == "127.0.0.1:8443"
    assert srv.tls_cert_path is None and srv.insecure_for_tests is False
    assert cfg.derp.urls == []
    assert cfg.unix_socket == str(d / "headscale.sock")
    assert cfg.policy.mode == "file" and cfg.policy.path is None and cfg.policy.is_empty
    assert cfg.dns.magic_dns and cfg.dns.base_domain == "tailnet.internal"
    assert cfg.prefixes.v4 == IPv4Network("100.64.0.0/10")
    assert cfg.prefixes.v6 == IPv6Network("fd7a:115c:a1e0::/48")
    assert cfg.prefixes.allocation == "sequential"
    assert cfg.domain() == "127.0.0.1"
    # Nothing about it depends on the environment.
    assert default_config(d).model_dump() == cfg.model_dump()


def test_embedded_default_round_trips_through_a_file(tmp_path: Path) -> None:
    # Dumped back to YAML, the embedded default is a valid Headscale-shaped file.
    cfg = default_config(tmp_path)
    data = cfg.model_dump(mode="json", by_alias=True, exclude={"warnings", "config_file"})
    reloaded = load(tmp_path, data)
    # The dump spells out grpc_listen_addr, which then warns: compared without warnings.
    assert reloaded.model_dump(exclude={"config_file", "warnings"}) == cfg.model_dump(
        exclude={"config_file", "warnings"})


# --- the example file -----------------------------------------------------------------------

def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.warnings == []
    assert cfg.server_url == "http://127.0.0.1:8080"
    assert cfg.dns.base_domain == "example.com"
    assert cfg.node.ephemeral.inactivity_timeout == timedelta(minutes=30)
    assert cfg.derp.server.ipv4 == IPv4Address("198.51.100.1")
    assert cfg.unix_socket_permission == 0o770


def _leaves(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if name in ("warnings", "config_file"):
            continue
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += _leaves(ann, key + ".")
        else:
            out.append(key)
    return out


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    missing = [k for k in _leaves(Config)
               if not re.search(rf"^[ #]*{re.escape(k.rsplit('.', 1)[-1])}:", text, re.M)]
    assert missing == []


def test_example_marks_extensions() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for key in ("data_dir:", "listen_addr: 0.0.0.0:8443", "hostname:", "tls_cert_path: /etc",
                "insecure_for_tests:"):
        at = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith(key))
        before = "\n".join(lines[max(0, at - 6):at])
        assert "pyheadscale-only" in before, key


# --- value parsing ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("0", timedelta(0)), ("0s", timedelta(0)), ("300ms", timedelta(milliseconds=300)),
    ("1h30m", timedelta(minutes=90)), ("1.5h", timedelta(minutes=90)),
    (".5s", timedelta(milliseconds=500)), ("-1.5h", -timedelta(minutes=90)),
    ("2h45m10s", timedelta(hours=2, minutes=45, seconds=10)), ("1us", timedelta(microseconds=1)),
    ("1µs", timedelta(microseconds=1)), ("1500ns", timedelta(microseconds=2)),
    (0, timedelta(0)),
])
def test_go_durations(text: Any, expected: timedelta) -> None:
    assert read_go_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "h", "1hh", "--1s", "1d", "1 h", "5 minutes", 90, True])
def test_bad_go_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        read_go_duration(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", timedelta(0)), (0, timedelta(0)), ("180d", timedelta(days=180)),
    ("1w", timedelta(days=7)), ("1y", timedelta(days=365)), ("1d12h", timedelta(hours=36)),
    ("90m", timedelta(minutes=90)), ("1500ms", timedelta(milliseconds=1500)),
])
def test_prometheus_durations(text: Any, expected: timedelta) -> None:
    assert read_prometheus_duration(text) == expected


@pytest.mark.parametrize("text", ["1.5d", "30m1h", "d", "-1d", "180", "1 d"])
def test_bad_prometheus_durations(text: str) -> None:
    with pytest.raises(ValueError):
        read_prometheus_duration(text)


@pytest.mark.parametrize(("td", "text"), [
    (timedelta(0), "0s"), (timedelta(seconds=65), "1m5s"), (timedelta(hours=1), "1h0m0s"),
    (timedelta(milliseconds=800), "800ms"), (timedelta(seconds=1.5), "1.5s"),
    (timedelta(minutes=2), "2m0s"),
])
def test_format_go_duration(td: timedelta, text: str) -> None:
    assert format_go_duration(td) == text


def test_unquoted_octal_socket_mode(tmp_path: Path) -> None:
    cfg = load(tmp_path, yaml.safe_dump(merged()) + "unix_socket_permission: 0770\n")
    assert cfg.unix_socket_permission == 0o770
    assert load(tmp_path, merged(unix_socket_permission="0o750")).unix_socket_permission == 0o750


def test_numbers_accepted_where_text_is(tmp_path: Path) -> None:
    data = merged(database={"type": "postgres",
                            "postgres": {"host": "db", "port": "", "pass": 12345, "ssl": "require"}})
    cfg = load(tmp_path, data)
    assert cfg.database.postgres.pass_ == "12345"
    assert cfg.database.postgres.port is None
    assert cfg.database.postgres.sslmode == "require"
    assert "12345" not in repr(cfg.database.postgres)


def test_sections_left_empty_mean_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, yaml.safe_dump(merged()) + "oidc:\ntuning:\n")
    assert cfg.oidc.scope == ["openid", "profile", "email"] and not cfg.oidc.enabled


def test_oidc_secret_from_path_with_env(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "oidc").write_text("  top-secret\n")
    data = merged(oidc={"issuer": "https://id.example.com", "client_id": "hs",
                        "client_secret_path": "${CREDENTIALS_DIRECTORY}/oidc"})
    cfg = load(tmp_path, data, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert cfg.oidc.client_secret == "top-secret" and cfg.oidc.enabled
    with pytest.raises(ConfigError, match=r"^config: oidc.client_secret_path: cannot read "):
        load(tmp_path, data, {"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})


def test_derp_extension_defaults_follow_server(tmp_path: Path) -> None:
    data = merged(listen_addr="0.0.0.0:8080",
                  derp={"server": {"enabled": True, "stun_listen_addr": "0.0.0.0:3478",
                                   "private_key_path": "derp.key"}})
    cfg = load(tmp_path, data)
    assert cfg.derp.server.hostname == "hs.example.net"
    # https server_url: the relay is on the main listener, as in Headscale
    assert cfg.derp.server.listen_addr is None
    assert cfg.derp.server.private_key_path == tmp_path.resolve() / "derp.key"
    # plain http: clients need TLS for DERP, so a separate listener on port 8443
    cfg = load(tmp_path, {**data, "server_url": "http://hs.example.net:8080"})
    assert cfg.derp.server.listen_addr == "0.0.0.0:8443"
    # a relay certificate without the separate listener would be ignored: refused
    bad = {**data, "derp": {"server": {**data["derp"]["server"],
                                       "tls_cert_path": "c.pem", "tls_key_path": "k.pem"}}}
    with pytest.raises(ConfigError, match="derp.server.tls_cert_path: applies only to the "
                                          "separate relay listener"):
        load(tmp_path, bad)
    data["derp"]["server"].update(hostname="203.0.113.7", listen_addr="[::]:443",
                                  tls_cert_path="c.pem", tls_key_path="k.pem")
    cfg = load(tmp_path, data)
    assert cfg.derp.server.hostname == "203.0.113.7"
    assert cfg.derp.server.listen_addr == "[::]:443"
    assert cfg.derp.server.tls_cert_path == tmp_path.resolve() / "c.pem"


def test_string_lists_and_extra_records(tmp_path: Path) -> None:
    data = merged(dns={"base_domain": "tail.example.com", "override_local_dns": False,
                       "search_domains": "a.example b.example",
                       "extra_records": [{"name": "g.tail.example.com", "type": "A",
                                          "value": "100.64.0.3"}]})
    cfg = load(tmp_path, data)
    assert cfg.dns.search_domains == ["a.example", "b.example"]
    rec = cfg.dns.extra_records[0]
    assert (rec.name, rec.type, rec.value) == ("g.tail.example.com", "A", "100.64.0.3")
