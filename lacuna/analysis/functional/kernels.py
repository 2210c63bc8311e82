"""Compiled kernels of functional lesion network mapping.

numpy runs each element-wise step as a separate pass over memory, and each call from
Python costs microseconds; at the sizes of a connectome (hundreds of millions of values
per subject) those, not the matrix product, would set the pace. Here one compiled call
(:func:`map_group`) maps a block of voxels for a group of subjects: it works through
the block in parts small enough to stay in cache, widens and centres the stored values
in one pass, calls BLAS ``sgemm`` directly, and turns the products into Fisher z and
running sums in one more pass. The kernels release the GIL, so the engine's threads run
them in parallel. The t statistic across subjects has a kernel here too; p values and
FDR, in :mod:`lacuna.analysis.functional.statistics_kernels`.

float16 connectomes are read as their raw bits (``uint16``) and widened here: numba has
no float16 type, and numpy's own conversion costs more than the rest of a block.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from lacuna.analysis.functional import statistics_kernels
from lacuna.core.compiled import compile_kernel
from lacuna.analysis.compiled_primitives import (
    array_like,
    binary_exponent,
    blas_sgemm,
    call_sgemm,
    half_to_single,
    prefetch,
    reduced_mantissa,
)


#: Rows of a block fetched ahead of use: the rows of a block are far apart in memory,
#: so the hardware prefetcher does not see them coming.
_ROWS_AHEAD = 8


@numba.njit(inline="always", error_model="numpy")
def _prefetch_row(timeseries, t, start, width):
    """Prefetch ``timeseries[t, start : start + width]`` if row t exists."""
    if t < timeseries.shape[0]:
        row = timeseries[t]
        stop = min(start + width, row.size)
        for index in range(start, stop, 64 // row.itemsize):
            prefetch(row, index)


def _stored_value(row, j):
    """``row[j]`` as float32, where ``row`` holds float32 values or (uint16) the bits of
    float16 values; compiled for each type separately (see the overload below)."""
    raise NotImplementedError("only called from compiled kernels")


@overload(_stored_value, inline="always")
def _stored_value_for(row, j):
    # Chosen by the stored type when the kernel is compiled, so that the loops carry
    # no branch and vectorise.
    if row.dtype == types.uint16:
        return lambda row, j: half_to_single(row[j])
    return lambda row, j: np.float32(row[j])


@compile_kernel
def _load_row(row, out):
    """Copy one row of stored values (float32, or uint16 float16 bits) into float32
    ``out``."""
    for j in range(row.size):
        out[j] = _stored_value(row, j)


@compile_kernel
def gather_columns(timeseries, columns, out):
    """Copy the voxel ``columns`` of one subject into float32 ``out`` (T x n), row by
    row (each row of the stored array is read once, in column order)."""
    for t in range(out.shape[0]):
        row = timeseries[t]
        target = out[t]
        for i in range(columns.size):
            target[i] = _stored_value(row, columns[i])


@compile_kernel
def weighted_sums(timeseries, columns, owners, weights, out):
    """Weighted sums of voxel columns per seed: ``out[t, l] = sum of weights[i] *
    timeseries[t, columns[i]]`` over the i with ``owners[i] == l`` (float64).

    ``columns`` should be sorted, so that each row of the stored array is read in
    order. Four rows are summed side by side, which keeps four independent chains of
    additions in flight, and the same columns of the next four rows are prefetched
    (the reads hop through memory, so the hardware cannot guess them).
    """
    out[:] = 0.0
    n_timepoints = timeseries.shape[0]
    for t0 in range(0, n_timepoints, 4):
        rows = min(4, n_timepoints - t0)
        ahead = min(4, n_timepoints - t0 - rows)  # rows of the next round
        for i in range(columns.size):
            column, owner, weight = columns[i], owners[i], weights[i]
            for dt in range(ahead):
                prefetch(timeseries[t0 + rows + dt], column)
            for dt in range(rows):
                value = _stored_value(timeseries[t0 + dt], column)
                out[t0 + dt, owner] += weight * np.float64(value)


#: log(1 + f) = f - f**2 / 2 + f**3 * (c0 + c1 f + ... + c7 f**7) for sqrt(1/2) <= 1 + f
#: < sqrt(2): a least-squares fit, reweighted to even out the relative error (1.6e-8,
#: below float32's resolution).
_LOG1P_COEFFICIENTS = tuple(
    np.float32(c)
    for c in (
        0.3333330632652664,
        -0.25000642340924584,
        0.20002968592664547,
        -0.16630725277717756,
        0.14171008033231486,
        -0.13059744821070482,
        0.1291822212825885,
        -0.08083622213375968,
    )
)
_LN2 = np.float32(math.log(2.0))
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@numba.njit(inline="always", error_model="numpy")
def fisher_z(r):
    """arctanh(r) of a float32 r with |r| < 1, as 0.5 log((1 + r) / (1 - r)), in a form
    that vectorises (no call to libm): within 5e-7 relative of the exact value. For
    |r| < 0.17 the logarithm is taken of 1 + u with u = 2r / (1 - r) given directly,
    so small r keep their relative precision."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _LOG1P_COEFFICIENTS
    inverse = _ONE / (_ONE - r)
    quotient = (_ONE + r) * inverse
    exponent = binary_exponent(quotient)
    f = reduced_mantissa(quotient) - _ONE if exponent != 0 else (r + r) * inverse
    f2 = f * f
    tail = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + c0
    return _HALF * (exponent * _LN2 + (f - _HALF * f2 + f2 * f * tail))


