"""Masks on any grid of a supported space, the ICBM 2009 family and user transforms.

Each mask is a ball drawn on its own grid; the expected regional damage is computed in
plain numpy: the coverage of every atlas voxel is estimated by 8 x 8 x 8 sub-points
mapped into the mask's voxels by the inverse affine (nearest voxel), then the
half-coverage rule and a count per label. For grids whose voxel boundaries fall on
quarters of an atlas voxel (all lattice-aligned grids below) that estimate is exact.
"""

from __future__ import annotations

import itertools
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import save_mask
from lacuna import SubjectData
from lacuna.analysis import RegionalDamage
from lacuna.core.errors import ValidationError
from lacuna.core.spaces import Grid, standard_grid

SCHAEFER = "Schaefer2018_100Parcels7Networks"
SCHAEFER_FILE = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz"
CENTRE_MM = (-38.0, -22.0, 42.0)  # cortex, left hemisphere
RADIUS_MM = 11.0


def _affine(columns, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, float)
    affine[:3, 3] = origin
    return affine


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


# name: (shape, affine, lattice-aligned with the FSL 1 mm atlas grid at tenths of a voxel)
GRIDS = {
    "spm-1mm": ((181, 217, 181), _affine(np.diag([-1, 1, 1]), (90, -126, -72)), True),
    "spm12-bbox-2mm": ((79, 95, 79), _affine(np.diag([-2, 2, 2]), (78, -112, -70)), True),
    "fsl-cropped": ((80, 90, 70), _affine(np.diag([-1, 1, 1]), (10, -80, -20)), True),
    "fsl-lattice-ras": ((182, 218, 182), _affine(np.diag([1, 1, 1]), (-91, -126, -72)), True),
    "1p5mm": ((121, 145, 121), _affine(np.diag([1.5, 1.5, 1.5]), (-90, -126, -72)), True),
    "3mm": ((61, 73, 61), _affine(np.diag([-3, 3, 3]), (90, -126, -72)), True),
    "anisotropic": ((182, 218, 61), _affine(np.diag([-1, 1, 3]), (90, -126, -72)), True),
    "permuted-axes": ((218, 182, 182), _affine([[0, -1, 0], [1, 0, 0], [0, 0, 1]], (90, -126, -72)), True),
    "oblique": ((182, 218, 182), _affine(_rotation_z(7) @ np.diag([1, 1, 1]), (-80, -136, -72)), False),
}


