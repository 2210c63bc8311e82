"""Parcel statistics of a voxel map as a precomputed sparse operator.

A parcel mean of a map resampled (trilinearly) onto a parcellation's grid is a fixed
linear function of the map. For one (source grid, parcellation) pair,
:class:`ParcelOperator` builds once

* ``interpolation``: the trilinear weights of each parcellation voxel that carries a
  region (eight source voxels per row, :func:`lacuna.core.interpolation.trilinear_taps`),
* ``membership``: regions x those voxels (1 for a label image, the region's
  probability for 4-D probability maps),

and from them the regions x source-voxels matrix ``membership @ interpolation`` (only
the source voxels it reads kept as columns), so a
map's parcel sums and means cost one small sparse product instead of a resampling of
the whole map onto the (usually finer) parcellation grid. ``max`` and ``percent`` are
not linear; they take the resampled values at the parcel voxels only (one sparse
product) and reduce them per region. The results equal "resample with
:func:`lacuna.core.spaces.resample_continuous`, then reduce per parcel", the definition
of :class:`~lacuna.analysis.ParcelAggregation`, for maps without non-finite values
(which that class sends down the resampling path instead).

Building the sum matrix takes about half a second for a 1 mm atlas; it is kept in the
data cache (:mod:`lacuna.core.derived_arrays`, keyed by the grids and the atlas' voxel
values), so later runs read it in a few milliseconds.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy import sparse

from lacuna.resources.parcellations import ParcellationImage
from lacuna.core.derived_arrays import cached_arrays, digest
from lacuna.core.grid import Grid
from lacuna.core.interpolation import trilinear_taps, voxel_to_voxel

#: Parcellation voxels turned into operator rows at a time (bounds the temporary memory).
_SLAB_VOXELS = 1 << 18
#: Version of the operator's arrays in the data cache (raise it when their meaning changes).
_FORMAT = 1


class ParcelOperator:
    """Parcel statistics of maps on ``source`` over the regions of ``image``.

    Parameters
    ----------
    source : Grid
        Grid of the maps (same coordinate space as the parcellation).
    image : ParcellationImage
        The parcellation (3-D labels or 4-D probability maps).
    """

    def __init__(self, source: Grid, image: ParcellationImage):
        self.source = source
        self.n_regions = image.n_regions
        self._image = image
        self._vox2vox = voxel_to_voxel(source, image.grid)
        self._target_shape = image.grid.shape
        self._parcel_voxels: tuple[np.ndarray, sparse.csr_matrix, str] | None = None
        self._interpolation: sparse.csr_matrix | None = None
        data = image.data if image.data_key is None else image.data_key  # the same data, not hashed again
        key = digest(_FORMAT, source.shape, source.affine, data, image.affine, image.scale, image.region_ids)
        arrays = cached_arrays("parcel-operators", key, self._sums_arrays)
        self.weights = arrays["weights"]
        # Only the source voxels some parcel voxel reads from matter: those columns.
        self._columns = arrays["columns"]
        self._columns_by_order = {"C": self._columns}
        self.sum_matrix = sparse.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
        scale = np.divide(1.0, self.weights, out=np.zeros_like(self.weights), where=self.weights > 0)
        self.mean_matrix = (sparse.diags(scale) @ self.sum_matrix).tocsr()

    def _sums_arrays(self) -> dict[str, np.ndarray]:
        """Region weights and the regions x used-source-voxels sum matrix (CSR parts):
        what the data cache keeps between runs."""
        sums = self._region_sums()
        columns = np.unique(sums.indices)
        compact = sums[:, columns].tocsr()
        weights = np.asarray(self.membership.sum(axis=1)).ravel()
        return {
            "weights": weights,
            "columns": columns,
            "data": compact.data,
            "indices": compact.indices,
            "indptr": compact.indptr,
            "shape": np.array(compact.shape),
        }

    @property
    def membership(self) -> sparse.csr_matrix:
        """Regions x parcel voxels weights (1, or the region's probability)."""
        return self._parcel_voxels_of_image()[1]

    def _parcel_voxels_of_image(self) -> tuple[np.ndarray, sparse.csr_matrix, str]:
        """:func:`_membership` of the parcellation (made on first use: a run whose maps
        are only averaged reads the operator from the data cache and never needs it)."""
        if self._parcel_voxels is None:
            self._parcel_voxels = _membership(self._image)
        return self._parcel_voxels

    def _rows(self, voxels: np.ndarray) -> sparse.csr_matrix:
        """Trilinear interpolation rows of the given flat parcellation voxels."""
        order = self._parcel_voxels_of_image()[2]
        ijk = np.stack(np.unravel_index(voxels, self._target_shape, order=order), axis=1).astype(np.float64)
        coordinates = ijk @ self._vox2vox[:3, :3].T + self._vox2vox[:3, 3]
        indices, weights = trilinear_taps(coordinates, self.source.shape)
        indptr = np.arange(0, indices.size + 1, 8)
        return sparse.csr_matrix((weights.ravel(), indices.ravel(), indptr), shape=(len(voxels), int(np.prod(self.source.shape))))

    def _region_sums(self) -> sparse.csr_matrix:
        total = sparse.csr_matrix((self.n_regions, int(np.prod(self.source.shape))))
        voxels, membership, _ = self._parcel_voxels_of_image()
        by_voxel = membership.tocsc()  # cheap column slabs
        for start in range(0, len(voxels), _SLAB_VOXELS):
            stop = min(start + _SLAB_VOXELS, len(voxels))
            total = total + by_voxel[:, start:stop] @ self._rows(voxels[start:stop])
        return total.tocsr()

    def _used_values(self, values: np.ndarray) -> np.ndarray:
        """The values of the source voxels the operator reads (float64), gathered in the
        array's own memory order (a Fortran-ordered map is not copied)."""
        order = _memory_order(values)
        if order not in self._columns_by_order:
            ijk = np.unravel_index(self._columns, self.source.shape)
            self._columns_by_order[order] = np.ravel_multi_index(ijk, self.source.shape, order=order)
        return values.reshape(-1, order=order)[self._columns_by_order[order]].astype(np.float64)

    @property
    def interpolation(self) -> sparse.csr_matrix:
        """Parcel voxels x source voxels trilinear weights (built on first use)."""
        if self._interpolation is None:
            self._interpolation = self._rows(self._parcel_voxels_of_image()[0])
        return self._interpolation

    def apply(self, values: np.ndarray, method: str, threshold: float = 0.0) -> np.ndarray:
        """One statistic per region of a map on the source grid (NaN for an empty region).

        Parameters
        ----------
        values : ndarray, 3-D
            Finite values on ``source``.
        method : {"mean", "sum", "max", "percent"}
            As in :class:`~lacuna.analysis.ParcelAggregation`.
        threshold : float
            For ``percent``: the share of the region above it.
        """
        empty = self.weights <= 0
        if method in ("mean", "sum"):
            matrix = self.mean_matrix if method == "mean" else self.sum_matrix
            out = matrix @ self._used_values(values)
        else:
            on_parcels = self.interpolation @ np.asarray(values, dtype=np.float64).reshape(-1)
            if method == "percent":
                out = 100.0 * (self.membership @ (on_parcels > threshold).astype(np.float64))
                out = np.divide(out, self.weights, out=np.zeros_like(out), where=~empty)
            else:
                out = _region_max(self.membership, on_parcels)
        out = np.asarray(out, dtype=np.float64)
        out[empty] = np.nan
        return out


def _membership(image: ParcellationImage) -> tuple[np.ndarray, sparse.csr_matrix, str]:
    """Flat indices of the voxels in any region, regions x those voxels weights, and the
    order (``"C"`` or ``"F"``) the flat indices follow (the data's own, so that nothing
    large is copied)."""
    order = _memory_order(image.data)
    if image.probabilistic:
        maps = image.data.reshape(-1, image.data.shape[3], order=order)
        per_region = [np.flatnonzero(maps[:, region]) for region in range(image.n_regions)]
        voxels = np.unique(np.concatenate(per_region))
        rows = np.repeat(np.arange(image.n_regions), [len(found) for found in per_region])
        columns = np.searchsorted(voxels, np.concatenate(per_region))
        weights = np.concatenate([maps[found, region] for region, found in enumerate(per_region)])
        weights = weights.astype(np.float64) * image.scale
        membership = sparse.csr_matrix((weights, (rows, columns)), shape=(image.n_regions, len(voxels)))
        return voxels, membership, order
    labels = image.data.reshape(-1, order=order)
    position = np.full(int(max(max(image.region_ids), labels.max())) + 1, -1, dtype=np.int64)
    position[np.asarray(image.region_ids)] = np.arange(image.n_regions)
    region = position[labels]
    voxels = np.flatnonzero(region >= 0)
    rows = region[voxels]
    membership = sparse.csr_matrix((np.ones(len(voxels)), (rows, np.arange(len(voxels)))), shape=(image.n_regions, len(voxels)))
    return voxels, membership, order


def _memory_order(array: np.ndarray) -> str:
    """``"F"`` for a Fortran-ordered array (as nibabel reads NIfTI data), else ``"C"``."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _region_max(membership: sparse.csr_matrix, values: np.ndarray) -> np.ndarray:
    """Largest value over each region's voxels (NaN for an empty region)."""
    out = np.full(membership.shape[0], np.nan)
    starts, ends = membership.indptr[:-1], membership.indptr[1:]
    filled = ends > starts
    if filled.any():
        out[filled] = np.maximum.reduceat(values[membership.indices], starts[filled])
    return out


_CACHE: dict[tuple, tuple[ParcellationImage, ParcelOperator]] = {}
_CACHE_SIZE = 8
# Held while an operator is built: a thread asking for it meanwhile waits for it.
_BUILDING = threading.Lock()


def parcel_operator(source: Grid, image: ParcellationImage) -> ParcelOperator:
    """The operator of a (source grid, parcellation) pair, built once per process (the
    few most recent pairs are kept; safe to call from several threads)."""
    key = (source.shape, source.affine.tobytes(), id(image))
    with _BUILDING:
        cached = _CACHE.get(key)
        if cached is None or cached[0] is not image:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            cached = _CACHE[key] = (image, ParcelOperator(source, image))
        return cached[1]
