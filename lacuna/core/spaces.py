"""Coordinate spaces, their standard voxel grids, and resampling onto a grid.

Lesion masks live in one of the supported template spaces. A space is a coordinate
system in millimetres; a *grid* is a voxel lattice (shape + affine) in it. Two images are
only combined voxel by voxel when their grids agree (shape and affine within
:data:`AFFINE_TOLERANCE_MM`); otherwise one is resampled by its affine, never matched by
shape alone.

Resampling rules
----------------
* Binary masks (:func:`resample_mask`): a target voxel is lesioned when at least half of
  its volume lies in lesioned source voxels. The covered fraction is measured by
  sampling the mask (nearest source voxel, ``scipy.ndimage.affine_transform`` with
  ``order=0``) at ``k x k x k`` sub-points of the target voxel, at offsets
  ``(j + 1/2) / k - 1/2`` of a voxel, with ``k = 4 * ceil(target voxel size / source
  voxel size)``. The sub-points never fall on a source voxel boundary when the grids'
  boundaries are a multiple of a quarter voxel apart, and the result is then the exact
  partial-volume fraction: this holds for every pair of standard grids (1 <-> 2 mm, and
  the quarter-voxel offset between the 6Asym and 2009c 2 mm grids). Between
  axis-aligned grids (:mod:`lacuna.core.interpolation`) the exact fraction is computed
  directly, as a product of one-dimensional overlaps; other grids get the sampled
  estimate, within 1/k per axis. Only the lesion's bounding box is computed, so the
  cost follows the lesion's size, not the grid's.
* Continuous maps (:func:`resample_continuous`): trilinear interpolation
  (``nibabel.processing.resample_from_to``, ``order=1``), zero outside the source;
  between axis-aligned grids the same interpolation as three one-dimensional products.
"""

from __future__ import annotations

import itertools
import math
import warnings

import nibabel as nib
import numpy as np

from lacuna.core.errors import SpaceError
from lacuna.core.grid import AFFINE_TOLERANCE_MM, Grid  # noqa: F401 (Grid is documented here)
from lacuna.core.interpolation import axis_maps, separable_coverage, separable_trilinear

#: Spaces a lesion mask may be declared in.
SUPPORTED_SPACES = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")

#: Spaces that share the coordinate system of a supported space. MNI152NLin2009aAsym and
#: MNI152NLin2009cAsym are two releases of the same ICBM 2009 nonlinear asymmetric
#: template and are aligned to each other, so atlases published in 2009a (HCP1065) are
#: used on 2009c grids without a transform.
EQUIVALENT_SPACES = {"MNI152NLin2009aAsym": "MNI152NLin2009cAsym"}

# (space, resolution mm) -> (shape, voxel axes, origin); TemplateFlow template descriptions.
_STANDARD_GRIDS = {
    ("MNI152NLin6Asym", 1): ((182, 218, 182), (-1, 1, 1), (90, -126, -72)),
    ("MNI152NLin6Asym", 2): ((91, 109, 91), (-2, 2, 2), (90, -126, -72)),
    ("MNI152NLin2009cAsym", 1): ((193, 229, 193), (1, 1, 1), (-96, -132, -78)),
    ("MNI152NLin2009cAsym", 2): ((97, 115, 97), (2, 2, 2), (-96.5, -132.5, -78.5)),
}


def canonical_space(name: str) -> str:
    """Return the supported space a name refers to.

    Raises
    ------
    SpaceError
        If the space is unknown or unsupported; the message lists the options.
    """
    name = EQUIVALENT_SPACES.get(name, name)
    if name not in SUPPORTED_SPACES:
        raise SpaceError(
            f"unsupported coordinate space {name!r}; supported spaces are "
            f"{', '.join(SUPPORTED_SPACES)}"
        )
    return name


def standard_grid(space: str, resolution: float) -> Grid:
    """The TemplateFlow grid of ``space`` at ``resolution`` mm (1 or 2)."""
    key = (canonical_space(space), _as_int_resolution(resolution))
    if key not in _STANDARD_GRIDS:
        raise SpaceError(
            f"no standard {key[0]} grid at {resolution} mm; available resolutions: 1, 2"
        )
    shape, axes, origin = _STANDARD_GRIDS[key]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axes)
    affine[:3, 3] = origin
    return Grid(shape, affine)


def identify_standard_grid(space: str, grid: Grid) -> int | None:
    """Resolution (mm) of the standard grid of ``space`` that ``grid`` is, else None."""
    space = canonical_space(space)
    for (grid_space, resolution) in _STANDARD_GRIDS:
        if grid_space == space and standard_grid(space, resolution).matches(grid):
            return resolution
    return None


