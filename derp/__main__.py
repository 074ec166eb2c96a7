"""Standalone DERP relay + STUN server, flag-compatible with Tailscale's ``derper``.

    python -m derp -a :443 --hostname derp.example.com --certmode selfsigned --certdir ./certs
    python -m derp --dev                 # plain HTTP on :3340, ephemeral key
    python -m derp -a 127.0.0.1:3341 -c ./derper.json --stun-port 3480 --http-port -1

TLS is served when the -a port is 443 or --certmode is given; otherwise plain HTTP
(as derper does).  Go-style single-dash long flags (-hostname, -certmode ...) are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from .http import serve_derp, serve_port80
from .keys import KeyFileError, generate_private_key, load_or_create_private_key
from .server import DerpServer
from .stun import serve_stun
from .tls import cert_name, cert_paths, ensure_self_signed, server_ssl_context

log = logging.getLogger("derp")


def _bool(v: str) -> bool:
    if v.lower() in ("1", "t", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v}")


def _split_hostport(addr: str, default_port: int) -> tuple[str, int]:
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    elif addr.count(":") == 1:
        host, _, port = addr.partition(":")
    elif ":" in addr:  # bare IPv6
        host, port = addr, ""
    else:
        host, port = addr, ""
    return host, int(port) if port else default_port


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyderp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-a", "--addr", "-addr", default=":443",
                    help="listen address [host]:port (default :443)")
    ap.add_argument("--hostname", "-hostname", default="derp.example.com",
                    help="DERP host name (TLS certificate SAN, SNI check)")
    ap.add_argument("-c", "--config", "-config", default=None,
                    help="key file: derper JSON {\"PrivateKey\":\"privkey:...\"} or privkey:<hex>")
    ap.add_argument("--certmode", "-certmode", choices=["manual", "selfsigned"], default=None,
                    help="manual: use <certdir>/<hostname>.crt/.key; selfsigned: create/reuse")
    ap.add_argument("--certdir", "-certdir", default=None)
    ap.add_argument("--stun", "-stun", type=_bool, default=True, nargs="?", const=True,
                    help="run the STUN server (default true)")
    ap.add_argument("--stun-port", "-stun-port", type=int, default=3478)
    ap.add_argument("--http-port", "-http-port", type=int, default=80,
                    help="plain HTTP port for /generate_204 and redirects; -1 disables")
    ap.add_argument("--verify-client-url", "-verify-client-url", default="")
    ap.add_argument("--verify-client-url-fail-open", "-verify-client-url-fail-open",
                    type=_bool, default=True, nargs="?", const=True)
    ap.add_argument("--mesh-psk-file", "-mesh-psk-file", default="")
    ap.add_argument("--mesh-with", "-mesh-with", default="",
                    help="comma-separated host[:port][/dialhost] list of region peers")
    ap.add_argument("--bootstrap-dns-names", "-bootstrap-dns-names", default="",
                    help="name=ip[+ip...] pairs, comma-separated, served at /bootstrap-dns")
    ap.add_argument("--dev", "-dev", action="store_true",
                    help="plain HTTP on :3340 with an ephemeral key")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


async def run(args: argparse.Namespace) -> None:
    if args.dev:
        priv = generate_private_key()
        args.addr = ":3340" if args.addr == ":443" else args.addr
        if args.http_port == 80:
            args.http_port = -1
        mesh_key = os.environ.get("TAILSCALE_DERPER_MESH_KEY", "").strip() or None
    else:
        path = args.config or ("/var/lib/derper/derper.key" if os.geteuid() == 0
                               else str(Path.home() / ".config" / "derper.key"))
        priv = load_or_create_private_key(path)
        mesh_key = None
    if args.mesh_psk_file:
        mesh_key = Path(args.mesh_psk_file).read_text().strip()  # noqa: ASYNC240 (startup)
    host, port = _split_hostport(args.addr, 443)  # empty host: all interfaces

    verify = None
    if args.verify_client_url:
        from .verify import make_url_verifier

        verify = make_url_verifier(args.verify_client_url,
                                   fail_open=args.verify_client_url_fail_open)
    srv = DerpServer(priv, verify_client=verify, mesh_key=mesh_key)

    use_tls = not args.dev and (port == 443 or args.certmode is not None)
    ctx = None
    scheme = "http"
    if use_tls:
        scheme = "https"
        certdir = args.certdir or str(Path.home() / ".cache" / "tailscale" / "derper-certs")
        mode = args.certmode or "selfsigned"
        if mode == "manual":
            cert_file, key_file = cert_paths(certdir, args.hostname)
            if not (cert_file.exists() and key_file.exists()):
                # derper creates a self-signed cert in manual mode when none exists
                cert_file, key_file = ensure_self_signed(certdir, args.hostname)
        else:
            cert_file, key_file = ensure_self_signed(certdir, args.hostname)
        ctx = server_ssl_context(cert_file, key_file, hostname=args.hostname)
        node = {"Name": "900a", "RegionID": 900, "HostName": args.hostname,
                "CertName": cert_name(cert_file)}
        if port != 443:
            node["DERPPort"] = port
        print("DERP map node for this certificate:", json.dumps(node), flush=True)

    bootstrap: dict[str, list[str]] = {}
    for item in filter(None, args.bootstrap_dns_names.split(",")):
        name, _, ips = item.partition("=")
        bootstrap[name.strip()] = [ip for ip in ips.split("+") if ip]

    listener = await serve_derp(srv, host or "", port, ctx, bootstrap_dns=bootstrap or None)
    log.info("derp: serving %s on %s:%d, key nodekey:%s", scheme, host or "*", port,
             srv.public_key.hex())
    closers = [listener]
    if use_tls and args.http_port > 0:
        closers.append(await serve_port80(host or "", args.http_port,
                                          https_host=args.hostname))
    stun_transport = None
    if args.stun and args.stun_port > 0:
        try:
            stun_transport = await serve_stun(host or "::", args.stun_port)
        except OSError:
            if host:
                raise
            stun_transport = await serve_stun("0.0.0.0", args.stun_port)  # no IPv6 here
        log.info("stun: listening on %s:%d", host or "*", args.stun_port)

    if args.mesh_with:
        if not srv.mesh_key:
            raise SystemExit("--mesh-with needs --mesh-psk-file")
        for peer in filter(None, (s.strip() for s in args.mesh_with.split(","))):
            name, _, dial = peer.partition("/")
            if name.split(":")[0] == args.hostname and not dial:
                continue  # ourselves
            target = dial or name
            # Like derper: always TLS, the certificate verified for `name` (SSL_CERT_FILE
            # adds a CA), so the mesh key is only ever sealed to the real peer relay.
            srv.add_mesh_peer(f"https://{target}/derp", server_hostname=name.split(":")[0])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
    await stop.wait()
    for c in closers:
        c.close()
    if stun_transport is not None:
        stun_transport.close()
    await srv.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        # uvloop's loop and TLS transport cost the relay ~20 % less CPU per packet than
        # asyncio's (tests/bench/derp.py).
        uvloop.run(run(args))
    except KeyFileError as e:
        print(f"pyderp: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"pyderp: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