@compile_kernel
def fisher_z_array(r, out):
    """:func:`fisher_z` of every element of the float32 ``r`` into ``out``."""
    for i in range(r.size):
        out[i] = fisher_z(r[i])


@compile_kernel
def _centre_part(timeseries, start, width, centred, inverse_norms, means):
    """One pass over the voxel columns ``start : start + width`` of one subject.

    ``centred[t, j]`` receives d = x[t] - x[0] (row 0 is zero), ``means[j]`` the mean
    of d and ``inverse_norms[j]`` 1 / the norm of the centred column, or 0 where the
    voxel is invalid (constant, or holding a non-finite value). The product of a
    centred seed s with the centred column is then ``s . d - means[j] * sum(s)``.
    Differences from x[0] keep float32 sums exact enough whatever the offset of the
    raw values, and make a constant column exactly zero.
    """
    n_timepoints = centred.shape[0]
    first = centred[0, :width]
    _load_row(timeseries[0, start : start + width], first)
    sums = np.zeros(width, dtype=np.float32)
    squares = np.zeros(width, dtype=np.float32)
    for t in range(1, n_timepoints):
        _prefetch_row(timeseries, t + _ROWS_AHEAD, start, width)
        source = timeseries[t, start : start + width]
        row = centred[t, :width]
        for j in range(width):
            d = _stored_value(source, j) - first[j]
            row[j] = d
            sums[j] += d
            squares[j] += d * d
    first[:] = 0.0
    _finish_norms(sums, squares, n_timepoints, inverse_norms, means)


@compile_kernel
def _finish_norms(sums, squares, n_timepoints, inverse_norms, means):
    """Means and inverse centred norms from the sums of d and d**2 over timepoints."""
    width = sums.size
    for j in range(width):
        mean = sums[j] / np.float32(n_timepoints)
        squares[j] -= sums[j] * mean
        means[j] = mean
    for j in range(width):
        valid = squares[j] > 0 and squares[j] < np.inf
        inverse_norms[j] = np.float32(1.0 / math.sqrt(squares[j])) if valid else np.float32(0.0)


@compile_kernel
def _correlate_part(timeseries, start, width, seeds, products, inverse_norms, means, first, rows):
    """For two to :data:`DIRECT_MAX_LESIONS` seeds (one: :func:`_correlate_one_part`):
    ``products[l, j] = seeds[l] . d`` with d as in
    :func:`_centre_part`, with the means and inverse norms, in one pass over the stored
    values (no centred copy, no matrix product): where the pass over memory is the
    whole cost. ``width`` is at most :data:`DIRECT_PART`, so that the running sums stay
    in the L1 cache; ``first`` (P,) and ``rows`` (4, P) are float32 scratch.

    Timepoints are taken four at a time: each load and store of a running sum then
    serves four stored values (measured 25% faster than one at a time).
    """
    n_lesions, n_timepoints = seeds.shape
    first = first[:width]
    sums = np.zeros(width, dtype=np.float32)
    squares = np.zeros(width, dtype=np.float32)
    for lesion in range(n_lesions):
        products[lesion, :width] = 0.0
    _load_row(timeseries[0, start : start + width], first)
    t = 1
    while t < n_timepoints:
        if t + 4 <= n_timepoints:
            _add_four_rows(timeseries, t, start, width, seeds, first, sums, squares, products, rows)
            t += 4
        else:
            _add_row(timeseries, t, start, width, seeds, first, sums, squares, products, rows[0, :width])
            t += 1
    _finish_norms(sums, squares, n_timepoints, inverse_norms, means)


