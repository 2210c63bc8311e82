"""Coordinate spaces, their standard voxel grids, and resampling onto a grid.

Lesion masks live in one of the supported template spaces (or the ICBM 2009 family,
analysed in MNI152NLin2009cAsym's coordinates). A space is a coordinate
system in millimetres; a *grid* is a voxel lattice (shape + affine) in it. Two images are
only combined voxel by voxel when their grids agree (shape and affine within
:data:`AFFINE_TOLERANCE_MM`); otherwise one is resampled by its affine, never matched by
shape alone.

Resampling rules
----------------
* Binary masks (:func:`resample_mask`): a target voxel is lesioned when at least half of
  its volume lies in lesioned source voxels. Masks may be on any grid of their space.
  Between axis-aligned grids (any voxel size, field of view, axis order or direction:
  SPM and cropped grids, RAS-stored FSL lattices; :mod:`lacuna.core.interpolation`)
  the covered fraction is exact, a product of one-dimensional overlaps, and a move
  between lattices that coincide is lossless. Between other grids (oblique) it is
  estimated from sub-voxels of the lesion: each lesioned source voxel is split into
  ``s x s x s`` parts (``s = 4 * ceil(source voxel size / target voxel size)``) whose
  centres credit their volume to the target voxel holding them; the estimate is within
  about ``1/s`` of a source voxel per axis at the lesion's edge and conserves the
  volume. Only the lesion's bounding box is computed, so the cost follows the lesion's
  size, not the grid's. Each move records the lesion volume before and after and the
  fraction of the lesion outside the target's field of view (provenance and log).
* Continuous maps (:func:`resample_continuous`): trilinear interpolation
  (``nibabel.processing.resample_from_to``, ``order=1``), zero outside the source;
  between axis-aligned grids the same interpolation as three one-dimensional products.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from lacuna.core.errors import SpaceError
from lacuna.core.grid import AFFINE_TOLERANCE_MM, Grid  # noqa: F401 (Grid is documented here)
from lacuna.core.interpolation import axis_maps, separable_coverage, separable_trilinear, splatted_coverage_box
from lacuna.core.space_names import ACCEPTED_SPACES, EQUIVALENT_SPACES, SUPPORTED_SPACES  # noqa: F401 (documented here)

# (space, resolution mm) -> (shape, voxel axes, origin); TemplateFlow template descriptions.
_STANDARD_GRIDS = {
    ("MNI152NLin6Asym", 1): ((182, 218, 182), (-1, 1, 1), (90, -126, -72)),
    ("MNI152NLin6Asym", 2): ((91, 109, 91), (-2, 2, 2), (90, -126, -72)),
    ("MNI152NLin2009cAsym", 1): ((193, 229, 193), (1, 1, 1), (-96, -132, -78)),
    ("MNI152NLin2009cAsym", 2): ((97, 115, 97), (2, 2, 2), (-96.5, -132.5, -78.5)),
}

# Other published template grids a mask may be on (space, resolution mm): the ICBM 2009a
# 1 mm grid (mni_icbm152_nlin_sym_09a, the grid of ATLAS v2.0 and of nilearn's template).
_OTHER_TEMPLATE_GRIDS = {
    ("MNI152NLin2009aSym", 1): ((197, 233, 189), (1, 1, 1), (-98, -134, -72)),
}


def frame_approximation(space: str) -> str | None:
    """The provenance note of a space analysed in another space's coordinate system
    (:data:`EQUIVALENT_SPACES`), or None when the space is supported as it is."""
    target = EQUIVALENT_SPACES.get(space)
    if target is None:
        return None
    return (
        f"{space} treated as the coordinate system of {target} (identity: both are ICBM 2009 "
        "nonlinear templates in the same MNI frame; differences of up to a few mm in the "
        "template shape are not corrected)"
    )


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


def _grid_from(shape, axes, origin) -> Grid:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axes)
    affine[:3, 3] = origin
    return Grid(shape, affine)


def standard_grid(space: str, resolution: float) -> Grid:
    """The TemplateFlow grid of ``space`` at ``resolution`` mm (1 or 2)."""
    key = (canonical_space(space), _as_int_resolution(resolution))
    if key not in _STANDARD_GRIDS:
        raise SpaceError(
            f"no standard {key[0]} grid at {resolution} mm; available resolutions: 1, 2"
        )
    return _grid_from(*_STANDARD_GRIDS[key])


def identify_standard_grid(space: str, grid: Grid) -> int | None:
    """Resolution (mm) of the standard grid of ``space`` that ``grid`` is, else None."""
    space = canonical_space(space)
    for (grid_space, resolution) in _STANDARD_GRIDS:
        if grid_space == space and standard_grid(space, resolution).matches(grid):
            return resolution
    return None


def space_of_standard_grid(grid: Grid) -> tuple[str, int] | None:
    """``(space, resolution)`` when ``grid`` is exactly a known template grid (shape and
    affine: the TemplateFlow grids of the supported spaces, the ICBM 2009a 1 mm grid) of
    one space only, else None. The space is the template's own name (possibly one of
    :data:`EQUIVALENT_SPACES`)."""
    grids = {**_STANDARD_GRIDS, **_OTHER_TEMPLATE_GRIDS}
    found = {key for key, description in grids.items() if _grid_from(*description).matches(grid)}
    return found.pop() if len({space for space, _ in found}) == 1 else None


def template_field_of_view(space: str) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` corners (mm) of the 1 mm template grid of ``space``: the box a
    lesion must overlap to be a brain lesion in that space."""
    grid = standard_grid(space, 1)
    corners = np.array([[0, 0, 0, 1], [*(np.array(grid.shape) - 1), 1]], float) @ grid.affine.T
    return corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)


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
    exact and separable between axis-aligned grids, estimated from sub-voxels of the
    lesion otherwise (:func:`lacuna.core.interpolation.splatted_coverage_box`)."""
    source = Grid(tuple(mask.shape), np.asarray(source_affine, float))
    maps = axis_maps(source, target)
    if maps is not None:
        return separable_coverage(mask, source, target, maps)
    fraction = np.zeros(target.shape, dtype=np.float32)
    box, values = splatted_coverage_box(mask, source, target)
    if box is not None:
        fraction[box] = values
    return fraction


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


def mask_within_space(img: nib.Nifti1Image, grid: Grid) -> tuple[nib.Nifti1Image, list[str]]:
    """Bring a binary 3-D mask onto ``grid`` of its own space: the covered fraction of
    each target voxel (half-coverage rule; moves across spaces:
    :func:`lacuna.resources.transforms.mask_to_space`).

    Returns
    -------
    (image, notes)
        The float32 image on ``grid``, and provenance notes describing the move (none
        when the grids already agree).
    """
    source = Grid.of(img)
    data = np.asanyarray(img.dataobj)
    if source.matches(grid):
        return float_image(data, grid), []
    return float_image(coverage_fraction(data.astype(bool), source.affine, grid), grid), [coverage_note(source, grid)]


def map_within_space(img: nib.Nifti1Image, grid: Grid) -> tuple[nib.Nifti1Image, list[str]]:
    """Bring a continuous 3-D map onto ``grid`` of its own space (trilinear); returns
    the float32 image and its provenance notes as :func:`mask_within_space`."""
    source = Grid.of(img)
    if source.matches(grid):
        return float_image(np.asanyarray(img.dataobj), grid), []
    resampled = np.asanyarray(resample_continuous(img, grid).dataobj, dtype=np.float32)
    return float_image(resampled, grid), [trilinear_note(source, grid)]


def coverage_note(source: Grid, target: Grid) -> str:
    """Provenance note of a mask moved by the half-coverage rule within a space."""
    return f"resampled from {source.describe()} to {target.describe()} (half-coverage rule)"


def trilinear_note(source: Grid, target: Grid) -> str:
    """Provenance note of a map resampled trilinearly within a space."""
    return f"resampled (trilinear) from {source.describe()} to {target.describe()}"


def float_image(data: np.ndarray, grid: Grid) -> nib.Nifti1Image:
    """``data`` as a float32 NIfTI image on ``grid`` (units mm)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), grid.affine)
    img.header.set_xyzt_units("mm")
    return img