def _ball(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(xyz - np.array(CENTRE_MM), axis=1) <= RADIUS_MM
    return inside.reshape(shape).astype(np.uint8)


def _numpy_coverage(mask: np.ndarray, source_affine: np.ndarray, target: Grid, k: int = 8):
    """Coverage of the target voxels in a box around the lesion: ``(box slices, fractions)``."""
    low = np.floor(np.array(CENTRE_MM) - RADIUS_MM - 6)
    high = np.ceil(np.array(CENTRE_MM) + RADIUS_MM + 6)
    corners = np.array(list(itertools.product(*zip(low, high))), float)
    to_target = np.linalg.inv(target.affine)
    indices = corners @ to_target[:3, :3].T + to_target[:3, 3]
    start = np.maximum(np.floor(indices.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(indices.max(axis=0)).astype(int) + 1, target.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = (np.arange(k) + 0.5) / k - 0.5
    target_to_source = np.linalg.inv(source_affine) @ target.affine
    total = np.zeros(len(ijk))
    for shift in itertools.product(offsets, repeat=3):
        points = (ijk + shift) @ target_to_source[:3, :3].T + target_to_source[:3, 3]
        nearest = np.floor(points + 0.5).astype(int)
        valid = np.all((nearest >= 0) & (nearest < np.array(mask.shape)), axis=1)
        hit = np.zeros(len(ijk), bool)
        hit[valid] = mask[tuple(nearest[valid].T)] > 0
        total += hit
    return box, (total / k**3).reshape(tuple(stop - start))


@pytest.fixture(scope="module")
def schaefer(shared_atlases):
    img = nib.load(shared_atlases / SCHAEFER_FILE)
    return np.asanyarray(img.dataobj).astype(int), Grid.of(img)


@pytest.mark.parametrize("name", list(GRIDS))
def test_regional_damage_on_any_grid_matches_numpy(tmp_path, shared_atlases, schaefer, name):
    shape, affine, aligned = GRIDS[name]
    labels, atlas_grid = schaefer
    mask = _ball(shape, affine)
    path = save_mask(tmp_path / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", mask, affine)
    subject = SubjectData.from_nifti(path)
    assert not subject.on_template_grid
    result = RegionalDamage([SCHAEFER], atlas_dir=shared_atlases).run(subject)

    box, coverage = _numpy_coverage(mask, affine, atlas_grid)
    lesion = coverage >= 0.5 - 1e-6
    expected = np.bincount(labels[box][lesion], minlength=101)[1:].astype(float)
    hits = result.results["RegionalDamage"][f"lesioned_voxels_{SCHAEFER}"].values
    assert expected.sum() > 1000  # the ball really hits cortex
    if aligned:
        np.testing.assert_array_equal(hits, expected)
    else:  # the documented estimate: within 1/k of a voxel per axis at the lesion's edge
        assert np.abs(hits - expected).sum() <= 0.02 * expected.sum()
    # Provenance records the volume before and after the move and the part outside.
    notes = " ".join(result.provenance[-1].notes)
    assert f"lesion volume {subject.get_volume_mm3():g} mm^3 on the mask grid" in notes
    if aligned:
        assert f"{int(lesion.sum())} mm^3 after the move" in notes
    assert "0.0% of the lesion outside" in notes


def test_fraction_of_the_lesion_outside_the_analysis_grid_is_reported(tmp_path, shared_atlases, caplog):
    # A 1 mm grid reaching 20 mm above the FSL box (z up to 127): a slab lesion at
    # z = 100..119 mm lies half above the atlas grid's top (z = 109 mm).
    shape, affine = (182, 218, 200), _affine(np.diag([-1, 1, 1]), (90, -126, -72))
    mask = np.zeros(shape, np.uint8)
    mask[60:80, 100:120, 172:192] = 1  # z = 100..119 mm
    path = save_mask(tmp_path / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", mask, affine)
    subject = SubjectData.from_nifti(path)
    with caplog.at_level(logging.WARNING, logger="lacuna"):
        result = RegionalDamage([SCHAEFER], atlas_dir=shared_atlases).run(subject)
    # Atlas voxels reach z = 109 (+0.5 mm): slices 100..109 inside, 110..119 outside.
    notes = " ".join(result.provenance[-1].notes)
    assert "50.0% of the lesion outside that grid's field of view" in notes
    assert "4000 mm^3 after the move" in notes
    assert "50.0% of the lesion outside" in caplog.text and str(path) in caplog.text


# ------------------------------------------------------------- ICBM 2009 family

ICBM_2009A_1MM = ((197, 233, 189), _affine(np.eye(3), (-98, -134, -72)))


@pytest.mark.parametrize(
    "space", ["MNI152NLin2009aSym", "MNI152NLin2009aAsym", "MNI152NLin2009bAsym", "MNI152NLin2009cSym"]
)
def test_icbm_2009_family_is_analysed_as_2009c_with_a_recorded_approximation(tmp_path, caplog, space):
    from lacuna.core import subject as subject_module

    subject_module._warned_frames.discard(space)
    shape, affine = ICBM_2009A_1MM
    path = save_mask(tmp_path / f"sub-01_space-{space}_label-lesion_mask.nii.gz", _ball(shape, affine), affine)
    with caplog.at_level(logging.WARNING, logger="lacuna"):
        first = SubjectData.from_nifti(path)
        SubjectData.from_nifti(path)
    assert first.space == "MNI152NLin2009cAsym" and first.declared_space == space
    warnings = [r for r in caplog.records if "treated as the coordinate system of MNI152NLin2009cAsym" in r.getMessage()]
    assert len(warnings) == 1  # once per run
    assert any(space in note and "identity" in note for note in first.provenance[0].notes)


def test_a_mask_on_the_icbm_2009a_grid_without_a_space_takes_that_space(tmp_path, caplog):
    shape, affine = ICBM_2009A_1MM
    path = save_mask(tmp_path / "lesion.nii.gz", _ball(shape, affine), affine)
    with caplog.at_level(logging.INFO, logger="lacuna"):
        subject = SubjectData.from_nifti(path)
    assert (subject.declared_space, subject.space, subject.resolution) == ("MNI152NLin2009aSym", "MNI152NLin2009cAsym", 1.0)
    assert "MNI152NLin2009aSym 1 mm template grid" in caplog.text


def test_icbm_2009a_mask_onto_a_2009c_grid_is_the_identity_move(tmp_path):
    # Same frame: the 2009a 1 mm lattice is the 2009c one shifted by whole voxels
    # (origins -98/-134/-72 vs -96/-132/-78), so the move is an exact re-indexing.
    from lacuna.analysis.base import mask_on_grid
    from lacuna.core.provenance import ProvenanceStep

    shape, affine = ICBM_2009A_1MM
    mask = _ball(shape, affine)
    path = save_mask(tmp_path / "sub-01_space-MNI152NLin2009aSym_label-lesion_mask.nii.gz", mask, affine)
    subject = SubjectData.from_nifti(path)
    target = standard_grid("MNI152NLin2009cAsym", 1)
    moved = mask_on_grid(subject, target, "MNI152NLin2009cAsym", ProvenanceStep(name="t", kind="analysis"))
    expected = np.zeros(target.shape, np.float32)
    # 2009c index = 2009a index + (-98 + 96, -134 + 132, -72 + 78) = + (-2, -2, 6)
    expected[:, :, 6:] = mask[2:195, 2:231, :187]
    np.testing.assert_array_equal(moved, expected)


# ------------------------------------------------------------------ user transforms


def _itk_translation(path, shift_mm):
    """An ITK affine file whose transform maps template points p to p + shift (RAS)."""
    import nitransforms as nt

    matrix = np.eye(4)
    matrix[:3, 3] = shift_mm
    nt.linear.Affine(matrix).to_filename(str(path), fmt="itk")
    return path


def _itk_composite_translation(path, shift_mm):
    """The same translation as an ANTs-style composite HDF5 file (LPS: x and y negated)."""
    from conftest import write_itk_transform

    affine_lps = np.eye(4)
    affine_lps[:3, 3] = (-shift_mm[0], -shift_mm[1], shift_mm[2])
    return write_itk_transform(path, affine_lps=affine_lps)


@pytest.mark.parametrize("ending", [".txt", ".mat", "_Composite.h5"])
def test_mask_transform_moves_a_native_mask_into_the_template(tmp_path, ending):
    # The "native" mask is the template-space ball seen 30 mm further right and 12 mm
    # further forward; the transform (template -> native, as antsApplyTransforms uses it)
    # brings it back exactly (whole-voxel shifts).
    grid = standard_grid("MNI152NLin6Asym", 1)
    template_ball = _ball(grid.shape, grid.affine)
    native = np.zeros(grid.shape, np.uint8)
    native[:-30, 12:, :] = template_ball[30:, :-12, :]  # FSL x axis points left: x + 30 mm is i - 30
    path = save_mask(tmp_path / "sub-01_space-native_label-lesion_mask.nii.gz", native, grid.affine)
    write = _itk_composite_translation if ending.endswith(".h5") else _itk_translation
    transform = write(tmp_path / f"template_to_native{ending}", (30.0, 12.0, 0.0))
    subject = SubjectData.from_nifti(path, space="MNI152NLin6Asym", transform=transform)
    assert (subject.space, subject.resolution, subject.on_template_grid) == ("MNI152NLin6Asym", 1.0, True)
    np.testing.assert_array_equal(subject.mask, template_ball.astype(bool))
    register = next(step for step in subject.provenance if step.name == "register")
    assert register.inputs[0].role == "mask_transform" and register.inputs[0].sha256


def test_mask_transform_needs_a_target_space_and_a_readable_file(tmp_path):
    grid = standard_grid("MNI152NLin6Asym", 2)
    path = save_mask(tmp_path / "sub-01_label-lesion_mask.nii.gz", _ball(grid.shape, grid.affine), grid.affine)
    transform = _itk_translation(tmp_path / "xfm.txt", (0, 0, 0))
    with pytest.raises(Exception, match="--mask-space"):
        SubjectData.from_nifti(path, transform=transform)
    broken = tmp_path / "broken.mat"
    broken.write_bytes(b"not a transform")
    with pytest.raises(ValidationError, match="broken.mat"):
        SubjectData.from_nifti(path, space="MNI152NLin6Asym", transform=broken)
    far = _itk_translation(tmp_path / "far.txt", (500.0, 0, 0))
    with pytest.raises(ValidationError, match="no voxel of the mask lands"):
        SubjectData.from_nifti(path, space="MNI152NLin6Asym", transform=far)


def test_mask_transform_through_the_cli(tmp_path, shared_atlases):
    from conftest import write_bids_dataset
    from test_bids_app import counts, lacuna

    grid = standard_grid("MNI152NLin6Asym", 1)
    template_ball = _ball(grid.shape, grid.affine)
    native = np.zeros(grid.shape, np.uint8)
    native[:-30, :, :] = template_ball[30:, :, :]  # seen 30 mm further right
    bids = write_bids_dataset(tmp_path / "bids", {"sub-01/anat/sub-01_space-native_label-lesion_mask.nii.gz": (native, grid.affine)})
    transform = _itk_translation(tmp_path / "template_to_native.txt", (30.0, 0.0, 0.0))
    out = tmp_path / "out"
    base = [bids, out, "participant", "--atlas-dir", shared_atlases, "--atlas", SCHAEFER]
    result = lacuna(*base, "--mask-transform", transform, "--mask-space", "MNI152NLin6Asym")
    assert result.exit_code == 0, result.output
    assert counts(result) == (1, 1, 0, 0)
    anat = out / "sub-01" / "anat"
    written = nib.load(anat / "sub-01_space-MNI152NLin6Asym_res-1_label-lesion_mask.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), template_ball)
    table = next(anat.glob("*_parcelstats.tsv"))
    labels = np.asanyarray(nib.load(shared_atlases / SCHAEFER_FILE).dataobj).astype(int)
    hits = np.bincount(labels[template_ball > 0], minlength=101)[1:]
    np.testing.assert_array_equal(pd.read_csv(table, sep="\t")["lesioned_voxels"].to_numpy(), hits)
    # Without --mask-space the transform has no target: a usage error, nothing run.
    missing = lacuna(*base, "--mask-transform", transform)
    assert missing.exit_code == 64 and "--mask-space" in missing.output