@compile_kernel
def _correlate_one_part(timeseries, start, width, seed, products, inverse_norms, means, first, rows):
    """:func:`_correlate_part` for a single seed (``seed`` (T,), ``products`` (1, P)),
    which needs no copy of the differences: timepoints are taken eight at a time, each
    a long run of memory that the hardware prefetcher follows (parts of tens of
    thousands of voxels, no software prefetch), and each load and store of a running
    sum serves eight stored values: measured 3.5 ms per subject and thread, against
    4.6 ms with the short parts of :func:`_correlate_part`. The running sums of d and
    d**2 are kept in ``rows[0]`` and ``rows[1]``.
    """
    n_timepoints = seed.size
    first, sums, squares, target = first[:width], rows[0, :width], rows[1, :width], products[0, :width]
    sums[:] = 0.0
    squares[:] = 0.0
    target[:] = 0.0
    stop = start + width
    _load_row(timeseries[0, start:stop], first)
    t = 1
    while t + 8 <= n_timepoints:
        x0, x1 = timeseries[t, start:stop], timeseries[t + 1, start:stop]
        x2, x3 = timeseries[t + 2, start:stop], timeseries[t + 3, start:stop]
        x4, x5 = timeseries[t + 4, start:stop], timeseries[t + 5, start:stop]
        x6, x7 = timeseries[t + 6, start:stop], timeseries[t + 7, start:stop]
        w0, w1, w2, w3 = seed[t], seed[t + 1], seed[t + 2], seed[t + 3]
        w4, w5, w6, w7 = seed[t + 4], seed[t + 5], seed[t + 6], seed[t + 7]
        for j in range(width):
            f = first[j]
            d0, d1, d2, d3 = _stored_value(x0, j) - f, _stored_value(x1, j) - f, _stored_value(x2, j) - f, _stored_value(x3, j) - f
            d4, d5, d6, d7 = _stored_value(x4, j) - f, _stored_value(x5, j) - f, _stored_value(x6, j) - f, _stored_value(x7, j) - f
            sums[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            squares[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))
            target[j] += ((w0 * d0 + w1 * d1) + (w2 * d2 + w3 * d3)) + ((w4 * d4 + w5 * d5) + (w6 * d6 + w7 * d7))
        t += 8
    for t in range(t, n_timepoints):
        source, weight = timeseries[t, start:stop], seed[t]
        for j in range(width):
            d = _stored_value(source, j) - first[j]
            sums[j] += d
            squares[j] += d * d
            target[j] += weight * d
    _finish_norms(sums, squares, n_timepoints, inverse_norms, means)


@numba.njit(inline="always", error_model="numpy")
def _add_four_rows(timeseries, t, start, width, seeds, first, sums, squares, products, rows):
    """:func:`_correlate_part` for timepoints t to t + 3."""
    for dt in range(4):
        _prefetch_row(timeseries, t + _ROWS_AHEAD + dt, start, width)
    a, b = timeseries[t, start : start + width], timeseries[t + 1, start : start + width]
    c, d = timeseries[t + 2, start : start + width], timeseries[t + 3, start : start + width]
    wa, wb, wc, wd = seeds[0, t], seeds[0, t + 1], seeds[0, t + 2], seeds[0, t + 3]
    target = products[0, :width]
    ra, rb, rc, rd = rows[0, :width], rows[1, :width], rows[2, :width], rows[3, :width]
    for j in range(width):  # the other seeds need the differences
        f = first[j]
        da, db = _stored_value(a, j) - f, _stored_value(b, j) - f
        dc, dd = _stored_value(c, j) - f, _stored_value(d, j) - f
        ra[j], rb[j], rc[j], rd[j] = da, db, dc, dd
        sums[j] += (da + db) + (dc + dd)
        squares[j] += (da * da + db * db) + (dc * dc + dd * dd)
        target[j] += (wa * da + wb * db) + (wc * dc + wd * dd)
    for lesion in range(1, seeds.shape[0]):
        wa, wb, wc, wd = seeds[lesion, t], seeds[lesion, t + 1], seeds[lesion, t + 2], seeds[lesion, t + 3]
        target = products[lesion, :width]
        for j in range(width):
            target[j] += (wa * ra[j] + wb * rb[j]) + (wc * rc[j] + wd * rd[j])


