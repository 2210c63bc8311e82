"""Tests of SubjectData.from_nifti and of the standard grids / mask resampling.

Expected numbers are computed with plain numpy (or written down from the spec's table),
never with lacuna's own functions.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import save_mask, sphere
from lacuna.core.errors import SpaceError, ValidationError
from lacuna.core.spaces import Grid, resample_mask, standard_grid
from lacuna.core.subject import SubjectData

NLIN6 = "MNI152NLin6Asym"
NLIN2009C = "MNI152NLin2009cAsym"

# The table of the spec (TemplateFlow template_description.json), written out by hand.
SPEC_GRIDS = {
    (NLIN6, 1): ((182, 218, 182), (-1, 1, 1), (90, -126, -72)),
    (NLIN6, 2): ((91, 109, 91), (-2, 2, 2), (90, -126, -72)),
    (NLIN2009C, 1): ((193, 229, 193), (1, 1, 1), (-96, -132, -78)),
    (NLIN2009C, 2): ((97, 115, 97), (2, 2, 2), (-96.5, -132.5, -78.5)),
}


def spec_affine(space: str, res: int) -> np.ndarray:
    _, axes, origin = SPEC_GRIDS[(space, res)]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axes)
    affine[:3, 3] = origin
    return affine


def spec_shape(space: str, res: int) -> tuple[int, int, int]:
    return SPEC_GRIDS[(space, res)][0]


def box_mask(shape, lo=(40, 50, 40), size=(5, 6, 7), dtype=np.uint8) -> np.ndarray:
    data = np.zeros(shape, dtype=dtype)
    data[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    return data


def write(path: Path, data, affine, sidecar=None) -> Path:
    return save_mask(path, data, affine, sidecar)


def assert_names_path(exc_info, path: Path) -> None:
    message = str(exc_info.value)
    assert str(path) in message or str(path.resolve()) in message, message


NAME_6_2 = "sub-01_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz"


# ----------------------------------------------------------------- space / resolution


def test_space_argument_wins_over_entity(tmp_path, caplog):
    # File name says 2009c, but the data are on the 6Asym 2 mm grid; the argument wins.
    path = write(
        tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz",
        box_mask(spec_shape(NLIN6, 2)),
        spec_affine(NLIN6, 2),
    )
    subject = SubjectData.from_nifti(path, space=NLIN6)
    assert (subject.space, subject.resolution, subject.on_template_grid) == (NLIN6, 2.0, True)
    # As declared by the entity: a 2009c mask on a grid that is not 2009c's own, analysed
    # by its affine, with a warning that the grid is another space's template grid.
    with caplog.at_level(logging.WARNING, logger="lacuna"):
        subject = SubjectData.from_nifti(path)
    assert (subject.space, subject.on_template_grid) == (NLIN2009C, False)
    assert "MNI152NLin6Asym 2 mm template grid" in caplog.text


def test_space_entity_wins_over_sidecar(tmp_path):
    path = write(
        tmp_path / NAME_6_2,
        box_mask(spec_shape(NLIN6, 2)),
        spec_affine(NLIN6, 2),
        sidecar={"SpatialReference": NLIN2009C},
    )
    assert SubjectData.from_nifti(path).space == NLIN6


def test_space_from_sidecar(tmp_path):
    path = write(
        tmp_path / "sub-01_label-lesion_mask.nii.gz",
        box_mask(spec_shape(NLIN2009C, 2)),
        spec_affine(NLIN2009C, 2),
        sidecar={"SpatialReference": NLIN2009C},
    )
    subject = SubjectData.from_nifti(path)
    assert subject.space == NLIN2009C
    assert subject.resolution == 2.0


def test_resolution_from_header(tmp_path):
    path = write(
        tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz",
        box_mask(spec_shape(NLIN2009C, 1)),
        spec_affine(NLIN2009C, 1),
    )
    assert SubjectData.from_nifti(path).resolution == 1.0


def test_res_entity_disagreeing_with_header_header_wins_and_warns(tmp_path, caplog):
    path = write(
        tmp_path / "sub-01_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz",
        box_mask(spec_shape(NLIN6, 1)),
        spec_affine(NLIN6, 1),
    )
    with caplog.at_level(logging.WARNING):
        subject = SubjectData.from_nifti(path)
    assert subject.resolution == 1.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings, "a res- entity that disagrees with the header must be logged"
    assert any("header" in r.getMessage() for r in warnings)


def test_res_entity_agreeing_with_header_does_not_warn(tmp_path, caplog):
    path = write(tmp_path / NAME_6_2, box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    with caplog.at_level(logging.WARNING):
        SubjectData.from_nifti(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_metadata_from_entities(tmp_path):
    path = write(
        tmp_path / "sub-CAS001_ses-01_space-MNI152NLin6Asym_res-2_label-acuteinfarct_mask.nii.gz",
        box_mask(spec_shape(NLIN6, 2)),
        spec_affine(NLIN6, 2),
    )
    subject = SubjectData.from_nifti(path)
    assert subject.metadata["subject_id"] == "CAS001"
    assert subject.metadata["session_id"] == "01"
    assert subject.metadata["label"] == "acuteinfarct"
    assert subject.subject_id == "CAS001"
    assert subject.session_id == "01"
    assert subject.label == "acuteinfarct"


def test_metadata_argument_overrides_entities(tmp_path):
    path = write(tmp_path / NAME_6_2, box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    subject = SubjectData.from_nifti(path, metadata={"subject_id": "X9"})
    assert subject.subject_id == "X9"
    assert subject.label == "lesion"
    assert subject.session_id is None


def test_provenance_records_load_with_sha256(tmp_path):
    path = write(tmp_path / NAME_6_2, box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    subject = SubjectData.from_nifti(path)
    loads = [step for step in subject.provenance if step.name == "load"]
    assert len(loads) == 1
    inputs = loads[0].inputs
    assert len(inputs) == 1
    assert inputs[0].sha256 == expected
    assert Path(inputs[0].path).resolve() == path.resolve()
    assert loads[0].finished


def test_loaded_mask_content_and_affine(tmp_path):
    data = box_mask(spec_shape(NLIN6, 2))
    path = write(tmp_path / NAME_6_2, data, spec_affine(NLIN6, 2))
    subject = SubjectData.from_nifti(path)
    np.testing.assert_array_equal(subject.mask, data.astype(bool))
    np.testing.assert_allclose(subject.affine, spec_affine(NLIN6, 2))
    assert subject.n_voxels == int(data.sum())


def test_float_binary_mask_is_accepted(tmp_path):
    data = box_mask(spec_shape(NLIN6, 2), dtype=np.float32)
    path = write(tmp_path / NAME_6_2, data, spec_affine(NLIN6, 2))
    assert SubjectData.from_nifti(path).n_voxels == int(data.sum())


def test_4d_with_one_volume_is_accepted(tmp_path):
    data = box_mask(spec_shape(NLIN6, 2))[..., None]
    path = write(tmp_path / NAME_6_2, data, spec_affine(NLIN6, 2))
    subject = SubjectData.from_nifti(path)
    assert subject.mask.shape == spec_shape(NLIN6, 2)
    assert subject.n_voxels == int(data.sum())


# ------------------------------------------------------------------------ rejections


def _rejects(path: Path, **kwargs):
    with pytest.raises(ValidationError) as exc_info:
        SubjectData.from_nifti(path, **kwargs)
    assert_names_path(exc_info, path)
    return exc_info


def test_rejects_empty_mask(tmp_path):
    path = write(tmp_path / NAME_6_2, np.zeros(spec_shape(NLIN6, 2), np.uint8), spec_affine(NLIN6, 2))
    _rejects(path)


@pytest.mark.parametrize("bad_value", [2, 0.5, -1])
def test_rejects_non_binary_mask(tmp_path, bad_value):
    data = box_mask(spec_shape(NLIN6, 2), dtype=np.float32)
    data[0, 0, 0] = bad_value
    path = write(tmp_path / NAME_6_2, data, spec_affine(NLIN6, 2))
    _rejects(path)


def test_rejects_4d_with_two_volumes(tmp_path):
    vol = box_mask(spec_shape(NLIN6, 2))
    path = write(tmp_path / NAME_6_2, np.stack([vol, vol], axis=-1), spec_affine(NLIN6, 2))
    _rejects(path)


def test_rejects_nan(tmp_path):
    data = box_mask(spec_shape(NLIN6, 2), dtype=np.float32)
    data[1, 2, 3] = np.nan
    path = write(tmp_path / NAME_6_2, data, spec_affine(NLIN6, 2))
    _rejects(path)


def test_rejects_truncated_file(tmp_path):
    good = write(tmp_path / "good.nii.gz", box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    raw = gzip.decompress(good.read_bytes())
    path = tmp_path / NAME_6_2
    # A complete gzip stream of a NIfTI whose data are cut short.
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    _rejects(path)


def test_rejects_truncated_gzip_stream(tmp_path):
    good = write(tmp_path / "good.nii.gz", box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    path = tmp_path / NAME_6_2
    path.write_bytes(good.read_bytes()[:2000])
    _rejects(path)


def test_rejects_garbage_file(tmp_path):
    path = tmp_path / NAME_6_2
    path.write_bytes(b"this is not a NIfTI image at all" * 20)
    _rejects(path)


def _damage_on(subject: SubjectData, target: Grid) -> np.ndarray:
    from lacuna.analysis.base import mask_on_grid
    from lacuna.core.provenance import ProvenanceStep

    return mask_on_grid(subject, target, subject.space, ProvenanceStep(name="test", kind="analysis"))


def test_2009c_2mm_grid_declared_as_6asym_is_moved_by_its_affine(tmp_path, caplog):
    path = write(tmp_path / NAME_6_2, box_mask(spec_shape(NLIN2009C, 2)), spec_affine(NLIN2009C, 2))
    with caplog.at_level(logging.WARNING, logger="lacuna"):
        subject = SubjectData.from_nifti(path)
    assert subject.space == NLIN6 and not subject.on_template_grid
    assert "MNI152NLin2009cAsym 2 mm template grid" in caplog.text


def test_fsl_shape_with_ras_affine_is_moved_losslessly(tmp_path):
    # Pitfall 1: the FSL 1 mm shape with a RAS affine is not the FSL grid; moved by its
    # affine, it is the x-mirrored array on the FSL grid (the lattices coincide).
    affine = np.eye(4)
    affine[:3, 3] = (-91, -126, -72)
    data = box_mask(spec_shape(NLIN6, 1))
    path = write(tmp_path / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", data, affine)
    subject = SubjectData.from_nifti(path)
    assert not subject.on_template_grid
    target = Grid(spec_shape(NLIN6, 1), spec_affine(NLIN6, 1))
    # RAS voxel i sits at x = i - 91; FSL voxel j at x = 90 - j: j = 181 - i.
    np.testing.assert_array_equal(_damage_on(subject, target), data[::-1].astype(np.float32))


def test_2009c_grid_off_by_half_voxel_is_resampled(tmp_path):
    # Pitfall 13: the 2009c 2 mm grid with the 1 mm origin is not a standard grid; moved by
    # its affine onto the true grid (a quarter-voxel shift on each axis: source voxel i
    # covers 3/4 of target voxel i and 1/4 of voxel i + 1), volume is conserved.
    affine = spec_affine(NLIN2009C, 2)
    affine[:3, 3] = (-96, -132, -78)
    data = box_mask(spec_shape(NLIN2009C, 2))
    path = write(tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz", data, affine)
    subject = SubjectData.from_nifti(path)
    moved = _damage_on(subject, Grid(spec_shape(NLIN2009C, 2), spec_affine(NLIN2009C, 2)))
    weight = {0: 0.75, 1: 0.25}
    expected = np.zeros(moved.shape)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                expected[dx:, dy:, dz:] += (
                    weight[dx] * weight[dy] * weight[dz] * data[: moved.shape[0] - dx, : moved.shape[1] - dy, : moved.shape[2] - dz]
                )
    np.testing.assert_allclose(moved, expected, atol=1e-6)
    assert moved.sum() == pytest.approx(data.sum())


@pytest.mark.parametrize(
    "name", ["sub-01_space-Talairach_label-lesion_mask.nii.gz", "sub-01_label-lesion_mask.nii.gz"], ids=["unknown", "none"]
)
def test_rejects_unknown_or_missing_space_entity(tmp_path, name):
    # Without a declared space only a mask exactly on a template grid is accepted (its
    # space is then that grid's): one millimetre off, it is rejected.
    affine = spec_affine(NLIN6, 2)
    affine[0, 3] += 1.0
    path = write(tmp_path / name, box_mask(spec_shape(NLIN6, 2)), affine)
    exc_info = _rejects(path)
    assert isinstance(exc_info.value, SpaceError)


def test_rejects_unknown_space_argument(tmp_path):
    path = write(tmp_path / NAME_6_2, box_mask(spec_shape(NLIN6, 2)), spec_affine(NLIN6, 2))
    exc_info = _rejects(path, space="MNI305")
    assert isinstance(exc_info.value, SpaceError)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        SubjectData.from_nifti(tmp_path / NAME_6_2)


# ---------------------------------------------------------------------------- volume


@pytest.mark.parametrize(
    ("space", "res", "voxel_mm3"), [(NLIN6, 1, 1.0), (NLIN6, 2, 8.0), (NLIN2009C, 2, 8.0)]
)
def test_volume_is_count_times_voxel_volume(tmp_path, space, res, voxel_mm3):
    data = box_mask(spec_shape(space, res), size=(3, 4, 5))
    data[10, 10, 10] = 1
    count = int(np.count_nonzero(data))
    assert count == 61
    path = write(tmp_path / f"sub-01_space-{space}_label-lesion_mask.nii.gz", data, spec_affine(space, res))
    subject = SubjectData.from_nifti(path)
    assert subject.get_volume_mm3() == pytest.approx(count * voxel_mm3)


# -------------------------------------------------------------------- standard grids


@pytest.mark.parametrize("key", list(SPEC_GRIDS))
def test_standard_grids_match_spec_table(key):
    space, res = key
    grid = standard_grid(space, res)
    assert tuple(grid.shape) == spec_shape(space, res)
    np.testing.assert_allclose(grid.affine, spec_affine(space, res), atol=1e-9)


def test_2009c_2mm_origin_is_half_voxel_shifted():
    # Pitfall 13, spelled out.
    np.testing.assert_allclose(standard_grid(NLIN2009C, 2).affine[:3, 3], (-96.5, -132.5, -78.5))


# ------------------------------------------------------------------------ resampling


def _noisy_mask(shape, box_lo, box_size, seed=0, p=0.45) -> np.ndarray:
    """Random binary voxels in a box (coverage fractions of every value, 0.5 included)."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, dtype=bool)
    sl = tuple(slice(lo, lo + n) for lo, n in zip(box_lo, box_size))
    data[sl] = rng.random(box_size) < p
    return data


