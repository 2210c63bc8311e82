"""Compiled kernels of the p values and FDR adjustment of functional maps: the
interpolated table of Student t's tail, and a Benjamini-Hochberg step-up over a radix
sort (a comparison sort of a brain-sized map takes five times as long)."""

from __future__ import annotations

import math

import numpy as np

from lacuna.core.compiled import compile_kernel


@compile_kernel
def cubic_hermite(x, step, values, slopes, out):
    """Evaluate the cubic Hermite interpolant through knots ``k * step`` with the given
    ``values`` and ``slopes`` at each ``x`` (0 <= x <= (len(values) - 1) * step; beyond,
    the last piece is extended)."""
    last = values.size - 2
    for i in range(x.size):
        position = x[i] / step
        k = min(int(min(position, last)), last)
        u = position - k
        u2 = u * u
        u3 = u2 * u
        out[i] = (
            (2 * u3 - 3 * u2 + 1) * values[k]
            + (u3 - 2 * u2 + u) * step * slopes[k]
            + (3 * u2 - 2 * u3) * values[k + 1]
            + (u3 - u2) * step * slopes[k + 1]
        )


@compile_kernel
def rank_keys(p, keys):
    """Sort keys for non-negative float64 ``p``: the bits of p (which order like p)
    with the index in their lowest bits, so that sorting the keys as integers (a
    vectorised sort) orders p, and each key still says which value it was. The bits
    given up make values equal to about 1e-9 relative tie, ordered by index."""
    shift = np.uint64(max(1, int(math.ceil(math.log2(max(p.size, 2))))))
    bits = p.view(np.uint64)
    for i in range(p.size):
        keys[i] = ((bits[i] >> shift) << shift) | np.uint64(i)
    return shift


#: Bits sorted per pass of :func:`radix_sort_keys` (2,048 counters: they stay in L1).
_RADIX_BITS = 11


@compile_kernel
def radix_sort_keys(keys, shift, scratch):
    """Sort ``keys`` (uint64, see :func:`rank_keys`) in place by their bits above
    ``shift``, ``_RADIX_BITS`` bits per pass, least significant first; ``scratch`` is a
    buffer of the same size. Each pass is stable and the keys start in index order, so
    the result is exactly ``np.sort(keys)``; four passes over a brain-sized map cost a
    fraction of a comparison sort. Passes whose digit is the same in every key are
    skipped."""
    n = keys.size
    radix = 1 << _RADIX_BITS
    digit_mask = np.uint64(radix - 1)
    source, target = keys, scratch
    low = int(shift)
    while low < 64:
        counts = np.zeros(radix, dtype=np.int64)
        for i in range(n):
            counts[int((source[i] >> np.uint64(low)) & digit_mask)] += 1
        if counts.max() < n:
            total = 0
            for d in range(radix):
                count = counts[d]
                counts[d] = total
                total += count
            for i in range(n):
                d = int((source[i] >> np.uint64(low)) & digit_mask)
                target[counts[d]] = source[i]
                counts[d] += 1
            source, target = target, source
        low += _RADIX_BITS
    if source is not keys:
        keys[:] = source


@compile_kernel
def step_up_adjust(p, sorted_keys, shift, out):
    """Benjamini-Hochberg step-up: with ``order`` the indices in ``sorted_keys`` (see
    :func:`rank_keys`), ``out[order[k]]`` = min over ranks j >= k of
    ``p[order[j]] * m / (j + 1)``, capped at 1."""
    m = p.size
    mask = (np.uint64(1) << shift) - np.uint64(1)
    running = 1.0
    for k in range(m - 1, -1, -1):
        index = sorted_keys[k] & mask
        running = min(running, p[index] * m / (k + 1))
        out[index] = running


def prepare() -> None:
    """Compile (or load from numba's cache) every kernel of this module."""
    vector = np.ones(4)
    cubic_hermite(vector, 0.5, vector, vector, np.empty(4))
    keys = np.empty(4, dtype=np.uint64)
    shift = rank_keys(vector, keys)
    radix_sort_keys(keys, shift, np.empty_like(keys))
    step_up_adjust(vector, keys, shift, np.empty(4))
