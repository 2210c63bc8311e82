"""Where a run's time goes: named phases, and done/total progress with an ETA."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager


class PhaseTimes:
    """Seconds spent per named phase (thread-safe; phases on other threads add up
    separately from the wall time of the run)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self.started = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``."""
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str):
        """Time the body of a ``with`` block as phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def items(self) -> list[tuple[str, float]]:
        """Phases in the order they first appeared."""
        with self._lock:
            return list(self._seconds.items())

    def log(self, logger: logging.Logger, level: int = logging.DEBUG) -> None:
        """Log one ``time: <phase>: <seconds> s`` line per phase, then the total."""
        for name, seconds in self.items():
            logger.log(level, "time: %s: %.2f s", name, seconds)
        logger.log(level, "time: total: %.2f s", time.perf_counter() - self.started)


class Progress:
    """Done/total counts, and the time left at the rate so far."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self._started = time.perf_counter()

    def eta_text(self) -> str:
        """``"ETA 12 s"`` (empty before the first item and after the last)."""
        if not self.done or self.done >= self.total:
            return ""
        elapsed = time.perf_counter() - self._started
        return f"ETA {elapsed / self.done * (self.total - self.done):.0f} s"
