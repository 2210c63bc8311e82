"""Worker processes that leave nothing behind, even when killed with SIGKILL.

A ``spawn`` process pool shares its queues through POSIX named semaphores
(``/dev/shm/sem.mp-*``): the workers open them by name while they start. Python
removes the names at exit, or its resource tracker does when the main process dies;
a SIGKILL of the whole process group (what a scheduler does) kills the tracker too,
and the names stay until the machine reboots. Here the names are removed as soon as
every worker has opened them: the semaphores live on, unnamed, for as long as the
processes hold them.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import synchronize, util

log = logging.getLogger(__name__)

#: Longest wait for the workers to start (each imports Lacuna first).
STARTUP_TIMEOUT_S = 120.0


def _start_worker(ready, initializer: Callable | None, initargs: tuple) -> None:
    """Initializer of each worker: say it is up (it has opened every semaphore by
    now), then run the caller's initializer."""
    ready.release()
    if initializer is not None:
        initializer(*initargs)


def _noop() -> None:
    return None


@contextmanager
def process_pool(
    max_workers: int, initializer: Callable | None = None, initargs: tuple = ()
) -> Iterator[ProcessPoolExecutor]:
    """A started ``spawn`` pool of ``max_workers`` processes whose semaphores have no
    names left in ``/dev/shm``.

    Parameters
    ----------
    max_workers : int
        Worker processes, all started before the pool is handed out.
    initializer, initargs
        As for :class:`concurrent.futures.ProcessPoolExecutor`.
    """
    context = multiprocessing.get_context("spawn")
    ready = context.Semaphore(0)
    with ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(ready, initializer, initargs),
    ) as pool:
        # One task per worker: a spawn pool starts a process per task while none is idle.
        for _ in range(max_workers):
            pool.submit(_noop)
        if _wait_for_workers(pool, ready, max_workers):
            _unlink_names([ready, *_semaphores_of(pool)])
        yield pool


def _wait_for_workers(pool: ProcessPoolExecutor, ready, count: int) -> bool:
    """Whether all ``count`` workers started (each released ``ready`` once)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    started = 0
    while started < count:
        if ready.acquire(timeout=0.5):
            started += 1
        elif time.monotonic() > deadline or getattr(pool, "_broken", False):
            log.debug("worker processes did not all start; their semaphores keep their names")
            return False
    processes = getattr(pool, "_processes", None)
    return processes is not None and len(processes) == count


def _semaphores_of(pool: ProcessPoolExecutor) -> list[synchronize.SemLock]:
    """The named semaphores of the pool's queues (private attributes, looked up
    defensively: none found means nothing is unlinked)."""
    found = []
    for queue in (getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)):
        for value in vars(queue).values() if queue is not None else ():
            if isinstance(value, synchronize.SemLock):
                found.append(value)
    return found


def _unlink_names(semaphores: list[synchronize.SemLock]) -> None:
    """Remove the semaphores' names now, through the clean-up that Python registered for
    each (it unlinks the name and tells the resource tracker), so that it never runs
    again later."""
    names = {getattr(s._semlock, "name", None) for s in semaphores} - {None}
    for finalizer in list(getattr(util, "_finalizer_registry", {}).values()):
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup and finalizer._args[0] in names:
            try:
                finalizer()
            except OSError as exc:  # already gone: nothing left to clean
                log.debug("semaphore %s: %s", finalizer._args[0], exc)
