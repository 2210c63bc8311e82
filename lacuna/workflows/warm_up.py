"""Reading ahead in the participant level: atlases and parcel operators are prepared on
a background thread while the main thread goes on with the dataset and the compiled
kernels (:class:`WarmUp`), groups of masks are read on another while the group before
them is written (:class:`MaskReader`), and the per-mask analyses of a group run while
its connectome pass leaves the GIL free (:class:`AnalysesAhead`)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lacuna.analysis.base import Analysis, BatchAnalysis
from lacuna.analysis.regional.aggregation import ParcelAggregation
from lacuna.core.grid import Grid
from lacuna.core.subject import SubjectData

log = logging.getLogger(__name__)


class WarmUp:
    """Reads atlases and builds parcel operators on a background thread while the main
    thread goes on with the dataset and the first masks (decompression, numpy and
    scipy release the GIL). A failure here is only logged: the analysis that needs the
    item raises it later, with its context."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lacuna-warm-up")

    def __enter__(self) -> "WarmUp":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def analyses(self, analyses: list[Analysis]) -> None:
        """Queue each analysis' :meth:`~lacuna.analysis.base.Analysis.warm_up`."""
        for analysis in analyses:
            self._pool.submit(self._quietly, analysis.warm_up)

    def follow_ups(self, batch: list[BatchAnalysis], follow_ups: list[list[Analysis]]) -> None:
        """Queue the parcel operators of the batch analyses' follow-up aggregations
        (``follow_ups[i]`` are those of ``batch[i]``)."""
        for analysis, aggregations in zip(batch, follow_ups):
            grid, space = map_grid(analysis)
            if grid is None:
                continue
            for follow_up in aggregations[:1]:  # the maps share one grid
                if isinstance(follow_up, ParcelAggregation):
                    self._pool.submit(self._quietly, follow_up.warm_up_for, grid, space)

    @staticmethod
    def _quietly(function, *args) -> None:
        try:
            function(*args)
        except Exception as exc:  # raised again, with context, where the item is needed
            log.debug("reading ahead (%s) failed: %s", getattr(function, "__qualname__", function), exc)


def map_grid(analysis: BatchAnalysis) -> tuple[Grid | None, str | None]:
    """The grid and space of the maps a batch analysis writes, where known up front
    (functional maps are on the connectome's brain-mask grid)."""
    if analysis.name != "FunctionalNetworkMapping":
        return None, None
    return analysis.connectome.grid, analysis.connectome.space


class MaskReader:
    """Reads and analyses groups of masks (``prepare(group)``) on a background thread:
    the first at once, each later one either while the group before it is written
    (``ahead``, when memory allows two groups) or when it is taken."""

    def __init__(self, groups: list[list[Path]], prepare, ahead: bool = True):
        self._groups, self._prepare, self._ahead = groups, prepare, ahead
        self._read = 0  # groups whose reading has started
        self._pending: deque = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lacuna-masks")
        self._start_next()

    def __enter__(self) -> "MaskReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read_next(self) -> None:
        """Start reading the next group when reading ahead, unless one is read already
        or there is none."""
        if self._ahead:
            self._start_next()

    def take(self):
        """The next group's ``prepare`` result (waits for it; starts reading it first
        if :meth:`read_next` did not)."""
        self._start_next()
        return self._pending.popleft().result()

    def _start_next(self) -> None:
        if not self._pending and self._read < len(self._groups):
            self._pending.append(self._pool.submit(self._prepare, self._groups[self._read]))
            self._read += 1


class AnalysesAhead:
    """Per-mask analyses (regional damage) run ahead on a background thread: started for
    a group's masks when their connectome pass begins (:meth:`start`), they run while
    the pass leaves the GIL free, and :meth:`run` then only adds their results to each
    mask as it is finished after the pass, on all cores. A mask not started, or still
    queued, is analysed by :meth:`run` itself; an analysis' error is raised there too."""

    def __init__(self, analyses: list[Analysis]):
        self.analyses = list(analyses)
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lacuna-ahead")

    def __enter__(self) -> "AnalysesAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def start(self, subjects: list[SubjectData]) -> None:
        """Queue the analyses of ``subjects``, in order. What an earlier group left
        (masks its pass could not map, never finished) is dropped: its masks are all
        finished or failed by the time the next group starts."""
        if not self.analyses:
            return
        with self._lock:
            self._pending.clear()
            for subject in subjects:
                self._pending[_mask_key(subject)] = self._pool.submit(self._run_here, subject)

    def run(self, subject: SubjectData) -> SubjectData:
        """``subject`` with each analysis' results and provenance step (the order of
        ``analyses``, after the steps it has)."""
        with self._lock:
            ahead = self._pending.pop(_mask_key(subject), None)
        if ahead is None or ahead.cancel():
            return self._run_here(subject)
        analysed = ahead.result()
        steps = analysed.provenance[len(analysed.provenance) - len(self.analyses) :]
        for analysis, step in zip(self.analyses, steps):
            subject = subject.with_results(analysis.name, analysed.results[analysis.name], step)
        return subject

    def _run_here(self, subject: SubjectData) -> SubjectData:
        for analysis in self.analyses:
            subject = analysis.run(subject)
        return subject


def _mask_key(subject: SubjectData) -> str:
    return subject.metadata["source_path"]
