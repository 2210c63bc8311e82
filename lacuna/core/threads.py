"""How many threads Lacuna's parallel work uses."""

from __future__ import annotations

import os

from lacuna.core import settings
from lacuna.core.errors import UsageError

#: Variables that size the thread pools of the numerical libraries; read when each
#: library loads, so they are set before the analyses import them (and inherited by
#: worker processes).
LIBRARY_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def worker_threads() -> int:
    """Threads for the per-block work: ``$LACUNA_NUM_THREADS`` or the usable CPUs."""
    return settings.num_threads() or max(1, len(os.sched_getaffinity(0)))


def threads_per_process(nprocs: int, nthreads: int | None = None, omp_nthreads: int | None = None) -> int | None:
    """Threads each process may use, from the fMRIPrep-style options.

    Parameters
    ----------
    nprocs : int
        Worker processes (``--nprocs``).
    nthreads : int, optional
        Most threads of the whole run (``--nthreads``).
    omp_nthreads : int, optional
        Most threads per process (``--omp-nthreads``).

    Returns
    -------
    int or None
        ``omp_nthreads``, else ``nthreads // nprocs``; None when neither is given.

    Raises
    ------
    UsageError
        If the options contradict each other.
    """
    if nthreads is not None and nprocs > nthreads:
        raise UsageError(f"--nprocs {nprocs} is more than --nthreads {nthreads}: each process needs a thread")
    if nthreads is not None and omp_nthreads is not None and omp_nthreads > nthreads:
        raise UsageError(f"--omp-nthreads {omp_nthreads} is more than --nthreads {nthreads}")
    if omp_nthreads is not None:
        return omp_nthreads
    if nthreads is not None:
        return max(1, nthreads // nprocs)
    return None


def configure_threads(nprocs: int, nthreads: int | None = None, omp_nthreads: int | None = None) -> int:
    """Apply the thread options to this process and the workers it starts.

    Sets ``$LACUNA_NUM_THREADS`` (read by :func:`worker_threads`) and the numerical
    libraries' variables (:data:`LIBRARY_THREAD_VARIABLES`) when a limit is given.
    Returns the threads per process now in force.
    """
    per_process = threads_per_process(nprocs, nthreads, omp_nthreads)
    if per_process is not None:
        for variable in ("LACUNA_NUM_THREADS", *LIBRARY_THREAD_VARIABLES):
            os.environ[variable] = str(per_process)
    return worker_threads()


def library_pools_not_started() -> None:
    """Set the BLAS and OpenMP thread variables that neither the user nor the thread
    options set to 1, before the numerical libraries load (no effect on those already
    loaded), for a run that holds them to one thread anyway
    (:func:`single_threaded_libraries`): their pools are then never started. Each
    OpenBLAS (numpy's, and scipy's own) starts its threads when it loads, and they spin
    for about 0.1 s, taking a core from a start-up that needs both."""
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def single_threaded_libraries():
    """Limit the thread pools of the numerical libraries loaded so far (BLAS, OpenMP)
    to one thread each; usable as a context manager, which restores them on exit.

    For work that Lacuna parallelises itself: the libraries' pools would compete with
    its threads, and OpenBLAS's threads spin for a while after each call they share.
    """
    import threadpoolctl

    return threadpoolctl.threadpool_limits(limits=1)