def _numpy_fraction_fsl_1_to_2(mask: np.ndarray) -> np.ndarray:
    """Covered fraction of each 6Asym 2 mm voxel: weights 0.25/0.5/0.25 per axis.

    2 mm voxel i is centred on 1 mm voxel 2i and covers 1 mm voxels 2i-1 (half),
    2i (full) and 2i+1 (half); 1 mm voxels -1 and 182 lie outside the image (zero).
    """
    frac = mask.astype(np.float64)
    for axis, n_out in enumerate((91, 109, 91)):
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        padded = np.pad(frac, pad)
        # padded index = original index + 1: originals 2i-1, 2i, 2i+1 -> 2i, 2i+1, 2i+2
        parts = [np.take(padded, 2 * np.arange(n_out) + offset, axis=axis) for offset in (0, 1, 2)]
        frac = 0.25 * parts[0] + 0.5 * parts[1] + 0.25 * parts[2]
    return frac


def _numpy_fraction_2009c_1_to_2(mask: np.ndarray) -> np.ndarray:
    """Covered fraction of each 2009c 2 mm voxel.

    Origins -96.5 (2 mm) and -96 (1 mm): 2 mm voxel i spans exactly 1 mm voxels 2i-1
    and 2i along each axis (voxel -1 lies outside the image), a 2x2x2 block mean.
    """
    padded = np.pad(mask.astype(np.float64), [(1, 0)] * 3)[:194, :230, :194]
    return padded.reshape(97, 2, 115, 2, 97, 2).mean(axis=(1, 3, 5))


