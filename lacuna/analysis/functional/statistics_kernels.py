"""Compiled kernels of the p values and FDR adjustment of functional maps: the
interpolated table of Student t's tail, and a Benjamini-Hochberg step-up over a radix
sort (a comparison sort of a brain-sized map takes five times as long)."""

from __future__ import annotations

import math

import numpy as np

from lacuna.core.compiled import compile_kernel


def hermite_coefficients(step: float, values: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """Power-basis coefficients (one row of four per piece) of the cubic Hermite
    interpolant through knots ``k * step`` with the given ``values`` and ``slopes``: on
    piece k, at ``u = x / step - k``, it is ``c0 + u (c1 + u (c2 + u c3))``."""
    p0, p1 = values[:-1], values[1:]
    m0, m1 = step * slopes[:-1], step * slopes[1:]
    return np.ascontiguousarray(np.stack([p0, m0, 3 * (p1 - p0) - 2 * m0 - m1, 2 * (p0 - p1) + m0 + m1], axis=1))


@compile_kernel
def clipped_hermite(x, inverse_step, coefficients, out):
    """``out = min(h(x), 0)`` for the interpolant ``h`` of :func:`hermite_coefficients`
    (x >= 0; beyond the last knot the last piece is extended). Returns the largest x."""
    last = coefficients.shape[0] - 1
    largest = 0.0
    for i in range(x.size):
        position = x[i] * inverse_step
        largest = max(largest, x[i])
        k = min(int(min(position, last)), last)
        u = position - k
        value = coefficients[k, 0] + u * (coefficients[k, 1] + u * (coefficients[k, 2] + u * coefficients[k, 3]))
        out[i] = min(value, 0.0)
    return largest


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
    clipped_hermite(vector, 2.0, np.ones((3, 4)), np.empty(4))
    keys = np.empty(4, dtype=np.uint64)
    shift = rank_keys(vector, keys)
    radix_sort_keys(keys, shift, np.empty_like(keys))
    step_up_adjust(vector, keys, shift, np.empty(4))
