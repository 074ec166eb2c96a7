"""The main listener's TLS: certificate swaps without a restart, and the TLS-ALPN-01 path
that reads the ClientHello before the handshake (real TLS clients on loopback)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from derp.tls import ensure_self_signed
from pyheadscale.listener import MainListener
from pyheadscale.servertls import ServerTLS, client_hello_names, server_context


def _client_hello(server_name: str | None, alpn: list[str]) -> bytes:
    """The first record a real OpenSSL client sends."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_client_hello_names() -> None:
    assert client_hello_names(_client_hello("hs.example.com", ["acme-tls/1"])) == (
        "hs.example.com", ["acme-tls/1"])
    assert client_hello_names(_client_hello("a.test", ["h2", "http/1.1"])) == (
        "a.test", ["h2", "http/1.1"])
    assert client_hello_names(_client_hello(None, [])) == (None, [])
    hello = _client_hello("hs.example.com", ["acme-tls/1"])
    for bad in (b"", b"\x16\x03\x01", hello[:40], b"GET / HTTP/1.1\r\n\r\n",
                hello[:5] + b"\xff" * 200):
        assert client_hello_names(bad) == (None, []), bad


async def _serve(tls: ServerTLS) -> MainListener:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", hello)
    lst = MainListener(app)
    await lst.start("127.0.0.1", 0, tls)
    return lst


async def _peer_cert(port: int, server_name: str | None = None,
                     alpn: list[str] | None = None) -> tuple[x509.Certificate, str | None]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                         server_hostname=server_name or "")
    obj = w.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True)
    proto = obj.selected_alpn_protocol()
    w.close()
    return x509.load_der_x509_certificate(der), proto


@pytest.fixture(params=[False, True], ids=["plain-accept", "peeking-accept"])
async def certs(request: pytest.FixtureRequest, tmp_path: Path
                ) -> AsyncIterator[tuple[ServerTLS, MainListener, Path, Path]]:
    first, _ = ensure_self_signed(tmp_path / "one", "127.0.0.1")
    second, _ = ensure_self_signed(tmp_path / "two", "127.0.0.1")
    tls = ServerTLS(peek_alpn=request.param)
    tls.use(first, first.with_suffix(".key"))
    lst = await _serve(tls)
    yield tls, lst, first, second
    await lst.stop()


async def test_certificate_swap_keeps_connections(
        certs: tuple[ServerTLS, MainListener, Path, Path]) -> None:
    tls, lst, first, second = certs
    want1 = x509.load_pem_x509_certificate(first.read_bytes())
    want2 = x509.load_pem_x509_certificate(second.read_bytes())
    ctx = ssl.create_default_context(cafile=str(first))
    r, w = await asyncio.open_connection("127.0.0.1", lst.port, ssl=ctx)
    assert (await _peer_cert(lst.port))[0] == want1
    assert (await _peer_cert(lst.port, "127.0.0.1"))[0] == want1
    tls.use(second, second.with_suffix(".key"))
    assert (await _peer_cert(lst.port))[0] == want2  # no SNI (IP-literal clients) too
    assert (await _peer_cert(lst.port, "host.test"))[0] == want2
    # The connection opened before the swap still works.
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    w.close()


async def test_alpn_challenge_certificate_only_for_acme_tls(tmp_path: Path) -> None:
    normal, _ = ensure_self_signed(tmp_path / "n", "127.0.0.1")
    challenge, _ = ensure_self_signed(tmp_path / "c", "hs.example.com")
    tls = ServerTLS(peek_alpn=True)
    tls.use(normal, normal.with_suffix(".key"))
    ch = server_context(challenge, challenge.with_suffix(".key"))
    ch.set_alpn_protocols(["acme-tls/1"])
    tls.alpn_challenges["hs.example.com"] = ch
    lst = await _serve(tls)
    try:
        want_n = x509.load_pem_x509_certificate(normal.read_bytes())
        want_c = x509.load_pem_x509_certificate(challenge.read_bytes())
        got, proto = await _peer_cert(lst.port, "hs.example.com", ["acme-tls/1"])
        assert got == want_c and proto == "acme-tls/1"
        # Same name without acme-tls/1, or acme-tls/1 for another name: the real certificate.
        assert (await _peer_cert(lst.port, "hs.example.com", ["http/1.1"]))[0] == want_n
        assert (await _peer_cert(lst.port, "other.test", ["acme-tls/1"]))[0] == want_n
        # Not TLS at all, or nothing: closed, and the listener keeps serving.
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b""):
            r, w = await asyncio.open_connection("127.0.0.1", lst.port)
            w.write(junk)
            if not junk:
                w.write_eof()
            assert await asyncio.wait_for(r.read(), 15) == b""
            w.close()
        assert (await _peer_cert(lst.port))[0] == want_n
    finally:
        await lst.stop()