FSL_1 = Grid((182, 218, 182), spec_affine(NLIN6, 1))
FSL_2 = Grid((91, 109, 91), spec_affine(NLIN6, 2))
C_1 = Grid((193, 229, 193), spec_affine(NLIN2009C, 1))
C_2 = Grid((97, 115, 97), spec_affine(NLIN2009C, 2))


def _fsl_interior_mask() -> np.ndarray:
    mask = _noisy_mask(FSL_1.shape, (61, 80, 70), (21, 24, 19))
    mask[101:112, 120:127, 100:109] = True  # a solid block with odd and even edges
    return mask


def test_resample_mask_fsl_1mm_to_2mm_matches_numpy_exactly():
    mask = _fsl_interior_mask()
    expected_fraction = _numpy_fraction_fsl_1_to_2(mask)
    assert np.any(expected_fraction == 0.5)  # the threshold's edge case occurs
    result = resample_mask(mask, FSL_1.affine, FSL_2)
    assert result.shape == FSL_2.shape
    mismatches = np.argwhere(result.astype(bool) != (expected_fraction >= 0.5))
    assert len(mismatches) == 0, f"{len(mismatches)} voxels differ, e.g. {mismatches[:3].tolist()}"


def test_resample_mask_fsl_1mm_to_2mm_at_the_image_border():
    # 1 mm voxels 0..2 of the first axes: 2 mm voxel 0 is centred on 1 mm voxel 0 and
    # covers half of voxel 1; the half over voxel -1 lies outside the image. So 2 mm
    # voxel (0, 0, k) is covered (0.5 + 0.25) * (0.5 + 0.25) * 1 = 0.5625 -> lesioned.
    mask = np.zeros(FSL_1.shape, dtype=bool)
    mask[0:3, 0:3, 60:80] = True
    expected_fraction = _numpy_fraction_fsl_1_to_2(mask)
    assert expected_fraction[0, 0, 35] == 0.5625
    result = resample_mask(mask, FSL_1.affine, FSL_2).astype(bool)
    mismatches = np.argwhere(result != (expected_fraction >= 0.5))
    assert len(mismatches) == 0, f"{len(mismatches)} voxels differ, e.g. {mismatches[:3].tolist()}"