@numba.njit(inline="always", error_model="numpy")
def _add_row(timeseries, t, start, width, seeds, first, sums, squares, products, row):
    """:func:`_correlate_part` for timepoint t alone."""
    _prefetch_row(timeseries, t + _ROWS_AHEAD, start, width)
    source = timeseries[t, start : start + width]
    for j in range(width):
        d = _stored_value(source, j) - first[j]
        row[j] = d
        sums[j] += d
        squares[j] += d * d
    for lesion in range(seeds.shape[0]):
        weight = seeds[lesion, t]
        target = products[lesion, :width]
        for j in range(width):
            target[j] += weight * row[j]


@numba.njit(error_model="numpy", fastmath={"contract"})
def _accumulate_fisher_z(products, width, inverse_norms, means, seed_sums, valid_seeds, limit, set_shift, shift, sum_dz, sum_dz2):
    """Turn one subject's products into Fisher z and add ``z - shift`` and its square
    to a part's float32 sums, in one pass.

    r = (products[l, j] - means[j] * seed_sums[l]) * inverse_norms[j], clipped to
    +-``limit``; pairs of an invalid voxel (inverse norm 0) or seed add nothing. With
    ``set_shift`` (the first subject), ``shift`` is first set to z (0 for invalid
    pairs).
    """
    for lesion in range(products.shape[0]):
        shifts = shift[lesion, :width]
        if not valid_seeds[lesion]:
            if set_shift:
                shifts[:] = 0.0
            continue
        values = products[lesion, :width]
        sums = sum_dz[lesion, :width]
        squares = sum_dz2[lesion, :width]
        seed_sum = seed_sums[lesion]
        if set_shift:
            for j in range(width):
                r = min(max((values[j] - means[j] * seed_sum) * inverse_norms[j], -limit), limit)
                shifts[j] = fisher_z(r) if inverse_norms[j] != 0 else np.float32(0.0)
        for j in range(width):
            r = min(max((values[j] - means[j] * seed_sum) * inverse_norms[j], -limit), limit)
            d = fisher_z(r) - shifts[j] if inverse_norms[j] != 0 else np.float32(0.0)
            sums[j] += d
            squares[j] += d * d


#: Voxels the one-pass kernel (a few seeds) takes at a time: its running sums then
#: stay in the L1 cache.
DIRECT_PART = 1024

#: Up to this many seeds, :func:`map_group` forms the products in one pass over the
#: stored values; beyond, by centring each part and one matrix product.
DIRECT_MAX_LESIONS = 4


