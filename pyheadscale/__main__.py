"""`python -m pyheadscale` runs the headscale-compatible CLI."""

from pyheadscale.cli import main

if __name__ == "__main__":
    main()
