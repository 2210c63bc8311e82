"""numba's ``njit`` as Lacuna compiles its kernels: without the GIL, cached on disk in
the user's cache (never beside the installed code).

Imported only by the modules that define kernels, so that commands which need none
(``--help``, ``--version``, a regional-damage run) start without numba.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numba

from lacuna.core import settings


def compile_kernel(function):
    """``numba.njit`` without the GIL, cached on disk in :func:`kernel_cache_dir` when
    there is one; compiled at first use otherwise. Never cached inside the installed
    package: files left there outlive an uninstall, and the folder they keep then
    shadows a later (editable) install of Lacuna."""
    if kernel_cache_dir() is not None:
        try:
            return numba.njit(nogil=True, cache=True, error_model="numpy")(function)
        except RuntimeError:  # numba found no usable cache location after all
            pass
    return numba.njit(nogil=True, error_model="numpy")(function)


@functools.lru_cache(maxsize=1)
def kernel_cache_dir() -> str | None:
    """Where compiled kernels are cached: ``$NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/lacuna/numba`` (``~/.cache/lacuna/numba``); None when that folder
    cannot be written (then kernels are compiled in memory at each run)."""
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    base = settings.xdg_cache_home() or Path.home() / ".cache"
    folder = os.path.join(base, "lacuna", "numba")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return None
    numba.config.CACHE_DIR = folder  # numba's own locator then caches there
    return folder