def test_resample_mask_2009c_1mm_to_2mm_matches_block_mean():
    mask = _noisy_mask(C_1.shape, (71, 90, 80), (21, 24, 19), seed=1, p=0.5)
    mask[121:130, 140:147, 110:119] = True
    expected_fraction = _numpy_fraction_2009c_1_to_2(mask)
    assert np.any(expected_fraction == 0.5)
    result = resample_mask(mask, C_1.affine, C_2).astype(bool)
    mismatches = np.argwhere(result != (expected_fraction >= 0.5))
    assert len(mismatches) == 0, f"{len(mismatches)} voxels differ, e.g. {mismatches[:3].tolist()}"


@pytest.mark.parametrize("corner", ["low", "high"])
def test_resample_mask_2009c_1mm_to_2mm_at_the_image_border(corner):
    # A lesion filling the first (last) 1 mm voxels: 2 mm voxel 0 covers 1 mm voxels -1
    # (outside) and 0, 2 mm voxel 96 covers 1 mm voxels 191 and 192 (the last).
    mask = np.zeros(C_1.shape, dtype=bool)
    if corner == "low":
        mask[0:2, 0:1, 60:80] = True  # fraction of 2 mm voxel (0, 0, k): 1/2 * 1/2 * 1
        mask[0:1, 5:9, 60:80] = True  # (0, 3, k): 1/2 * 1 * 1
    else:
        mask[191:193, 227:229, 60:80] = True  # (96, 114, k) fully covered
    expected_fraction = _numpy_fraction_2009c_1_to_2(mask)
    result = resample_mask(mask, C_1.affine, C_2).astype(bool)
    mismatches = np.argwhere(result != (expected_fraction >= 0.5))
    assert len(mismatches) == 0, f"{len(mismatches)} voxels differ, e.g. {mismatches[:3].tolist()}"


