"""pyheadscale's DERP relay and STUN server.

Embedding::

    from derp import DerpServer, serve_derp, serve_stun
    srv = DerpServer(private_key, verify_client=check, mesh_key=None)
    listener = await serve_derp(srv, "0.0.0.0", 443, ssl_context)
    stun = await serve_stun("0.0.0.0", 3478)

Standalone: ``python -m derp`` (or ``pyderp``), a drop-in for Tailscale's ``derper``.
"""

from .client import DerpClient, DerpClosed, DerpRejected
from .http import serve_derp, serve_port80
from .keys import load_or_create_private_key
from .server import DerpServer
from .stun import serve_stun
from .tls import cert_name, ensure_self_signed, server_ssl_context
from .verify import make_url_verifier

__all__ = [
    "DerpClient",
    "DerpClosed",
    "DerpRejected",
    "DerpServer",
    "cert_name",
    "ensure_self_signed",
    "load_or_create_private_key",
    "make_url_verifier",
    "serve_derp",
    "serve_port80",
    "serve_stun",
    "server_ssl_context",
]
