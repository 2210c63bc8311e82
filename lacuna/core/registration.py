"""Masks registered by a user transform: ``--mask-transform FILE --mask-space SPACE``.

A mask drawn in another space (native, MNI305, a study template) is brought into a
supported space with the user's own registration, an ITK/ANTs transform as nitransforms
reads it: ``.mat`` or ``.txt`` (affine), ``.h5`` (composite, e.g. ANTs
``*Composite.h5``), ``.nii``/``.nii.gz`` (displacement field, e.g. ANTs ``*1Warp``).
As with ``antsApplyTransforms -r <template>``, the transform maps points of the target
space to points of the mask's space (ITK convention, LPS millimetres).

Rule: the mask is interpolated trilinearly at the target voxel centres and a voxel is
lesioned where the value is at least one half, on the TemplateFlow grid of the target
space at 1 mm (2 mm for masks whose voxels are larger than 1.5 mm). The transform file
and its checksum are recorded in provenance.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.errors import ValidationError
from lacuna.core.grid import Grid
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.spaces import HALF_COVERAGE, canonical_space, standard_grid

log = logging.getLogger(__name__)

#: File endings of the transforms accepted, by the nitransforms loader that reads them.
TRANSFORM_ENDINGS = {".mat": "linear", ".txt": "linear", ".h5": "composite", ".nii": "field", ".nii.gz": "field"}


def transform_kind(path: Path) -> str:
    """``linear``, ``composite`` or ``field`` by the file's ending; ValidationError else."""
    name = Path(path).name.lower()
    for ending, kind in sorted(TRANSFORM_ENDINGS.items(), key=lambda item: -len(item[0])):
        if name.endswith(ending):
            return kind
    raise ValidationError(
        f"{path}: not a transform file Lacuna reads; give an ITK/ANTs transform "
        f"({', '.join(TRANSFORM_ENDINGS)})"
    )


def load_user_transform(path: str | Path):
    """The ITK/ANTs transform in ``path`` as a nitransforms object.

    Raises
    ------
    ValidationError
        If the file is missing, of an unknown kind, or unreadable.
    """
    import nitransforms as nt

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"mask transform not found: {path}")
    kind = transform_kind(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Reference space not set")
            if kind == "linear":
                return nt.linear.load(str(path), fmt="itk")
            if kind == "composite":
                return nt.manip.load(str(path), fmt="itk")
            return nt.nonlinear.load(str(path), fmt="itk")
    except Exception as exc:  # nitransforms raises many types for unreadable files
        raise ValidationError(
            f"{path}: cannot be read as an ITK/ANTs transform ({type(exc).__name__}: {exc}); "
            "write it with ANTs or nitransforms in ITK format"
        ) from exc


def resample_through(transform, img: nib.Nifti1Image, grid: Grid) -> np.ndarray:
    """Trilinear values of ``img`` at the voxel centres of ``grid`` through a nitransforms
    ``transform`` (target points to the image's points; 0 outside the image), float32."""
    from nitransforms.resampling import apply

    moving = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), Grid.of(img).affine)
    reference = nib.Nifti1Image(np.zeros(grid.shape, dtype=np.uint8), grid.affine)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Reference space not set")
        moved = apply(transform, moving, reference=reference, order=1, mode="constant", cval=0.0)
    return np.asanyarray(moved.dataobj, dtype=np.float32)


def registered_mask(
    img: nib.Nifti1Image, transform_path: str | Path, space: str, resolution: float | None = None
) -> tuple[nib.Nifti1Image, ProvenanceStep]:
    """Move a binary mask into ``space`` with a user transform (module docs).

    Parameters
    ----------
    img : nibabel image
        The binary mask, on its own grid in its own space.
    transform_path : str or Path
        ITK/ANTs transform from ``space`` to the mask's space (as for antsApplyTransforms).
    space : str
        Supported space the transform maps into.
    resolution : float, optional
        1 or 2 mm; default 1 mm, or 2 mm when the mask's voxels are larger than 1.5 mm.

    Returns
    -------
    (image, step)
        The binary uint8 mask on the template grid, and the provenance step of the move.

    Raises
    ------
    ValidationError
        If the transform cannot be read, or no lesion voxel lands on the template grid.
    """
    transform_path = Path(transform_path)
    space = canonical_space(space)
    source = Grid.of(img)
    if resolution is None:
        resolution = 1 if float(source.voxel_sizes.max()) <= 1.5 else 2
    target = standard_grid(space, resolution)
    values = resample_through(load_user_transform(transform_path), img, target)
    mask = (values >= HALF_COVERAGE).astype(np.uint8)
    before = float(np.count_nonzero(np.asanyarray(img.dataobj))) * source.voxel_volume_mm3
    after = float(np.count_nonzero(mask)) * target.voxel_volume_mm3
    if not mask.any():
        raise ValidationError(
            f"{transform_path}: after this transform no voxel of the mask lands on the {space} "
            f"{resolution} mm grid (the mask's grid: {source.describe()}); check that the transform "
            f"maps {space} to the mask's space (the direction antsApplyTransforms uses with the "
            "template as reference)"
        )
    note = (
        f"registered into {space} with {transform_path.name} (trilinear at the {resolution} mm "
        f"template voxel centres, then >= 0.5): lesion volume {before:g} mm^3 on {source.describe()}, "
        f"{after:g} mm^3 after"
    )
    log.info("%s", note)
    step = ProvenanceStep(
        name="register",
        kind="input",
        parameters={"space": space, "resolution": float(resolution), "transform": transform_path.name},
        inputs=[InputFile.from_path("mask_transform", transform_path)],
        notes=[note],
    )
    out = nib.Nifti1Image(mask, target.affine)
    out.header.set_xyzt_units("mm")
    return out, step.finish()