def test_resample_mask_2mm_to_1mm_takes_containing_voxel():
    coarse = _noisy_mask(FSL_2.shape, (30, 40, 35), (14, 16, 12), seed=3, p=0.5)
    fine = resample_mask(coarse, FSL_2.affine, FSL_1).astype(bool)
    assert fine.shape == FSL_1.shape
    # 1 mm voxel j lies wholly inside 2 mm voxel j/2 when j is even (per axis).
    np.testing.assert_array_equal(fine[0::2, 0::2, 0::2], coarse)
    # A 1 mm voxel with an odd index straddles 2 mm voxels (j-1)/2 and (j+1)/2 along that
    # axis: where all the 2 mm voxels it touches agree, it takes their value.
    lo_idx = [np.arange(n) // 2 for n in FSL_1.shape]
    hi_idx = [(np.arange(n) + 1) // 2 for n in FSL_1.shape]
    cpad = np.pad(coarse, [(0, 1)] * 3)
    corners = [
        cpad[np.ix_(a, b, c)]
        for a in (lo_idx[0], hi_idx[0])
        for b in (lo_idx[1], hi_idx[1])
        for c in (lo_idx[2], hi_idx[2])
    ]
    all_on = np.logical_and.reduce(corners)
    all_off = ~np.logical_or.reduce(corners)
    assert all_on.sum() > 1000
    assert np.all(fine[all_on])
    assert not np.any(fine[all_off])


def _centre_of_mass_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).astype(float)
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)