def space_of_standard_grid(grid: Grid) -> tuple[str, int] | None:
    """``(space, resolution)`` when ``grid`` is exactly a standard grid of one supported
    space only (shape and affine), else None."""
    found = {(space, res) for (space, res) in _STANDARD_GRIDS if standard_grid(space, res).matches(grid)}
    return found.pop() if len({space for space, _ in found}) == 1 else None


def standard_grids_text(space: str) -> str:
    """Describe the standard grids of a space, for error messages."""
    space = canonical_space(space)
    return "; ".join(
        f"{res} mm: {standard_grid(space, res).describe()}"
        for (grid_space, res) in _STANDARD_GRIDS
        if grid_space == space
    )


def _as_int_resolution(resolution: float) -> int:
    value = float(resolution)
    if not value.is_integer():
        raise SpaceError(f"resolution must be 1 or 2 mm, got {resolution}")
    return int(value)


def resample_mask(mask: np.ndarray, source_affine: np.ndarray, target: Grid) -> np.ndarray:
    """Resample a binary mask onto ``target`` by the half-coverage rule (module docs).

    Parameters
    ----------
    mask : ndarray of bool, 3-D
        Binary mask on the source grid.
    source_affine : ndarray (4, 4)
        Voxel-to-mm affine of the source grid.
    target : Grid
        Grid to resample onto.

    Returns
    -------
    ndarray of bool
        Mask on the target grid.
    """
    return coverage_fraction(mask, source_affine, target) >= HALF_COVERAGE


#: Threshold of the half-coverage rule, with room for floating-point rounding.
HALF_COVERAGE = 0.5 - 1e-6


def coverage_fraction(mask: np.ndarray, source_affine: np.ndarray, target: Grid) -> np.ndarray:
    """Fraction (0..1) of each target voxel covered by the mask (see module docs):
    exact and separable between axis-aligned grids, sampled otherwise."""
    source = Grid(tuple(mask.shape), np.asarray(source_affine, float))
    maps = axis_maps(source, target)
    if maps is not None:
        return separable_coverage(mask, source, target, maps)
    return sampled_coverage(mask, source.affine, target)


