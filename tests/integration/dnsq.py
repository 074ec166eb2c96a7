"""A minimal DNS client (A/AAAA over UDP) to query 100.100.100.100 from inside a namespace.

Run as a script inside the host's namespace: `python -m tests.integration.dnsq NAME [TYPE]`
prints one address per line, or `NXDOMAIN`/`RCODE n`/`TIMEOUT`.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import sys

TYPES = {"A": 1, "AAAA": 28}


def build_query(name: str, qtype: int) -> tuple[int, bytes]:
    qid = secrets.randbits(16)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return qid, header + labels + b"\x00" + struct.pack(">HH", qtype, 1)


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def parse_answers(msg: bytes, qid: int, qtype: int) -> tuple[int, list[str]]:
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    if rid != qid:
        raise ValueError("DNS answer for another query")
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    out = []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _, _, rdlen = struct.unpack(">HHIH", msg[off:off + 10])
        off += 10
        if rtype == qtype:
            out.append(str(ipaddress.ip_address(msg[off:off + rdlen])))
        off += rdlen
    return flags & 0xF, out


def query(name: str, qtype: str = "A", server: str = "100.100.100.100",
          timeout: float = 3.0) -> tuple[int, list[str]]:
    qid, q = build_query(name, TYPES[qtype])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        data, _ = s.recvfrom(4096)
    return parse_answers(data, qid, TYPES[qtype])


if __name__ == "__main__":
    try:
        rcode, addrs = query(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "A")
    except TimeoutError:
        print("TIMEOUT")
        sys.exit(0)
    if rcode == 3:
        print("NXDOMAIN")
    elif rcode:
        print(f"RCODE {rcode}")
    print("\n".join(addrs))
