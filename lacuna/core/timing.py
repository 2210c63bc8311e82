"""Where a run's time goes: named phases, done/total progress with an ETA, and the
throttled progress lines of long steps (:class:`ProgressLog`)."""

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
    """Done/total counts, and the time left at the rate so far.

    The rate is taken at the last :meth:`settle`: after every item by default, or,
    with ``settle_each=False``, only where the caller says the items done so far are
    representative (masks mapped in groups finish in a burst after each group's pass,
    so the rate within a group says nothing about the groups still to come).
    """

    def __init__(self, total: int, settle_each: bool = True):
        self.total = total
        self.done = 0
        self.settle_each = settle_each
        self._started = time.perf_counter()
        self._settled: tuple[int, float] = (0, 0.0)  # (items done, seconds) at the last settle

    def settle(self) -> None:
        """Take the rate from the items done so far."""
        self._settled = (self.done, time.perf_counter() - self._started)

    def eta_text(self) -> str:
        """``"ETA 12 s"`` (empty before the rate is known and after the last item)."""
        if self.settle_each:
            self.settle()
        settled_done, settled_seconds = self._settled
        if not settled_done or self.done >= self.total:
            return ""
        elapsed = time.perf_counter() - self._started
        left = settled_seconds / settled_done * self.total - elapsed
        return f"ETA {max(left, 0.0):.0f} s"


class ProgressLog:
    """Progress lines of a long step: ``<what>: <done>/<total> <unit>, ETA <s> s``.

    Call it with ``(done, total, seconds)`` (``total`` may be None when unknown,
    ``seconds`` since the step began). A line is logged at INFO at most every
    ``interval`` seconds, and one when the step ends; that last line is at INFO only
    when earlier ones were, so a short step adds no INFO line (DEBUG instead).
    """

    def __init__(self, logger: logging.Logger, what: str, unit: str = "", interval: float = 10.0):
        self.logger, self.what, self.unit, self.interval = logger, what, unit, interval
        self._last = 0.0
        self._logged = False

    def __call__(self, done: int, total: int | None, seconds: float) -> None:
        finished = total is not None and done >= total
        if seconds - self._last < self.interval and not finished:
            return
        self._last = seconds
        count = f"{done}/{total}" if total else f"{done}"
        text = f"{self.what}: {count}" + (f" {self.unit}" if self.unit else "")
        if not finished:
            text += f", {seconds:.0f} s elapsed"
            if total and done:
                text += f", ETA {seconds / done * (total - done):.0f} s"
        level = logging.INFO if self._logged or not finished else logging.DEBUG
        self.logger.log(level, "%s", text)
        self._logged = self._logged or level == logging.INFO
