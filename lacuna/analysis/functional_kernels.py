"""Compiled per-block kernels of functional lesion network mapping.

numpy runs each element-wise step as a separate pass over memory; at the sizes of a
connectome (hundreds of millions of values per subject) those passes, not the matrix
product, would set the pace. These kernels, compiled with numba, fuse the steps that
surround the float32 matrix product into one or two passes over data that is already in
cache. They release the GIL, so the engine's threads run them in parallel.

float16 connectomes are read as their raw bits (``uint16``) and widened here: numba has
no float16 type, and numpy's own conversion costs more than the rest of a block.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload


def _compile(function):
    """``numba.njit`` without the GIL, cached on disk when numba finds a writable place
    (``NUMBA_CACHE_DIR``, the package's ``__pycache__`` or the user's cache); compiled
    at first use otherwise."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(function)
    except RuntimeError:  # no writable cache location (read-only install, no HOME)
        return numba.njit(nogil=True, error_model="numpy")(function)


@intrinsic
def _half_to_single(typingctx, bits):
    """The float16 value whose bits are ``bits`` (uint16), widened to float32: one
    ``fpext`` instruction, which LLVM vectorises (``vcvtph2ps`` on x86 with F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to fetch ``array[index]`` into cache (``llvm.prefetch``)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        int32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        # read, keep in all cache levels, data
        builder.call(function, [address, ir.Constant(int32, 0), ir.Constant(int32, 3), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


#: Rows of a block fetched ahead of use: the rows of a block are far apart in memory,
#: so the hardware prefetcher does not see them coming.
_ROWS_AHEAD = 4


@numba.njit(inline="always", error_model="numpy")
def _prefetch_row(timeseries, t, start, width):
    """Prefetch ``timeseries[t, start : start + width]`` if row t exists."""
    if t < timeseries.shape[0]:
        row = timeseries[t]
        stop = min(start + width, row.size)
        for index in range(start, stop, 64 // row.itemsize):
            _prefetch(row, index)


def _stored_value(row, j):
    """``row[j]`` as float32, where ``row`` holds float32 values or (uint16) the bits of
    float16 values; compiled for each type separately (see the overload below)."""
    raise NotImplementedError("only called from compiled kernels")


@overload(_stored_value, inline="always")
def _stored_value_for(row, j):
    # Chosen by the stored type when the kernel is compiled, so that the loops carry
    # no branch and vectorise.
    if row.dtype == types.uint16:
        return lambda row, j: _half_to_single(row[j])
    return lambda row, j: np.float32(row[j])


@_compile
def _load_row(row, out):
    """Copy one row of stored values (float32, or uint16 float16 bits) into float32
    ``out``."""
    for j in range(row.size):
        out[j] = _stored_value(row, j)


@_compile
def gather_columns(timeseries, columns, out):
    """Copy the voxel ``columns`` of one subject into float32 ``out`` (T x n), row by
    row (each row of the stored array is read once, in column order)."""
    for t in range(out.shape[0]):
        row = timeseries[t]
        target = out[t]
        for i in range(columns.size):
            target[i] = _stored_value(row, columns[i])


@_compile
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
                _prefetch(timeseries[t0 + rows + dt], column)
            for dt in range(rows):
                value = _stored_value(timeseries[t0 + dt], column)
                out[t0 + dt, owner] += weight * np.float64(value)


@_compile
def centre_block(timeseries, start, centred, inverse_norms):
    """Centre the voxel columns ``start : start + width`` of one subject.

    Parameters
    ----------
    timeseries : ndarray (T, V), float32, or uint16 holding float16 bits
        One subject's stored timeseries.
    start : int
        First voxel of the block.
    centred : ndarray (T, width) float32
        Receives the centred columns (zero for invalid voxels).
    inverse_norms : ndarray (width,) float32
        Receives 1 / norm of each centred column, or 0 for an invalid voxel (constant,
        or holding a non-finite value).

    Notes
    -----
    The mean is taken of differences from the first timepoint, so that a constant
    column gives exactly zero whatever its value.
    """
    n_timepoints, width = centred.shape
    first = centred[0]
    _load_row(timeseries[0, start : start + width], first)
    sums = np.zeros(width, dtype=np.float32)
    for t in range(1, n_timepoints):
        _prefetch_row(timeseries, t + _ROWS_AHEAD, start, width)
        row = centred[t]
        _load_row(timeseries[t, start : start + width], row)
        for j in range(width):
            sums[j] += row[j] - first[j]
    means = np.empty(width, dtype=np.float32)
    for j in range(width):
        means[j] = first[j] + sums[j] / np.float32(n_timepoints)
    squares = np.zeros(width, dtype=np.float32)
    for t in range(n_timepoints):
        row = centred[t]
        for j in range(width):
            value = row[j] - means[j]
            row[j] = value
            squares[j] += value * value
    if _inverse_norms(squares, inverse_norms):
        for t in range(n_timepoints):
            row = centred[t]
            for j in range(width):
                if inverse_norms[j] == 0:
                    row[j] = 0.0


@_compile
def _inverse_norms(squares, inverse_norms):
    """``1 / sqrt(squares)``, or 0 for invalid columns (zero or non-finite sums of
    squares); returns the number of invalid columns."""
    n_invalid = 0
    for j in range(squares.size):
        valid = squares[j] > 0 and squares[j] < np.inf
        inverse_norms[j] = np.float32(1.0 / math.sqrt(squares[j])) if valid else np.float32(0.0)
        n_invalid += not valid
    return n_invalid


@_compile
def _correlate_columns(timeseries, start, seeds, products, inverse_norms):
    """:func:`correlate_block` for at most :data:`_DIRECT_COLUMNS` columns, whose
    running sums then stay in the L1 cache."""
    n_lesions, width = products.shape
    n_timepoints = seeds.shape[1]
    first = np.empty(width, dtype=np.float32)
    row = np.empty(width, dtype=np.float32)
    sums = np.zeros(width, dtype=np.float32)
    squares = np.zeros(width, dtype=np.float32)
    products[:] = 0.0
    _load_row(timeseries[0, start : start + width], first)
    first_products = products[0]
    for t in range(1, n_timepoints):
        _prefetch_row(timeseries, t + _ROWS_AHEAD, start, width)
        source = timeseries[t, start : start + width]
        weight = seeds[0, t]
        if n_lesions == 1:  # one loop, nothing stored but the sums
            for j in range(width):
                d = _stored_value(source, j) - first[j]
                sums[j] += d
                squares[j] += d * d
                first_products[j] += weight * d
            continue
        for j in range(width):
            d = _stored_value(source, j) - first[j]
            row[j] = d
            sums[j] += d
            squares[j] += d * d
            first_products[j] += weight * d
        for lesion in range(1, n_lesions):
            weight = seeds[lesion, t]
            target = products[lesion]
            for j in range(width):
                target[j] += weight * row[j]
    for j in range(width):
        mean = sums[j] / np.float32(n_timepoints)
        squares[j] -= sums[j] * mean
        sums[j] = mean
    _inverse_norms(squares, inverse_norms)
    for lesion in range(n_lesions):
        seed_sum = np.float32(0.0)
        for t in range(n_timepoints):
            seed_sum += seeds[lesion, t]
        target = products[lesion]
        for j in range(width):
            target[j] -= sums[j] * seed_sum


@_compile
def correlate_block(timeseries, start, seeds, products, inverse_norms):
    """Products of a few seeds with the centred voxel columns ``start : start + width``
    and the columns' inverse norms, in one pass over the stored values (no centred
    copy, no matrix product): the way for small numbers of seeds, where the pass over
    memory is the whole cost.

    Parameters
    ----------
    timeseries : ndarray (T, V), float32, or uint16 holding float16 bits
        One subject's stored timeseries.
    start : int
        First voxel of the block.
    seeds : ndarray (L, T) float32
        Centred, unit-norm seeds.
    products : ndarray (L, width) float32
        Receives ``seeds @ centred`` (Pearson r once scaled by ``inverse_norms``).
    inverse_norms : ndarray (width,) float32
        Receives 1 / norm of each centred voxel column, 0 where the voxel is invalid.

    Notes
    -----
    With d = x - x[0] (so that a constant column gives exactly zero), the products
    ``sum_t seed_t d_t`` are corrected by ``mean(d) * sum_t seed_t``, which makes them
    the products with the centred column.
    """
    n_lesions, width = products.shape
    for offset in range(0, width, _DIRECT_COLUMNS):
        stop = min(offset + _DIRECT_COLUMNS, width)
        part = np.empty((n_lesions, stop - offset), dtype=np.float32)  # contiguous: vectorised
        _correlate_columns(timeseries, start + offset, seeds, part, inverse_norms[offset:stop])
        products[:, offset:stop] = part


#: Columns that the one-pass kernel takes at a time.
_DIRECT_COLUMNS = 1024


@_compile
def scale_and_clip(products, inverse_norms, limit):
    """Turn products of unit-norm seeds with centred voxels into Pearson r in place:
    multiply column j by ``inverse_norms[j]`` and clip to ``[-limit, limit]``."""
    n_rows, width = products.shape
    for i in range(n_rows):
        row = products[i]
        for j in range(width):
            row[j] = min(max(row[j] * inverse_norms[j], -limit), limit)


@_compile
def accumulate(z, valid_voxels, valid_seeds, set_shift, shift, sum_dz, sum_dz2):
    """Add one subject's ``z - shift`` and its square to a block's partial sums.

    Parameters
    ----------
    z : ndarray (L, width) float32
        Fisher z of the subject for the block.
    valid_voxels : ndarray (width,) float32
        Non-zero where the voxel was valid in this subject (its inverse norm).
    valid_seeds : ndarray (L,) bool
        Seeds that were valid in this subject.
    set_shift : bool
        First subject: set ``shift`` to its z (0 for invalid pairs) first.
    shift : ndarray (L, width) float32
        Per-pair shift of the block.
    sum_dz, sum_dz2 : ndarray (L, width) float32
        The block's partial sums; invalid pairs add nothing.
    """
    n_lesions, width = z.shape
    for lesion in range(n_lesions):
        if not valid_seeds[lesion]:
            continue
        values = z[lesion]
        shifts = shift[lesion]
        sums = sum_dz[lesion]
        squares = sum_dz2[lesion]
        if set_shift:
            for j in range(width):
                shifts[j] = values[j] if valid_voxels[j] != 0 else np.float32(0.0)
        for j in range(width):
            d = values[j] - shifts[j] if valid_voxels[j] != 0 else np.float32(0.0)
            sums[j] += d
            squares[j] += d * d


@_compile
def fold(partial, total, start):
    """Add the float32 ``partial`` (L, width) into columns ``start :`` of the float64
    ``total`` (L, V)."""
    n_rows, width = partial.shape
    for i in range(n_rows):
        source = partial[i]
        target = total[i, start : start + width]
        for j in range(width):
            target[j] += source[j]


@_compile
def t_statistics(shift, sum_dz, sum_dz2, n, mean, t, defined):
    """Mean z and one-sample t of one lesion from its shifted sums.

    Parameters
    ----------
    shift : ndarray (V,) float32
    sum_dz, sum_dz2 : ndarray (V,) float64
        Sums of (z - shift) and (z - shift)^2.
    n : ndarray (V,) float64
        Subjects contributing to each voxel.
    mean, t : ndarray (V,) float64
        Receive mean z and t (0 where t is undefined).
    defined : ndarray (V,) bool
        Receives where t is defined: more than one subject and a standard error that is
        not negligible next to the mean.
    """
    for j in range(shift.size):
        count = n[j]
        mean_dz = sum_dz[j] / count if count > 0 else 0.0
        mean[j] = shift[j] + mean_dz
        variance = (sum_dz2[j] - count * mean_dz * mean_dz) / (count - 1) if count > 1 else 0.0
        standard_error = math.sqrt(max(variance, 0.0) / max(count, 1.0))
        defined[j] = count > 1 and standard_error > 1e-12 * max(abs(mean[j]), 1.0)
        t[j] = mean[j] / standard_error if defined[j] else 0.0


@_compile
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


@_compile
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


@_compile
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


def prepare(stored_dtypes) -> None:
    """Compile every kernel (or load it from numba's cache) for the argument types the
    engine passes with connectomes stored as ``stored_dtypes`` (float16 and/or float32),
    so that a pass does not stall on it midway. Loading takes a few hundredths of a
    second per process; compiling, a few seconds the first time."""
    for dtype in {np.dtype(np.uint16) if np.dtype(d) == np.float16 else np.dtype(d) for d in stored_dtypes}:
        timeseries = np.zeros((4, 16), dtype=dtype)
        timeseries.flags.writeable = False  # subjects are handed over read-only
        columns = np.arange(2, dtype=np.int64)
        weighted_sums(timeseries, columns, columns, np.ones(2), np.empty((4, 2)))
        gather_columns(timeseries, columns, np.empty((4, 2), dtype=np.float32))
        seeds = np.ones((2, 4), dtype=np.float32)
        centre_block(timeseries, 0, np.empty((4, 8), dtype=np.float32), np.empty(8, dtype=np.float32))
        correlate_block(timeseries, 0, seeds, np.empty((2, 8), dtype=np.float32), np.empty(8, dtype=np.float32))
    products = np.zeros((2, 8), dtype=np.float32)
    valid = np.ones(8, dtype=np.float32)
    scale_and_clip(products, valid, np.float32(0.5))
    accumulate(products, valid, np.ones(2, dtype=bool), True, products.copy(), products.copy(), products.copy())
    fold(products, np.zeros((2, 16)), 0)
    vector = np.ones(4)
    t_statistics(np.zeros(4, dtype=np.float32), vector, vector, vector, np.empty(4), np.empty(4), np.empty(4, dtype=bool))
    cubic_hermite(vector, 0.5, vector, vector, np.empty(4))
    keys = np.empty(4, dtype=np.uint64)
    step_up_adjust(vector, keys, rank_keys(vector, keys), np.empty(4))