def sampled_coverage(mask: np.ndarray, source_affine: np.ndarray, target: Grid) -> np.ndarray:
    """Coverage fractions estimated at ``k x k x k`` sub-points per target voxel (module
    docs); the rule for grids that are not axis-aligned."""
    from scipy import ndimage  # imported when needed: it takes a quarter of a second

    source_affine = np.asarray(source_affine, float)
    fraction = np.zeros(target.shape, dtype=np.float32)
    box = _target_box(mask, source_affine, target)
    if box is None:
        return fraction
    low, high = box
    source_sizes = Grid(mask.shape, source_affine).voxel_sizes
    k = 4 * max(1, math.ceil(float(target.voxel_sizes.max() / source_sizes.min()) - 1e-6))
    # Target voxel indices (relative to the box corner) -> source voxel indices.
    box_affine = target.affine.copy()
    box_affine[:3, 3] = target.affine[:3, :3] @ low + target.affine[:3, 3]
    target_to_source = np.linalg.inv(source_affine) @ box_affine
    offsets = (np.arange(k) + 0.5) / k - 0.5
    source = mask.astype(np.uint8)
    total = np.zeros(tuple(high - low), dtype=np.float64)
    for shift in itertools.product(offsets, repeat=3):
        start = target_to_source @ np.array([*shift, 1.0])
        total += ndimage.affine_transform(
            source,
            target_to_source[:3, :3],
            offset=start[:3],
            output_shape=tuple(high - low),
            order=0,
            # grid-constant: points within half a voxel of the edge belong to the edge voxel.
            mode="grid-constant",
            cval=0,
        )
    fraction[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = total / k**3
    return fraction


def _target_box(mask: np.ndarray, source_affine: np.ndarray, target: Grid):
    """Index box [low, high) of the target grid that can see the mask, or None."""
    nonzero = np.argwhere(mask)
    if nonzero.size == 0:
        return None
    corners_low, corners_high = nonzero.min(axis=0) - 1, nonzero.max(axis=0) + 1
    corners = np.array(list(itertools.product(*zip(corners_low, corners_high))), dtype=float)
    source_to_target = np.linalg.inv(target.affine) @ source_affine
    projected = corners @ source_to_target[:3, :3].T + source_to_target[:3, 3]
    low = np.maximum(np.floor(projected.min(axis=0)).astype(int) - 1, 0)
    high = np.minimum(np.ceil(projected.max(axis=0)).astype(int) + 2, target.shape)
    if np.any(high <= low):
        return None
    return low, high


def resample_continuous(img: nib.Nifti1Image, target: Grid) -> nib.Nifti1Image:
    """Resample a continuous 3-D map onto ``target`` with trilinear interpolation (zero
    outside the source): three one-dimensional products between axis-aligned grids for a
    finite floating-point map, ``nibabel.processing.resample_from_to`` otherwise; the
    same values either way."""
    source = Grid.of(img)
    maps = axis_maps(source, target)
    data = np.asanyarray(img.dataobj)
    if maps is None or data.ndim != 3 or data.dtype.kind != "f" or not np.isfinite(data).all():
        from nibabel.processing import resample_from_to  # imports scipy.ndimage: only when needed

        return resample_from_to(img, (target.shape, target.affine), order=1, mode="constant", cval=0.0)
    out = nib.Nifti1Image(separable_trilinear(data, source, target, maps).astype(data.dtype), target.affine)
    out.header.set_xyzt_units("mm")
    return out


def to_space(
    img: nib.Nifti1Image,
    space: str,
    target_space: str,
    resolution: float | None = None,
    grid: Grid | None = None,
    kind: str = "mask",
) -> tuple[nib.Nifti1Image, list[str]]:
    """Bring an image to a (space, resolution) target — the one entry point for moves.

    Parameters
    ----------
    img : nibabel image
        3-D image in ``space``.
    space, target_space : str
        Spaces of the image and of the target.
    resolution : float, optional
        Target resolution (the standard grid of ``target_space``); or give ``grid``.
    grid : Grid, optional
        Explicit target grid (e.g. an atlas or connectome grid) in ``target_space``.
    kind : {"mask", "continuous"}
        ``mask``: a binary mask; the result holds the covered fraction of each target
        voxel (half-coverage rule within a space; across spaces, trilinear interpolation
        of the mask through the transform). ``continuous``: trilinear interpolation.

    Returns
    -------
    (image, notes)
        The float32 image on the target grid, and provenance notes describing the move.

    Notes
    -----
    Across MNI152NLin6Asym and MNI152NLin2009cAsym the TemplateFlow transform
    ``tpl-<target>_from-<source>_mode-image_xfm.h5`` is applied with nitransforms
    (:mod:`lacuna.assets.templates`).
    """
    if kind not in ("mask", "continuous"):
        raise ValueError(f"kind must be 'mask' or 'continuous', not {kind!r}")
    space, target_space = canonical_space(space), canonical_space(target_space)
    if grid is None:
        if resolution is None:
            raise ValueError("give a target resolution or grid")
        grid = standard_grid(target_space, resolution)
    source = Grid.of(img)
    data = np.asanyarray(img.dataobj)
    if space == target_space:
        if source.matches(grid):
            result = data.astype(np.float32)
            notes = []
        elif kind == "mask":
            result = coverage_fraction(data.astype(bool), source.affine, grid)
            notes = [coverage_note(source, grid)]
        else:
            result = np.asanyarray(resample_continuous(img, grid).dataobj, dtype=np.float32)
            notes = [trilinear_note(source, grid)]
        return _float_image(result, grid), notes
    from lacuna.assets.templates import load_transform, transform_path
    from nitransforms.resampling import apply

    path = transform_path(space, target_space)
    moving = nib.Nifti1Image(data.astype(np.float32), source.affine)
    reference = nib.Nifti1Image(np.zeros(grid.shape, dtype=np.uint8), grid.affine)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Reference space not set")
        moved = apply(load_transform(path), moving, reference=reference, order=1, mode="constant", cval=0.0)
    result = np.asanyarray(moved.dataobj, dtype=np.float32)
    if kind == "mask":
        result = np.clip(result, 0.0, 1.0)
    notes = [f"transformed from {space} to {target_space} ({grid.describe()}) with {path.name} (trilinear)"]
    return _float_image(result, grid), notes


def coverage_note(source: Grid, target: Grid) -> str:
    """Provenance note of a mask moved by the half-coverage rule within a space."""
    return f"resampled from {source.describe()} to {target.describe()} (half-coverage rule)"


def trilinear_note(source: Grid, target: Grid) -> str:
    """Provenance note of a map resampled trilinearly within a space."""
    return f"resampled (trilinear) from {source.describe()} to {target.describe()}"


def _float_image(data: np.ndarray, grid: Grid) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), grid.affine)
    img.header.set_xyzt_units("mm")
    return img
