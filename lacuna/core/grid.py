"""A voxel grid: array shape plus the voxel-to-millimetre affine."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np

#: Maximum difference (mm) between two affines that still counts as the same grid.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Grid:
    """A voxel lattice: array shape plus the voxel-to-mm affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def of(cls, img: nib.spatialimages.SpatialImage) -> "Grid":
        """The grid of an image (first three dimensions)."""
        return cls(tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=float))

    @property
    def voxel_sizes(self) -> np.ndarray:
        """Voxel edge lengths in mm."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def matches(self, other: "Grid") -> bool:
        """Whether both grids have the same shape and affine (within tolerance)."""
        if self.shape != other.shape:
            return False
        mine, theirs = np.asarray(self.affine, dtype=float), np.asarray(other.affine, dtype=float)
        if mine.shape == theirs.shape and mine.tobytes() == theirs.tobytes():
            return True  # the same affine (the usual case: a run's maps share one grid)
        return bool(np.allclose(mine, theirs, atol=AFFINE_TOLERANCE_MM))

    def describe(self) -> str:
        """Short human-readable description: shape, signed voxel axes (the affine's
        diagonal, or its columns when the grid is rotated or its axes are permuted) and
        origin, so that grids differing only in an axis direction read differently."""
        affine = np.asarray(self.affine, dtype=float)
        return _description(tuple(self.shape), affine.shape, affine.tobytes())


@functools.lru_cache(maxsize=64)
def _description(shape: tuple[int, ...], affine_shape: tuple[int, ...], affine_bytes: bytes) -> str:
    """:meth:`Grid.describe`, kept for the few grids a run describes thousands of times."""
    affine = np.frombuffer(affine_bytes, dtype=float).reshape(affine_shape)
    linear = affine[:3, :3]
    if np.allclose(linear, np.diag(np.diag(linear)), atol=AFFINE_TOLERANCE_MM):
        axes = "(" + ", ".join(f"{v:g}" for v in np.diag(linear)) + ") mm"
    else:
        axes = " ".join("(" + ", ".join(f"{v:.4g}" for v in column) + ")" for column in linear.T) + " mm"
    origin = ", ".join(f"{o:g}" for o in affine[:3, 3])
    return f"shape {shape}, voxel axes {axes}, origin ({origin})"