@compile_kernel
def map_group(first_subject, addresses, seeds, valid_seeds, start, stop, first_group, limit, sgemm, totals, workspace, invalid):
    """Fold the Fisher z of a group of subjects for voxels ``start : stop`` into the
    running sums.

    The voxels are taken in parts of ``workspace``'s width, small enough for a part's
    data (centred columns, products, float32 partial sums) to stay in the L2 cache
    while every subject of the group passes through it. Per subject and part: the
    products of the seeds with the centred columns (by :func:`_centre_part` and one
    ``sgemm``, or for a few seeds by :func:`_correlate_part`), then
    :func:`_accumulate_fisher_z`. After the group, a part's partial sums are added
    to the float64 totals.

    Parameters
    ----------
    first_subject : ndarray (T, V)
        The group's first stored timeseries (float32, or uint16 holding float16 bits).
    addresses : ndarray (G,) int64
        Where the data of each subject of the group starts; each is a C-contiguous
        array of the shape and type of ``first_subject``, kept alive by the caller.
        (Addresses rather than a numba typed list, whose methods would be compiled
        in every process.)
    seeds : ndarray (G, L, T) float32
        Centred, unit-norm seeds per subject (0 for invalid seeds).
    valid_seeds : ndarray (G, L) bool
    start, stop : int
        The voxels to map.
    first_group : bool
        The sums are empty: the first subject sets the shift.
    limit : float32
        Correlations are clipped to +-limit.
    sgemm : tuple (int, int)
        The BLAS ``sgemm`` to call, from :func:`blas_sgemm`; unused for a few seeds.
    totals : tuple (shift (L, V) float32, sum_dz (L, V) float64, sum_dz2 (L, V) float64)
        The running sums (see :class:`~lacuna.analysis.functional.engine.FisherZSums`).
    workspace : tuple of float32 arrays
        This thread's buffers: centred (T, P), products, shift, sum_dz, sum_dz2
        (L, P), inverse norms, means, first (P,), rows (4, P), for parts of P voxels.
    invalid : ndarray (G, stop - start) bool
        Receives the voxels invalid in each subject.
    """
    shift_total, sum_dz_total, sum_dz2_total = totals
    centred, products, part_shift, part_dz, part_dz2, inverse_norms, means, first, rows = workspace
    n_subjects, n_lesions, n_timepoints = seeds.shape
    part_width = products.shape[1]
    seed_sums = np.zeros((n_subjects, n_lesions), dtype=np.float32)
    for g in range(n_subjects):
        for lesion in range(n_lesions):
            seed_sums[g, lesion] = seeds[g, lesion].sum()
    direct = n_lesions <= DIRECT_MAX_LESIONS
    for part_start in range(start, stop, part_width):
        width = min(part_width, stop - part_start)
        part_dz[:, :width] = 0.0
        part_dz2[:, :width] = 0.0
        if not first_group:
            part_shift[:, :width] = shift_total[:, part_start : part_start + width]
        for g in range(n_subjects):
            timeseries = array_like(first_subject, addresses[g])
            if n_lesions == 1:
                _correlate_one_part(timeseries, part_start, width, seeds[g, 0], products, inverse_norms, means, first, rows)
            else:
                if g + 1 < n_subjects:  # the next subject's first rows, while this one computes
                    for t in range(_ROWS_AHEAD):
                        _prefetch_row(array_like(first_subject, addresses[g + 1]), t, part_start, width)
                if direct:
                    _correlate_part(timeseries, part_start, width, seeds[g], products, inverse_norms, means, first, rows)
                else:
                    _centre_part(timeseries, part_start, width, centred, inverse_norms, means)
                    call_sgemm(sgemm, width, n_lesions, n_timepoints, centred, part_width, seeds[g], n_timepoints, products, part_width)
            set_shift = first_group and g == 0
            _accumulate_fisher_z(products, width, inverse_norms, means, seed_sums[g], valid_seeds[g], limit, set_shift, part_shift, part_dz, part_dz2)
            for j in range(width):
                invalid[g, part_start - start + j] = inverse_norms[j] == 0
        if first_group:
            shift_total[:, part_start : part_start + width] = part_shift[:, :width]
        for lesion in range(n_lesions):
            sums = sum_dz_total[lesion, part_start : part_start + width]
            squares = sum_dz2_total[lesion, part_start : part_start + width]
            for j in range(width):
                sums[j] += part_dz[lesion, j]
                squares[j] += part_dz2[lesion, j]


