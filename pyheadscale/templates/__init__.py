"""HTML pages served by pyheadscale, as small Python functions (values are always escaped)."""
