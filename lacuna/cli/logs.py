"""Logging of the command line: levels from -v/-q, one format for every command."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: int, quiet: int) -> None:
    """INFO by default (progress, skips); -v Lacuna's DEBUG messages (details, the time
    breakdown); -vv every library's too; -q WARNING; -qq ERROR."""
    level = max(logging.DEBUG, min(logging.CRITICAL, logging.INFO - 10 * verbose + 10 * quiet))
    libraries = level if verbose >= 2 else max(level, logging.INFO)
    logging.basicConfig(
        level=libraries,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("lacuna").setLevel(level if level < libraries else logging.NOTSET)
