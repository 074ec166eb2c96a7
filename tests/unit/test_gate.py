"""derp.gate: open connections per source, counted by socket so takeovers need no callback."""

from __future__ import annotations

import socket

from derp.gate import SourceGate, source_of


def test_sources() -> None:
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_of("2001:db8:0:1::5") == source_of("2001:db8:0:1:ffff::1") == "2001:db8:0:1::/64"
    assert source_of("not an ip") == "not an ip"


def test_limit_counts_open_sockets_only() -> None:
    gate = SourceGate(2)
    socks = [socket.socket() for _ in range(3)]
    try:
        assert gate.admit("192.0.2.1", socks[0]) and gate.admit("192.0.2.1", socks[1])
        assert not gate.admit("192.0.2.1", socks[2]) and gate.refused == 1
        assert gate.admit("192.0.2.2", socks[2])  # another source
        socks[0].close()  # e.g. a taken-over connection that ended
        s = socket.socket()
        assert gate.admit("192.0.2.1", s) and gate.open_count("192.0.2.1") == 2
        s.close()
    finally:
        for s in socks:
            s.close()
    assert gate.open_count("192.0.2.1") == 0
