"""Command-line interface: the BIDS App and its companion commands."""
