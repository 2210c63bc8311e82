"""How many threads Lacuna's parallel work uses."""

from __future__ import annotations

import os


def worker_threads() -> int:
    """Threads for the per-block work: ``$LACUNA_NUM_THREADS`` or the usable CPUs."""
    value = os.environ.get("LACUNA_NUM_THREADS")
    return max(1, int(value)) if value else max(1, len(os.sched_getaffinity(0)))
