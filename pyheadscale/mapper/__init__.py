"""Pure map generation: (tailnet snapshot, viewer) -> MapResponse, (changes, viewer) -> delta.

No I/O, no clock, no globals: callers pass ``now`` and a ``MapContext``.
"""

from pyheadscale.mapper.context import ALLOW_ALL_FILTER, AllowAllPolicy, MapContext, Policy
from pyheadscale.mapper.delta import delta
from pyheadscale.mapper.dns import DNSSettings, build_dns_config, load_extra_records
from pyheadscale.mapper.encode import KEEPALIVE, decode_frame, encode_frame, to_plain
from pyheadscale.mapper.full import PeerCache, full_map, full_map_and_peers

__all__ = [
    "ALLOW_ALL_FILTER",
    "KEEPALIVE",
    "AllowAllPolicy",
    "DNSSettings",
    "MapContext",
    "PeerCache",
    "Policy",
    "build_dns_config",
    "decode_frame",
    "delta",
    "encode_frame",
    "full_map",
    "full_map_and_peers",
    "load_extra_records",
    "to_plain",
]
