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
    """Done/total counts with an ETA, logged at most every ``interval`` seconds (and
    always for the last item)."""

    def __init__(self, what: str, total: int, logger: logging.Logger, interval: float = 10.0):
        self.what = what
        self.total = total
        self.done = 0
        self._logger = logger
        self._interval = interval
        self._started = time.perf_counter()
        self._last = self._started

    def eta_text(self) -> str:
        """``"ETA 12 s"`` from the rate so far (empty before the first item)."""
        if not self.done:
            return ""
        elapsed = time.perf_counter() - self._started
        return f"ETA {elapsed / self.done * (self.total - self.done):.0f} s"

    def advance(self, count: int = 1) -> None:
        """Count ``count`` more items done; log when due."""
        self.done += count
        now = time.perf_counter()
        if self.done >= self.total or now - self._last >= self._interval:
            self._last = now
            self._logger.info(
                "%s: %d/%d, %.0f s elapsed, %s", self.what, self.done, self.total, now - self._started, self.eta_text()
            )
