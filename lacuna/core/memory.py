"""Memory: what is available to the process, advice to the kernel (``madvise(2)`` on
numpy arrays), and zeroed arrays on small pages.

Python's ``mmap.madvise`` holds the GIL and works on ``mmap`` objects only; here the
call goes through ctypes (which releases the GIL) on any array's memory. Outside
Linux, advice is not given and :func:`madvise` returns False.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

#: Fault pages in, readable or writable, in one call (Linux >= 5.14; Python does not
#: name them).
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

#: Bytes faulted in per ``MADV_POPULATE_WRITE`` call. The call holds the process' address
#: space lock, which other threads' ``mmap``/``munmap`` (large allocations, Python's
#: arenas, files) wait for: sums of 470 MB faulted in one call on a thread of their own
#: held up a start-up's other threads by 0.1-0.2 s, in 4 MiB pieces not measurably.
POPULATE_PIECE_BYTES = 4 << 20

#: Back a range with transparent huge pages, or never (Linux only; None elsewhere).
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def madvise(array: np.ndarray, start: int, length: int, advice: int | None) -> bool:
    """``madvise(2)`` on ``length`` bytes from byte ``start`` of ``array``'s memory.

    ``start`` and the address it gives must be page-aligned. Returns whether the
    kernel took the advice (False where it refused, or where there is no such call).
    """
    if _LIBC is None or advice is None:
        return False
    address = ctypes.c_void_p(array.ctypes.data + start)
    return _LIBC.madvise(address, ctypes.c_size_t(length), ctypes.c_int(advice)) == 0


def zeros_on_small_pages(shape, dtype) -> np.ndarray:
    """A zeroed array whose memory is advised off transparent huge pages and faulted
    in now, by the calling thread.

    For large arrays numpy asks for huge pages. Where memory is fragmented (a machine
    whose page cache holds a connectome) each huge-page fault may first compact
    memory, and faults from several threads at once contend. Measured for the 578 MB
    of running sums of 100 lesions: faulted in by the mapping threads on huge pages,
    1.2 s of CPU; here, 0.16-0.3 s (and the pass after it 0.4 s shorter). The pages are
    faulted in by the kernel (``MADV_POPULATE_WRITE``, :data:`POPULATE_PIECE_BYTES` per
    call), or else by writing to each.
    """
    array = np.zeros(shape, dtype=dtype)
    page = mmap.PAGESIZE
    start = -array.ctypes.data % page  # the page-aligned interior
    length = (array.nbytes - start) // page * page
    if length > 0:
        madvise(array, start, length, MADV_NOHUGEPAGE)
    populated = length > 0
    for offset in range(start, start + length, POPULATE_PIECE_BYTES):
        piece = min(POPULATE_PIECE_BYTES, start + length - offset)
        populated = populated and madvise(array, offset, piece, MADV_POPULATE_WRITE)
    if not populated:
        array.fill(0)  # fault every page in, in order, on this thread
    return array


def available_memory_bytes() -> int:
    """Memory available to this process (MemAvailable, else physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """Half of the available memory."""
    return available_memory_bytes() // 2


#: glibc's ``mallopt`` parameter for the most heaps (arenas) threads may spread over.
_M_ARENA_MAX = -8
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (glibc's largest allowed on 64 bits).
HEAP_BLOCKS_BYTES = 32 * 1024**2
#: Free memory at the top of the heap kept for reuse, not returned at each ``free``.
KEPT_FREE_BYTES = 512 * 1024**2


def use_one_heap() -> bool:
    """Have every thread allocate from the main heap (glibc's ``M_ARENA_MAX`` = 1);
    False where the C library has no such setting. Call it before the process starts
    threads.

    By default each thread that allocates gets a heap of its own, and the free memory at
    the end of such a heap stays with the process: :func:`release_free_heap` cannot
    return it. Threads that write maps left 150-200 MB there between two connectome
    passes (measured: a participant run's peak RSS 1.12 GiB for 100 lesions, 1.23 GiB
    for 1,000; with one heap 1.04 and 1.10 GiB, at the same speed, since Lacuna's
    threads allocate few, large blocks).
    """
    return _mallopt(_M_ARENA_MAX, 1)


def reuse_freed_memory() -> bool:
    """Have ``malloc`` serve blocks up to :data:`HEAP_BLOCKS_BYTES` from the heap and
    keep up to :data:`KEPT_FREE_BYTES` of freed memory there (glibc's
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``); False where the C library has no
    such settings.

    By default a block of a few MB (a map's 3.6 MB volume) is often a fresh ``mmap``,
    whose pages the kernel zeroes and maps one fault at a time when first written, and
    memory freed at the top of the heap goes back at once. Lesion after lesion, the
    same blocks are then faulted in again (measured: a lesion's five map volumes took
    3.4 ms of CPU instead of 4.0, at the same peak RSS). Free memory still goes back
    between two connectome passes (:func:`release_free_heap`).
    """
    blocks = _mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS_BYTES)
    return _mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES) and blocks


def _mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt``; False where the C library has none or refuses the value."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return mallopt is not None and bool(mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))


def release_free_heap() -> bool:
    """Hand memory that ``malloc`` keeps free back to the system (glibc's
    ``malloc_trim``); False where the C library has no such call.

    What threads that wrote maps freed is kept for reuse: between two passes over a
    connectome that is a few hundred MB counted in the process' RSS while the next pass
    maps its subjects. A trim costs a few milliseconds; it reaches the free memory at
    the end of threads' own heaps only where they share the main one (see
    :func:`use_one_heap`).
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
