"""Admission through an HTTP endpoint (derper's --verify-client-url).

POST <url> with {"NodePublic":"nodekey:<hex>","Source":"<ip>"} and no Content-Type; admit
only on HTTP 200 with {"Allow": true} (read at most 4 KiB).  When the URL cannot be reached
(connection error, timeout) the client is admitted if ``fail_open`` (derper's default) and
refused otherwise.  A non-200 answer or bad JSON always refuses.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp

log = logging.getLogger("derp.verify")

VERIFY_TIMEOUT = 5.0
MAX_RESPONSE = 4096


def admit_request_body(node_public: bytes, source_ip: str) -> bytes:
    try:
        src = str(ipaddress.ip_address(source_ip))
    except ValueError:
        src = ""
    return json.dumps({"NodePublic": "nodekey:" + node_public.hex(), "Source": src},
                      separators=(",", ":")).encode()


def parse_admit_response(body: bytes) -> bool:
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError("response is not an object")
    for k, v in obj.items():
        if k.lower() == "allow":
            if not isinstance(v, bool):
                raise ValueError("Allow is not a boolean")
            return v
    return False


def make_url_verifier(url: str, *, fail_open: bool = True,
                      timeout: float = VERIFY_TIMEOUT) -> Callable[[bytes, str], Awaitable[bool]]:
    """A ``verify_client`` callable for DerpServer backed by an admission URL."""
    session: aiohttp.ClientSession | None = None

    async def verify(node_public: bytes, source_ip: str) -> bool:
        nonlocal session
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                skip_auto_headers=("Content-Type", "User-Agent"))
        body = admit_request_body(node_public, source_ip)
        try:
            async with session.post(url, data=body,
                                    skip_auto_headers=("Content-Type",)) as resp:
                status = resp.status
                raw = await resp.content.read(MAX_RESPONSE)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            if fail_open:
                log.warning("verify URL %s unreachable (%s); admitting (fail open)", url, e)
                return True
            log.warning("verify URL %s unreachable (%s); refusing", url, e)
            return False
        if status != 200:
            log.info("verify URL answered %d for nodekey:%s: refused", status, node_public.hex())
            return False
        try:
            return parse_admit_response(raw)
        except ValueError:
            log.info("verify URL answered bad JSON: refused")
            return False

    return verify
