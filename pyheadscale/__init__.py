"""pyheadscale: a Headscale-compatible Tailscale control server with a bundled DERP relay."""

__version__ = "0.1.0"
