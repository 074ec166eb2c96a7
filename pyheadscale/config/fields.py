"""Field types of the config schema: how one YAML (or env) value is read and checked.

Each type is an `Annotated` pydantic type whose BeforeValidator accepts what viper would
(strings from the environment included) and raises ValueError with the message a user sees.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
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

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer

from pyheadscale.config.errors import quoted
from pyheadscale.durations import (
    format_go_duration,
    format_prometheus_duration,
    parse_go_duration,
    parse_prometheus_duration,
)


def words(value: Any) -> Any:
    # viper's GetStringSlice splits a string (e.g. from env) on whitespace.
    if value is None:
        return []
    return value.split() if isinstance(value, str) else value


def json_if_str(value: Any) -> Any:
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


def _network(text: str) -> IPv4Network | IPv6Network | None:
    # A prefix needs its slash; host bits are accepted, as Go's netip.ParsePrefix does.
    return ip_network(text, strict=False) if "/" in text else None


def _versioned(what: str, version: int,
               parse: Callable[[str], IPv4Network | IPv6Network | IPv4Address | IPv6Address
                               | None]) -> Callable[[Any], Any]:
    """An optional IPv4/IPv6 address or prefix: "" and None read as unset."""
    def check(value: Any) -> Any:
        if value in (None, ""):
            return None
        try:
            parsed = parse(str(value).strip())
        except ValueError:
            parsed = None
        if parsed is None or parsed.version != version:
            raise ValueError(f"not a valid IPv{version} {what}: {quoted(str(value))}")
        return parsed
    return check


def _proxy_prefix(value: Any) -> Any:
    try:
        net = ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a valid CIDR prefix: {quoted(str(value))}") from None
    if net.prefixlen == 0:
        raise ValueError(f"{quoted(str(value))}: 0.0.0.0/0 and ::/0 are not allowed")
    return net


def _file_mode(value: Any) -> Any:
    # YAML 1.1 already reads an unquoted 0770 as octal, so ints are taken as the mode itself.
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        text = str(value).strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f"not an octal file mode: {quoted(str(value))}") from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"not an octal file mode: {quoted(str(value))}")
    return mode


def _ssl(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "t", "f"):
        return value.strip().lower() in ("true", "1", "t")
    if not isinstance(value, bool | str):
        raise ValueError(f"must be true, false or a libpq sslmode name, got {quoted(value)}")
    return value


def read_go_duration(value: Any) -> timedelta:
    """A Go duration from YAML or the environment; as viper, a YAML 0 is 0. A bare non-zero
    number is refused: viper would read it as nanoseconds, always a mistake."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"30s\" or \"1h30m\", got {quoted(value)}")
    text = str(value).strip()
    try:
        return parse_go_duration(text)
    except ValueError:
        digits = text.lstrip("+-").replace(".", "")
        hint = " (missing unit: ns, us, ms, s, m or h)" if digits.isdigit() else ""
        raise ValueError(f"not a valid duration: {quoted(text)}{hint}") from None


def read_prometheus_duration(value: Any) -> timedelta:
    """A Prometheus duration (node.expiry) from YAML or the environment."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"180d\", got {quoted(value)}")
    return parse_prometheus_duration(str(value))


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _group_prefix(value: Any) -> Any:
    # The prefix goes verbatim into `group:<prefix><label>`; keep it in the label alphabet.
    if isinstance(value, str) and not re.fullmatch(r"[a-z0-9._-]*", value):
        raise ValueError(f"must use only a-z, 0-9, '.', '_' and '-', got {quoted(value)}")
    return value


def _node_key(value: Any) -> Any:
    # A DERP server's public key as derper prints it: nodekey:<64 hex>.
    if value in (None, ""):
        return None
    text = str(value).strip()
    if not re.fullmatch(r"nodekey:[0-9a-fA-F]{64}", text):
        raise ValueError(f"not a DERP public key (nodekey:<64 hex digits>): {quoted(text)}")
    return text.lower()


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _byte_size(value: Any) -> Any:
    # A byte count: 1048576, "1MiB", "64 KiB", "10MB".
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"not a byte size (e.g. 1048576, 64KiB, 1MiB): {quoted(str(value))}")
        n = int(m.group(1)) * _SIZE_UNITS[unit]
    if n < 0:
        raise ValueError(f"must not be negative, got {n}")
    return n


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"must be positive, got {format_go_duration(value)}")
    return value


# Dumped (mode="json") in the YAML's own syntax, so a dumped config loads back.
GoDuration = Annotated[timedelta, BeforeValidator(read_go_duration),
                      PlainSerializer(format_go_duration, return_type=str, when_used="json")]
PositiveDuration = Annotated[GoDuration, AfterValidator(_positive)]
PromDuration = Annotated[timedelta, BeforeValidator(read_prometheus_duration),
                         PlainSerializer(format_prometheus_duration, return_type=str,
                                         when_used="json")]
StrList = Annotated[list[str], BeforeValidator(words)]
PathList = Annotated[list[Path], BeforeValidator(words)]
OptPath = Annotated[Path | None, BeforeValidator(_empty_none)]
OptStr = Annotated[str | None, BeforeValidator(_empty_none)]
OptInt = Annotated[int | None, BeforeValidator(_empty_none)]
LowerStr = Annotated[str, BeforeValidator(_lower)]
ByteSize = Annotated[int, BeforeValidator(_byte_size)]
NodeKeyText = Annotated[str | None, BeforeValidator(_node_key)]
ProxyPrefix = Annotated[IPv4Network | IPv6Network, BeforeValidator(_proxy_prefix)]
ProxyPrefixList = Annotated[list[ProxyPrefix], BeforeValidator(words)]
IPv4Prefix = Annotated[IPv4Network | None, BeforeValidator(_versioned("prefix", 4, _network))]
IPv6Prefix = Annotated[IPv6Network | None, BeforeValidator(_versioned("prefix", 6, _network))]
IPv4Addr = Annotated[IPv4Address | None, BeforeValidator(_versioned("address", 4, ip_address))]
IPv6Addr = Annotated[IPv6Address | None, BeforeValidator(_versioned("address", 6, ip_address))]
FileMode = Annotated[int, BeforeValidator(_file_mode)]
SSLSetting = Annotated[bool | str, BeforeValidator(_ssl)]
GroupPrefix = Annotated[str, BeforeValidator(_group_prefix)]
StrMap = Annotated[dict[str, str], BeforeValidator(json_if_str)]
StrListMap = Annotated[dict[str, StrList], BeforeValidator(json_if_str)]


class Section(BaseModel):
    """A typed YAML section: unknown keys are errors, numbers are accepted where text is."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True,
                              validate_by_name=True, validate_by_alias=True)
