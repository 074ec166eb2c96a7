"""A Python client of the Tailscale control protocol, for tests and load generation."""

from pyheadscale.testclient.client import (
    ClientStream,
    ConnectionClosed,
    ControlConnection,
    StreamResetError,
    connect,
    fetch_key,
)
from pyheadscale.testclient.mapframes import MapFrameDecoder, MapFrameError, encode_map_frame
from pyheadscale.testclient.transport import UpgradeError

__all__ = [
    "ClientStream",
    "ConnectionClosed",
    "ControlConnection",
    "MapFrameDecoder",
    "MapFrameError",
    "StreamResetError",
    "UpgradeError",
    "connect",
    "encode_map_frame",
    "fetch_key",
]
