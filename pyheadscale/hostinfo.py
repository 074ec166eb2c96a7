"""tailcfg.Hostinfo and the types inside it, as Go declares them, with our size caps.

Field names and types follow Tailscale's tailcfg (the union of the supported client
releases: a field a release dropped, such as NetInfo.HairPinning, is still understood).
Every Hostinfo a client sends, and every one read back from the database, passes through
``decode_hostinfo`` before the server keeps it; peers then only ever receive values their own
decoder accepts. The caps are documented in docs/client-data.md.
"""

from __future__ import annotations

from typing import Any

import orjson

from pyheadscale.gojson import (
    ABSENT,
    Bool,
    DecodeError,
    Float,
    GoType,
    Int,
    List,
    Map,
    OptBool,
    Ptr,
    Str,
    Struct,
    Text,
    addrport_text,
    prefix_text,
)

__all__ = [
    "HOSTINFO",
    "HOSTINFO_PTR",
    "HOSTINFO_MAX_BYTES",
    "Hostinfo",
    "PREFIX",
    "ADDRPORT",
    "DecodeError",
    "decode_hostinfo",
    "encoded_size",
]

# A decoded Hostinfo: JSON data with Go field names, known keys only, zero values omitted.
Hostinfo = dict[str, Any]

HOSTINFO_MAX_BYTES = 64 * 1024  # the whole Hostinfo, re-encoded
MAX_STR = 256
MAX_HOSTNAME = 255  # Headscale's MaxHostnameLength
MAX_ROUTABLE_IPS = 512
MAX_REQUEST_TAGS = 64
MAX_TAG_LEN = 128
MAX_SERVICES = 512
MAX_SSH_HOST_KEYS = 16
MAX_SSH_HOST_KEY_LEN = 8192
MAX_WOL_MACS = 32
MAX_DERP_LATENCY = 256

PREFIX = Text("netip.Prefix", prefix_text, max_len=64)
ADDRPORT = Text("netip.AddrPort", addrport_text, max_len=128)

_S = Str(MAX_STR)

SERVICE = Struct("tailcfg.Service", {
    "Proto": Str(32),
    "Port": Int(16, signed=False),
    "Description": Str(128),
})

LOCATION = Struct("tailcfg.Location", {
    "Country": _S, "CountryCode": _S, "City": _S, "CityCode": _S,
    "Latitude": Float, "Longitude": Float, "Priority": Int(),
})

TPM_INFO = Struct("tailcfg.TPMInfo", {
    "Manufacturer": _S, "Vendor": _S, "Model": Int(), "FirmwareVersion": Int(64, signed=False),
    "SpecRevision": Int(), "FamilyIndicator": _S,
})

NETINFO = Struct("tailcfg.NetInfo", {
    "MappingVariesByDestIP": OptBool,
    "HairPinning": OptBool,  # dropped after v1.80; old clients still send it
    "WorkingIPv6": OptBool,
    "OSHasIPv6": OptBool,
    "WorkingUDP": OptBool,
    "WorkingICMPv4": OptBool,
    "HavePortMap": Bool,
    "UPnP": OptBool,
    "PMP": OptBool,
    "PCP": OptBool,
    "PreferredDERP": Int(),
    "LinkType": _S,
    "DERPLatency": Map(Float, MAX_DERP_LATENCY),
    "FirewallMode": _S,
})

HOSTINFO = Struct("tailcfg.Hostinfo", {
    "IPNVersion": _S,
    "FrontendLogID": _S,
    "BackendLogID": _S,
    "OS": _S,
    "OSVersion": Str(512),
    "Container": OptBool,
    "Env": _S,
    "Distro": _S,
    "DistroVersion": _S,
    "DistroCodeName": _S,
    "App": _S,
    "Desktop": OptBool,
    "Package": _S,
    "DeviceModel": _S,
    "PushDeviceToken": Str(1024),
    # The hostname also lands in its own database column and in DNS names: no controls.
    "Hostname": Str(MAX_HOSTNAME, no_controls=True),
    "ShieldsUp": Bool,
    "ShareeNode": Bool,
    "NoLogsNoSupport": Bool,
    "RemoteConfig": Bool,
    "WireIngress": Bool,
    "IngressEnabled": Bool,
    "AllowsUpdate": Bool,
    "Machine": _S,
    "GoArch": _S,
    "GoArchVar": _S,
    "GoVersion": _S,
    "RoutableIPs": List(PREFIX, MAX_ROUTABLE_IPS),
    "RequestTags": List(Str(MAX_TAG_LEN, no_controls=True), MAX_REQUEST_TAGS),
    "WoLMACs": List(Str(64), MAX_WOL_MACS),
    "Services": List(SERVICE, MAX_SERVICES),
    "NetInfo": Ptr(NETINFO),
    "sshHostKeys": List(Str(MAX_SSH_HOST_KEY_LEN), MAX_SSH_HOST_KEYS),
    "Cloud": _S,
    "Userspace": OptBool,
    "UserspaceRouter": OptBool,
    "AppConnector": OptBool,
    "ServicesHash": _S,
    "PeerRelay": Bool,
    "ExitNodeID": _S,
    "Location": Ptr(LOCATION),
    "TPM": Ptr(TPM_INFO),
    "StateEncrypted": OptBool,
})


def encoded_size(hi: Hostinfo) -> int:
    return len(orjson.dumps(hi))


def decode_hostinfo(value: Any, *, lenient: bool = False, path: str = "Hostinfo") -> Hostinfo:
    """A client's (or a stored) Hostinfo as Go would decode it; ``{}`` for null.

    Strict (client requests): any wrong type or exceeded cap raises DecodeError, so the whole
    request is refused and nothing of it is kept. Lenient (rows written by an older server):
    offending fields are dropped, then the largest fields until the size cap holds.
    """
    if value is None:
        return {}
    hi = HOSTINFO.decode_object(value, path, lenient)
    size = encoded_size(hi)
    if size <= HOSTINFO_MAX_BYTES:
        return hi
    if not lenient:
        raise DecodeError(f"{path}: {size} bytes encoded, limit {HOSTINFO_MAX_BYTES}")
    for key in sorted(hi, key=lambda k: len(orjson.dumps(hi[k])), reverse=True):
        if key == "Hostname":
            continue
        del hi[key]
        if encoded_size(hi) <= HOSTINFO_MAX_BYTES:
            break
    return hi


class _HostinfoPtr(GoType):
    """``*Hostinfo`` inside a request: null is nil, an object is decoded and size-capped."""

    def decode(self, value: Any, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        return decode_hostinfo(value, lenient=lenient, path=path)


HOSTINFO_PTR = _HostinfoPtr()
