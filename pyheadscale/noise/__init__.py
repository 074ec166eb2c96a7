"""Sans-IO Noise IK for the Tailscale control protocol (ts2021).

`handshake` answers a client's initiation (and, for tests, initiates one), `records` is the
transport record layer with Tailscale's big-endian nonces, `keys` loads and formats keys.
"""

from pyheadscale.noise.handshake import (
    HandshakeError,
    HandshakeResult,
    Initiator,
    NoiseError,
    ServerRefusedError,
    UnsupportedVersionError,
    error_frame,
    parse_initiation,
    prologue,
    respond,
)
from pyheadscale.noise.keys import (
    KeyFileError,
    KeyFormatError,
    format_key,
    generate_private_key,
    load_or_create_private_key,
    parse_key,
    public_key,
)
from pyheadscale.noise.records import (
    MAX_PLAINTEXT,
    MAX_RECORD,
    NonceExhaustedError,
    RecordAuthError,
    RecordError,
    RecordLayer,
    RecordTooLargeError,
    RecordTypeError,
    nonce,
)

__all__ = [
    "MAX_PLAINTEXT",
    "MAX_RECORD",
    "HandshakeError",
    "HandshakeResult",
    "Initiator",
    "KeyFileError",
    "KeyFormatError",
    "NoiseError",
    "RecordAuthError",
    "RecordError",
    "RecordLayer",
    "RecordTooLargeError",
    "RecordTypeError",
    "NonceExhaustedError",
    "ServerRefusedError",
    "UnsupportedVersionError",
    "error_frame",
    "format_key",
    "generate_private_key",
    "load_or_create_private_key",
    "nonce",
    "parse_initiation",
    "parse_key",
    "prologue",
    "public_key",
    "respond",
]