@compile_kernel
def t_statistics(shift, sum_dz, sum_dz2, counts, mean, t, abs_t, defined):
    """Mean z and one-sample t of one lesion from its shifted sums.

    Parameters
    ----------
    shift : ndarray (V,) float32
    sum_dz, sum_dz2 : ndarray (V,) float64
        Sums of (z - shift) and (z - shift)^2.
    counts : ndarray (V,) or (1,) float64
        Subjects contributing to each voxel, or to all of them.
    mean, t : ndarray (V,) float32
        Receive mean z and t (0 where t is undefined).
    abs_t : ndarray (V,) float64
        Receives |t| at full precision, for p values.
    defined : ndarray (V,) bool
        Receives where t is defined: more than one subject and a standard error that is
        not negligible next to the mean.
    """
    for j in range(shift.size):
        count = counts[j] if counts.size > 1 else counts[0]
        mean_dz = sum_dz[j] / count if count > 0 else 0.0
        mean_z = shift[j] + mean_dz
        variance = (sum_dz2[j] - count * mean_dz * mean_dz) / (count - 1) if count > 1 else 0.0
        standard_error = math.sqrt(max(variance, 0.0) / max(count, 1.0))
        defined[j] = count > 1 and standard_error > 1e-12 * max(abs(mean_z), 1.0)
        t_value = mean_z / standard_error if defined[j] else 0.0
        mean[j] = mean_z
        t[j] = t_value
        abs_t[j] = abs(t_value)


@compile_kernel
def scatter(values, indices, fill, out):
    """``out[:] = fill``, then ``out[indices[i]] = values[i]`` (a volume from values in
    the brain mask, in two passes and without the GIL)."""
    out[:] = fill
    for i in range(indices.size):
        out[indices[i]] = values[i]


_PREPARED: set[np.dtype] = set()  # stored types whose kernels this process has loaded


def prepare(stored_dtypes) -> None:
    """Compile every kernel (or load it from numba's cache) for the argument types the
    engine passes with connectomes stored as ``stored_dtypes`` (float16 and/or float32),
    so that a pass does not stall on it midway. Loading takes a few tenths of a second
    per process, compiling several seconds the first time; later calls for the same
    types return at once."""
    wanted = {np.dtype(np.uint16) if np.dtype(d) == np.float16 else np.dtype(d) for d in stored_dtypes}
    if wanted <= _PREPARED:
        return
    for dtype in wanted:
        timeseries = np.zeros((4, 16), dtype=dtype)
        timeseries.flags.writeable = False  # subjects are handed over read-only
        columns = np.arange(2, dtype=np.int64)
        weighted_sums(timeseries, columns, columns, np.ones(2), np.empty((4, 2)))
        gather_columns(timeseries, columns, np.empty((4, 2), dtype=np.float32))
        addresses = np.array([timeseries.ctypes.data])
        for n_lesions in (1, 2, DIRECT_MAX_LESIONS + 1):  # each way of forming products
            seeds = np.zeros((1, n_lesions, 4), dtype=np.float32)
            totals = (np.zeros((n_lesions, 16), dtype=np.float32), np.zeros((n_lesions, 16)), np.zeros((n_lesions, 16)))
            workspace = new_workspace(4, n_lesions, 8)
            invalid = np.empty((1, 16), dtype=bool)
            map_group(timeseries, addresses, seeds, np.ones((1, n_lesions), dtype=bool), 0, 16, True, np.float32(0.5), blas_sgemm(), totals, workspace, invalid)
    vector = np.ones(4)
    single = np.empty(4, dtype=np.float32)
    t_statistics(single, vector, vector, vector, single, single, np.empty(4), np.empty(4, dtype=bool))
    t_statistics(single, vector, vector, vector[:1].copy(), single, single, np.empty(4), np.empty(4, dtype=bool))
    for values in (single, vector):
        scatter(values, np.arange(4), np.float32(0.0), np.empty(8, dtype=np.float32))
    statistics_kernels.prepare()
    _PREPARED.update(wanted)


def new_workspace(n_timepoints: int, n_lesions: int, part_width: int) -> tuple[np.ndarray, ...]:
    """One thread's buffers for :func:`map_group`, for parts of ``part_width`` voxels
    (empty where the way of mapping ``n_lesions`` seeds does not use them)."""
    centred_width = part_width if n_lesions > DIRECT_MAX_LESIONS else 0
    rows_width = part_width if n_lesions <= DIRECT_MAX_LESIONS else 0
    return (
        np.empty((n_timepoints, centred_width), dtype=np.float32),
        *(np.empty((n_lesions, part_width), dtype=np.float32) for _ in range(4)),
        *(np.empty(part_width, dtype=np.float32) for _ in range(3)),
        np.empty((4, rows_width), dtype=np.float32),
    )