@pytest.mark.parametrize("space", [NLIN6, NLIN2009C])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_resampling_preserves_sphere_centre_of_mass(space, direction):
    centre = (23.3, -17.6, 11.2)
    src_res, dst_res = (1, 2) if direction == "down" else (2, 1)
    src = Grid(spec_shape(space, src_res), spec_affine(space, src_res))
    dst = Grid(spec_shape(space, dst_res), spec_affine(space, dst_res))
    mask = sphere(src, centre, 9.0).astype(bool)
    before = _centre_of_mass_mm(mask, src.affine)
    after_mask = resample_mask(mask, src.affine, dst)
    after = _centre_of_mass_mm(after_mask, dst.affine)
    assert np.linalg.norm(before - np.asarray(centre)) < 0.5
    assert np.linalg.norm(after - before) < 1.0, (before, after)
    # Volume roughly preserved (sphere radius 9 mm: ~3054 mm^3).
    vol_before = mask.sum() * src_res**3
    vol_after = after_mask.sum() * dst_res**3
    assert abs(vol_after - vol_before) / vol_before < 0.2


def test_sidecar_json_is_read(tmp_path):
    # from_nifti documents the sidecar keys SpatialReference and Space.
    path = write(
        tmp_path / "sub-01_label-lesion_mask.nii.gz",
        box_mask(spec_shape(NLIN6, 2)),
        spec_affine(NLIN6, 2),
    )
    path.with_name("sub-01_label-lesion_mask.json").write_text(json.dumps({"Space": NLIN6}))
    assert SubjectData.from_nifti(path).space == NLIN6


def test_a_mask_without_a_declared_space_takes_the_space_of_its_template_grid(tmp_path, caplog):
    for space, resolution in (("MNI152NLin6Asym", 1), ("MNI152NLin6Asym", 2), ("MNI152NLin2009cAsym", 1), ("MNI152NLin2009cAsym", 2)):
        grid = standard_grid(space, resolution)
        data = np.zeros(grid.shape, np.uint8)
        data[tuple(n // 2 for n in grid.shape)] = 1
        path = tmp_path / f"lesion_{space}_{resolution}.nii.gz"
        save_mask(path, data, grid.affine)
        with caplog.at_level(logging.INFO, logger="lacuna"):
            subject = SubjectData.from_nifti(path)  # the seed's example, verbatim
        assert (subject.space, subject.resolution) == (space, resolution)
        assert f"{space} {resolution} mm template grid" in caplog.text
    # The FSL 1 mm lattice stored RAS (x axis reversed) is no template grid: without a
    # declared space an error, whose message shows the signed axes that tell the two apart.
    fsl = standard_grid("MNI152NLin6Asym", 1)
    flipped = fsl.affine.copy()
    flipped[0, 0], flipped[0, 3] = 1.0, -91.0
    path = tmp_path / "lesion_ras.nii.gz"
    save_mask(path, np.ones(fsl.shape, np.uint8), flipped)
    with pytest.raises(SpaceError, match=r"voxel axes \(1, 1, 1\) mm, origin \(-91, -126, -72\)"):
        SubjectData.from_nifti(path)
    assert not SubjectData.from_nifti(path, space="MNI152NLin6Asym").on_template_grid


@pytest.mark.parametrize("image_class", ["Nifti1Image", "Nifti2Image"])
def test_reads_nifti1_and_nifti2_masks(tmp_path, image_class):
    """NIfTI-1 masks are decompressed in one piece; other formats go through nibabel."""
    import nibabel as nib

    data = box_mask(spec_shape(NLIN6, 2))
    path = tmp_path / NAME_6_2
    nib.save(getattr(nib, image_class)(data, spec_affine(NLIN6, 2)), path)
    subject = SubjectData.from_nifti(path)
    np.testing.assert_array_equal(np.asanyarray(subject.mask_img.dataobj), data)
    np.testing.assert_allclose(subject.affine, spec_affine(NLIN6, 2))
