"""Bounds of one HTTP/2-over-Noise connection, and the body budget all of them share.

What a peer can make a connection hold (docs/limits.md):

* request bodies: at most `max_buffered_body` bytes per connection and `BodyBudget.total` for
  all connections together. Flow-control window is granted (WINDOW_UPDATE) only while the
  buffered bytes are under both caps, and again as handlers take their bodies, so a peer that
  sends bodies it never finishes stalls on its own window instead of filling memory;
* `max_concurrent_streams` open streams (advertised in SETTINGS, enforced by h2);
* `body_timeout` from a request's headers to the end of its body (then RST_STREAM);
* output the peer provokes but does not read (PING and SETTINGS acknowledgements, resets):
  past `max_queued_control_frames` frames' worth queued behind a blocked socket the
  connection is closed, as Go's HTTP/2 server does after 10,000 queued control frames;
* `handshake_timeout` from our Noise response to the client's HTTP/2 preface, and
  `unregistered_idle_timeout` without an open stream for a machine key no node has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from h2.utilities import HeaderValidationFlags, validate_headers

if TYPE_CHECKING:
    from hpack.struct import Header  # h2's header type (hpack comes with h2)

    from pyheadscale.config.schema import LimitsConfig

# The smallest control frame a peer can make us queue: a PING ACK (9-byte header + 8).
CONTROL_FRAME_BYTES = 17
# Whatever else happens, a connection whose unsent output passes this is closed.
MAX_UNSENT_OUTPUT = 16 << 20


@dataclass(frozen=True)
class H2Limits:
    max_concurrent_streams: int = 100
    max_buffered_body: int = 1 << 20
    body_timeout: float = 30.0
    max_queued_control_frames: int = 10_000
    handshake_timeout: float = 10.0
    unregistered_idle_timeout: float = 60.0

    @classmethod
    def from_config(cls, c: LimitsConfig) -> H2Limits:
        return cls(
            max_concurrent_streams=c.http2_max_concurrent_streams,
            max_buffered_body=c.http2_max_buffered_body,
            body_timeout=c.http2_body_timeout.total_seconds(),
            max_queued_control_frames=c.http2_max_queued_control_frames,
            handshake_timeout=c.noise_handshake_timeout.total_seconds(),
            unregistered_idle_timeout=c.unregistered_idle_timeout.total_seconds(),
        )

    @property
    def max_reactive_output(self) -> int:
        return self.max_queued_control_frames * CONTROL_FRAME_BYTES


class BodyBudget:
    """Request-body bytes buffered by every connection together.

    A connection that holds back window because the budget ran out registers a callback;
    when bytes are released anywhere, the waiting connections get their chance again.
    """

    def __init__(self, total: int = 64 << 20) -> None:
        self.total = total
        self.used = 0
        self._waiting: dict[int, Callable[[], None]] = {}

    @property
    def exhausted(self) -> bool:
        return self.used >= self.total

    def take(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiting and not self.exhausted:
            waiting, self._waiting = self._waiting, {}
            for grant in waiting.values():
                grant()

    def wait(self, key: int, grant: Callable[[], None]) -> None:
        self._waiting[key] = grant

    def forget(self, key: int) -> None:
        self._waiting.pop(key, None)


_REQUEST_HEAD = HeaderValidationFlags(is_client=False, is_trailer=False,
                                      is_response_header=False, is_push_promise=False)


def request_headers(headers: Iterable[Header]) -> list[Header]:
    """h2's checks of a request head (RFC 9113 section 8), but with a Host header beside
    `:authority` dropped, not compared: h2 refuses the pair when they differ, and tailscale-rs
    sends `:authority 198.51.100.1:8080` with `host 198.51.100.1`. Inside Noise the authority
    means nothing (routing is on `:path`), and Go's server, Headscale's, takes `:authority`
    and ignores Host. Raises h2.exceptions.ProtocolError for a malformed head."""
    if any(k == b":authority" for k, _ in headers):
        headers = [(k, v) for k, v in headers if k != b"host"]
    return list(validate_headers(headers, _REQUEST_HEAD))
