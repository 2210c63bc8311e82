"""Compiled kernels of the group-level permutation GLM and of TFCE.

Three kernels, called from the engine's threads (they release the GIL):

* :func:`residualise_block` takes a block of voxels of the maps (``N x V``, a row per
  mask, or ``V x N``) through the covariates' residual projection in float64, and
  writes each voxel's residuals, scaled to unit norm, as one float32 row of the
  voxel-major ``V x N`` array the permutations read, with the observed t;
* :func:`block_null_stats` turns one block of the permutation product (for each voxel
  and permutation: the dot product of the voxel's normalised residuals with the
  permuted tested variable, and with each permuted covariate) into the squared t of
  each permutation, keeps the largest per permutation, and optionally writes the t
  values (for TFCE);
* :func:`tfce_two_sided` computes threshold-free cluster enhancement of one map, with a
  union-find over the voxels taken from the highest threshold down. Each
  cluster's running sum of ``extent**E * h**H`` is settled only when the cluster
  changes (a voxel joins, two clusters merge), and kept in the union-find tree as
  offsets from the parent, so the whole map costs one pass over its voxels and their
  face neighbours instead of one connected-component labelling per threshold.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from lacuna.analysis.compiled_primitives import prefetch
from lacuna.core.compiled import compile_kernel, kernel_cache_dir


#: Voxels transposed at a time by :func:`residualise_block`.
_TILE = 32


def _vectorised_kernel(function):
    """:func:`compile_kernel` that may also reorder sums (so that reductions vectorise;
    NaN and infinity keep their meaning)."""
    options = dict(nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
    if kernel_cache_dir() is not None:
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no usable cache location after all
            pass
    return numba.njit(**options)(function)


@_vectorised_kernel
def residualise_block(maps, voxel_major, rows, start, stop, basis_t, tested, dof, constant_tolerance, rss_floor, residuals, t):
    """Residuals (unit norm, float32, voxel-major) and observed t of voxels
    ``start .. stop``.

    Parameters
    ----------
    maps : ndarray float32, C order
        ``(N_all, V)`` (a row per map), or ``(V, N_all)`` (a row per voxel) when
        ``voxel_major``.
    rows : ndarray (N,) int64
        The maps used (indices into ``N_all``).
    basis_t : ndarray (q, N) float64
        Orthonormal basis of the covariates (intercept included), one row per vector.
    tested : ndarray (N,) float64
        The tested variable's residuals, unit norm.
    residuals : ndarray (V, N) float32
        Rows ``start .. stop`` written; zero for constant voxels (residual norm at most
        ``constant_tolerance`` times the voxel's norm) and for voxels with a
        non-finite value.
    t : ndarray (V,) float64
        Entries ``start .. stop`` written: 0 for constant voxels, NaN for non-finite.
    """
    n = rows.size
    tile = np.empty((_TILE, n), dtype=np.float64)
    for first in range(start, stop, _TILE):
        width = min(_TILE, stop - first)
        if voxel_major:
            for j in range(width):
                row = maps[first + j]
                for i in range(n):
                    tile[j, i] = row[rows[i]]
        else:  # a tile at a time, so that the transposition stays in cache
            for i in range(n):
                row = maps[rows[i]]
                for j in range(width):
                    tile[j, i] = row[first + j]
        for j in range(width):
            t[first + j] = _residualise_voxel(
                tile[j], basis_t, tested, dof, constant_tolerance, rss_floor, residuals[first + j]
            )


@numba.njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
def _residualise_voxel(y, basis_t, tested, dof, constant_tolerance, rss_floor, out):
    """Residualise ``y`` in place, write it scaled to unit norm into ``out``; its t."""
    n = y.size
    total = 0.0
    for i in range(n):
        total += y[i] * y[i]
    if not np.isfinite(total):
        out[:] = 0.0
        return np.nan
    for c in range(basis_t.shape[0]):
        vector = basis_t[c]
        coefficient = 0.0
        for i in range(n):
            coefficient += vector[i] * y[i]
        for i in range(n):
            y[i] -= coefficient * vector[i]
    ss = 0.0
    b = 0.0
    for i in range(n):
        ss += y[i] * y[i]
        b += tested[i] * y[i]
    if ss == 0.0 or ss <= constant_tolerance * constant_tolerance * total:
        out[:] = 0.0
        return 0.0
    scale = 1.0 / math.sqrt(ss)
    for i in range(n):
        out[i] = y[i] * scale
    return b * math.sqrt(dof / max(ss - b * b, rss_floor * ss))


@compile_kernel
def block_null_stats(products, n_perm, n_covariates, dof, rss_floor, max_t2, t_out, t_offset, write_t):
    """Largest squared t per permutation over one block of voxels.

    Parameters
    ----------
    products : ndarray (n_voxels, n_perm * (1 + n_covariates)) float32
        Per voxel: ``x_p . y`` for permutation p in columns ``[0, n_perm)``, then
        ``q_c,p . y`` for covariate c in columns ``[(c + 1) * n_perm, (c + 2) * n_perm)``;
        ``y`` the voxel's residuals scaled to unit norm, ``x`` the tested variable's
        residuals scaled to unit norm.
    max_t2 : ndarray (n_perm,) float64
        Updated in place with the largest ``t**2`` of each permutation.
    t_out : ndarray (n_perm, V) float32
        Written at columns ``t_offset + voxel`` when ``write_t``.
    """
    for v in range(products.shape[0]):
        row = products[v]
        for p in range(n_perm):
            b = np.float64(row[p])
            rss = 1.0 - b * b
            for c in range(n_covariates):
                a = np.float64(row[(c + 1) * n_perm + p])
                rss -= a * a
            rss = max(rss, rss_floor)
            ratio = b * b / rss
            if ratio > max_t2[p]:
                max_t2[p] = ratio
            if write_t:
                t_out[p, t_offset + v] = b * math.sqrt(dof / rss)


#: Voxels ahead whose data :func:`tfce_two_sided` prefetches.
_AHEAD = 16

#: Columns of the per-voxel node table of :func:`tfce_two_sided`.
_PARENT, _SIZE, _SINCE, _LEVEL = 0, 1, 2, 3


@numba.njit(inline="always", error_model="numpy")
def _find(node, nodes, offset):
    """Root of ``node``, pointing the whole path at it; each node's offset becomes the
    sum of the offsets from it up to, not including, the root."""
    parent = nodes[node, _PARENT]
    if parent == node or nodes[parent, _PARENT] == parent:
        return parent  # at most one step from the root: nothing to compress
    root = node
    total = 0.0
    while nodes[root, _PARENT] != root:
        total += offset[root]
        root = nodes[root, _PARENT]
    while node != root:
        parent = nodes[node, _PARENT]
        own = offset[node]
        offset[node] = total
        total -= own
        nodes[node, _PARENT] = root
        node = parent
    return root


@numba.njit(inline="always", error_model="numpy")
def _extent_weight(size, extent_power):
    return math.sqrt(size) if extent_power == 0.5 else size**extent_power


@numba.njit(inline="always", error_model="numpy")
def _settle(root, level, extent_power, nodes, offset, height_sums):
    """Add the cluster's contributions for levels ``level + 1 .. since``."""
    since = nodes[root, _SINCE]
    if since != level:
        offset[root] += _extent_weight(nodes[root, _SIZE], extent_power) * (height_sums[since] - height_sums[level])
        nodes[root, _SINCE] = level


@compile_kernel
def tfce_two_sided(values, thresholds, height_sums, extent_power, neighbours, nodes, offset, out, write):
    """Two-sided TFCE of a map: the positive part's TFCE minus that of the negative part.

    ``TFCE(v) = sum over thresholds h <= |values[v]| of e(h, v)**E * h**H`` with
    ``e(h, v)`` the voxel count of v's face-connected cluster of same-signed voxels
    with ``|value| >= h`` (no ``dh`` factor, as fslmaths and nilearn), signed as
    ``values[v]``. Clusters are grown from the highest threshold down with a union-find
    whose nodes hold offsets from their parent: a cluster's running sum is settled only
    when it changes, so the cost is one pass over the voxels and their neighbours.

    Parameters
    ----------
    values : ndarray (V,)
        The map (one finite value per voxel of the mask).
    thresholds : ndarray (J,) float64
        Increasing positive thresholds.
    height_sums : ndarray (J + 1,) float64
        ``height_sums[j] = sum(thresholds[:j] ** H)``.
    neighbours : ndarray (V, 6) int32
        Face neighbours of each voxel inside the mask, -1 where there is none.
    nodes : ndarray (V, 4) int32
        Scratch: parent, size, level of the last change, level of each voxel (negative
        for negative values).
    offset : ndarray (V,) float64
        Scratch.
    out : ndarray (V,) float64
        Receives the TFCE map when ``write``.

    Returns
    -------
    float
        The largest |TFCE| of the map.
    """
    n_voxels = values.size
    n_levels = thresholds.size
    counts = np.zeros(n_levels + 2, dtype=np.int64)
    top = thresholds[n_levels - 1]
    for v in range(n_voxels):
        x = abs(values[v])
        # number of thresholds <= x: a guess from the even spacing, then corrected
        j = 0
        if x >= thresholds[0]:
            j = min(n_levels, int(x / top * n_levels))
            while j < n_levels and thresholds[j] <= x:
                j += 1
            while j > 0 and thresholds[j - 1] > x:
                j -= 1
        nodes[v, _LEVEL] = j if values[v] > 0 else -j
        nodes[v, _PARENT] = -1
        counts[j] += 1
        if write:
            out[v] = 0.0
    # voxels by level, highest first (counting sort; by index within a level)
    starts = np.zeros(n_levels + 2, dtype=np.int64)
    for j in range(n_levels - 1, 0, -1):
        starts[j] = starts[j + 1] + counts[j + 1]
    n_active = starts[1] + counts[1]
    order = np.empty(n_active, dtype=np.int32)
    for v in range(n_voxels):
        j = abs(nodes[v, _LEVEL])
        if j > 0:
            order[starts[j]] = v
            starts[j] += 1
    flat_nodes = nodes.reshape(-1)
    flat_neighbours = neighbours.reshape(-1)
    width = neighbours.shape[1]
    for index in range(n_active):
        # the order is random in memory: fetch what the coming voxels will read
        if index + _AHEAD < n_active:
            ahead = order[index + _AHEAD]
            prefetch(flat_neighbours, ahead * width)
            prefetch(flat_nodes, ahead * 4)
            prefetch(offset, ahead)
        if index + _AHEAD // 2 < n_active:
            ahead = order[index + _AHEAD // 2]
            for k in range(width):
                u = neighbours[ahead, k]
                if u >= 0:
                    prefetch(flat_nodes, u * 4)
        v = order[index]
        j = abs(nodes[v, _LEVEL])
        positive = nodes[v, _LEVEL] > 0
        nodes[v, _PARENT] = v
        nodes[v, _SIZE] = 1
        nodes[v, _SINCE] = j
        offset[v] = 0.0
        root = v
        for k in range(neighbours.shape[1]):
            u = neighbours[v, k]
            if u < 0 or nodes[u, _PARENT] < 0 or (nodes[u, _LEVEL] > 0) != positive:
                continue
            other = _find(u, nodes, offset)
            if other == root:
                continue
            _settle(other, j, extent_power, nodes, offset, height_sums)
            _settle(root, j, extent_power, nodes, offset, height_sums)
            big, small = (root, other) if nodes[root, _SIZE] >= nodes[other, _SIZE] else (other, root)
            nodes[small, _PARENT] = big
            offset[small] -= offset[big]
            nodes[big, _SIZE] += nodes[small, _SIZE]
            root = big
    # the last passes in voxel order: sequential in memory
    for v in range(n_voxels):
        if nodes[v, _PARENT] == v:
            _settle(v, 0, extent_power, nodes, offset, height_sums)
    largest = 0.0
    for v in range(n_voxels):
        if nodes[v, _PARENT] < 0:
            continue
        root = _find(v, nodes, offset)
        value = offset[root] if root == v else offset[v] + offset[root]
        largest = max(largest, value)
        if write:
            out[v] = value if values[v] > 0 else -value
    return largest
