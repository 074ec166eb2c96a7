"""Integration tests: official tailscale/tailscaled against pyheadscale in network namespaces."""
