"""Moving images between spaces: :func:`mask_to_space` for lesion masks and
:func:`map_to_space` for continuous maps, the two entry points for moves.

Within a space the rules of :mod:`lacuna.core.spaces` apply (half coverage for masks,
trilinear for maps); across MNI152NLin6Asym and MNI152NLin2009cAsym the TemplateFlow
transform of :mod:`lacuna.resources.templates` is applied with nitransforms
(:func:`transform_image`, trilinear).
"""

from __future__ import annotations


import nibabel as nib
import numpy as np

from lacuna.core.registration import resample_through
from lacuna.core.spaces import Grid, canonical_space, float_image, map_within_space, mask_within_space, standard_grid
from lacuna.resources.templates import load_transform, transform_path

def transform_image(img: nib.Nifti1Image, space: str, target_space: str, grid: Grid) -> tuple[nib.Nifti1Image, list[str]]:
    """Resample a 3-D image of ``space`` onto ``grid`` of another space through the
    TemplateFlow transform (trilinear).

    Returns
    -------
    (image, notes)
        The float32 image on ``grid``, and the provenance note of the move.
    """
    path = transform_path(space, target_space)
    result = resample_through(load_transform(path), img, grid)
    notes = [f"transformed from {space} to {target_space} ({grid.describe()}) with {path.name} (trilinear)"]
    return float_image(result, grid), notes


def mask_to_space(
    img: nib.Nifti1Image, space: str, target_space: str, resolution: float | None = None, grid: Grid | None = None
) -> tuple[nib.Nifti1Image, list[str]]:
    """Bring a binary mask to a (space, resolution) target.

    Parameters
    ----------
    img : nibabel image
        3-D binary mask in ``space``.
    space, target_space : str
        Spaces of the mask and of the target.
    resolution : float, optional
        Target resolution (the standard grid of ``target_space``); or give ``grid``.
    grid : Grid, optional
        Explicit target grid (e.g. an atlas or connectome grid) in ``target_space``.

    Returns
    -------
    (image, notes)
        The covered fraction of each target voxel (float32; half-coverage rule within a
        space, trilinear interpolation of the mask through the transform across spaces,
        clipped to [0, 1]), and provenance notes describing the move.
    """
    space, target_space, grid = _target(space, target_space, resolution, grid)
    if space == target_space:
        return mask_within_space(img, grid)
    moved, notes = transform_image(img, space, target_space, grid)
    return float_image(np.clip(np.asanyarray(moved.dataobj), 0.0, 1.0), grid), notes


def map_to_space(
    img: nib.Nifti1Image, space: str, target_space: str, resolution: float | None = None, grid: Grid | None = None
) -> tuple[nib.Nifti1Image, list[str]]:
    """Bring a continuous map to a (space, resolution) target, trilinear (within a
    space, or through the transform across spaces); parameters and return as
    :func:`mask_to_space`."""
    space, target_space, grid = _target(space, target_space, resolution, grid)
    if space == target_space:
        return map_within_space(img, grid)
    return transform_image(img, space, target_space, grid)


def _target(space: str, target_space: str, resolution: float | None, grid: Grid | None) -> tuple[str, str, Grid]:
    space, target_space = canonical_space(space), canonical_space(target_space)
    if grid is None:
        if resolution is None:
            raise ValueError("give a target resolution or grid")
        grid = standard_grid(target_space, resolution)
    return space, target_space, grid
