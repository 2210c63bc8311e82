"""Separable resampling between axis-aligned grids, against scipy and plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lacuna.core.grid import Grid
from lacuna.core.interpolation import axis_maps, nonzero_box, separable_coverage, separable_trilinear, trilinear_taps
from lacuna.core.spaces import coverage_fraction, standard_grid


def _grid(shape, sizes, origin, order=(0, 1, 2)) -> Grid:
    """A grid whose voxel axis i runs along world axis order[i] with signed size sizes[i]."""
    affine = np.zeros((4, 4))
    for axis, (world, size) in enumerate(zip(order, sizes)):
        affine[world, axis] = size
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return Grid(tuple(shape), affine)


FSL1 = standard_grid("MNI152NLin6Asym", 1)
FSL2 = standard_grid("MNI152NLin6Asym", 2)

# Pairs of axis-aligned grids users have: standard 1 <-> 2 mm, an SPM 2 mm bounding box,
# a cropped 1 mm grid, the FSL lattice stored RAS, 1.5 mm, anisotropic, axes permuted.
GRID_PAIRS = {
    "fsl2->fsl1": (FSL2, FSL1),
    "fsl1->fsl2": (FSL1, FSL2),
    "spm2->fsl1": (_grid((79, 95, 79), (-2, 2, 2), (78, -112, -70)), FSL1),
    "cropped->fsl2": (_grid((60, 70, 50), (-1, 1, 1), (40, -60, -20)), FSL2),
    "ras-fsl1->fsl2": (_grid((182, 218, 182), (1, 1, 1), (-91, -126, -72)), FSL2),
    "1.5mm->fsl1": (_grid((100, 120, 100), (1.5, 1.5, 1.5), (-75, -110, -60)), FSL1),
    "aniso->fsl2": (_grid((90, 100, 40), (-1, 1.2, 3.5), (80, -110, -60)), FSL2),
    "permuted->fsl2": (_grid((60, 80, 70), (1, -1, 1), (40, -40, -30), order=(2, 0, 1)), FSL2),
}


def _scipy_trilinear(data: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """What nibabel.processing.resample_from_to does: scipy, order 1, zero outside."""
    vox2vox = np.linalg.inv(source.affine) @ target.affine
    return ndimage.affine_transform(
        data.astype(np.float64), vox2vox[:3, :3], vox2vox[:3, 3], output_shape=target.shape, order=1, mode="constant", cval=0.0
    )


@pytest.mark.parametrize("pair", sorted(GRID_PAIRS))
def test_separable_trilinear_equals_scipy(pair):
    source, target = GRID_PAIRS[pair]
    data = np.random.default_rng(0).standard_normal(source.shape)
    np.testing.assert_allclose(separable_trilinear(data, source, target), _scipy_trilinear(data, source, target), atol=1e-10)


def test_oblique_grids_are_not_axis_aligned():
    angle = np.deg2rad(10)
    affine = FSL2.affine.copy()
    affine[:2, :2] = 2 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert axis_maps(Grid(FSL2.shape, affine), FSL1) is None
    with pytest.raises(ValueError, match="axis-aligned"):
        separable_trilinear(np.zeros(FSL2.shape), Grid(FSL2.shape, affine), FSL1)


def _oversampled_coverage(mask: np.ndarray, source: Grid, target: Grid, k: int, box: tuple[slice, ...]) -> np.ndarray:
    """Plain numpy: the share of k^3 regularly placed points per target voxel of ``box``
    that lie in a lesioned source voxel (exact when the grids' boundaries fall between
    the points)."""
    offsets = (np.arange(k) + 0.5) / k - 0.5
    sub = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    shape = tuple(s.stop - s.start for s in box)
    ijk = np.indices(shape).reshape(3, -1).T.astype(float) + [s.start for s in box]
    world_to_source = np.linalg.inv(source.affine) @ target.affine
    total = np.zeros(len(ijk))
    for shift in sub:
        points = (ijk + shift) @ world_to_source[:3, :3].T + world_to_source[:3, 3]
        nearest = np.floor(points + 0.5).astype(int)
        inside = np.all((nearest >= 0) & (nearest < source.shape), axis=1)
        hit = np.zeros(len(ijk), bool)
        hit[inside] = mask[tuple(nearest[inside].T)] > 0
        total += hit
    return (total / len(sub)).reshape(shape)


@pytest.mark.parametrize(
    "source, target, k",
    [
        (FSL1, FSL2, 4),  # 1 mm -> 2 mm: each 2 mm voxel holds 8 whole and partial 1 mm voxels
        (FSL2, FSL1, 4),  # 2 mm -> 1 mm: a 1 mm voxel straddles 2 mm boundaries on odd indices
        (_grid((79, 95, 79), (-2, 2, 2), (78, -112, -70)), FSL1, 4),  # SPM bounding box
        (_grid((182, 218, 182), (1, 1, 1), (-91, -126, -72)), FSL2, 4),  # RAS copy of the FSL grid
    ],
)
def test_separable_coverage_is_the_exact_partial_volume(source, target, k):
    rng = np.random.default_rng(1)
    centre = np.array(source.shape) // 2
    ijk = np.indices(source.shape)
    mask = ((ijk - centre[:, None, None, None]) ** 2).sum(0) <= 36
    mask[centre[0] : centre[0] + 3, centre[1] - 15 : centre[1] + 15, centre[2]] = True  # a thin line
    scattered = centre + rng.integers(-12, 13, size=(30, 3))
    mask[tuple(scattered.T)] = True
    # The target box that can see the mask (with a margin); everything outside must be 0.
    corners = np.array([[lo, hi] for lo, hi in zip(np.argwhere(mask).min(0), np.argwhere(mask).max(0))])
    world = np.array([source.affine[:3, :3] @ [corners[0, a], corners[1, b], corners[2, c]] + source.affine[:3, 3]
                      for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    target_ijk = (world - target.affine[:3, 3]) @ np.linalg.inv(target.affine[:3, :3]).T
    box = tuple(slice(max(int(lo) - 3, 0), min(int(hi) + 4, n)) for lo, hi, n in zip(target_ijk.min(0), target_ijk.max(0), target.shape))
    expected = _oversampled_coverage(mask, source, target, k, box)
    got = separable_coverage(mask, source, target)
    assert got.dtype == np.float32 and got.shape == target.shape
    np.testing.assert_allclose(got[box], expected, atol=1e-6)
    outside = got.copy()
    outside[box] = 0
    assert not outside.any()
    np.testing.assert_allclose(coverage_fraction(mask, source.affine, target)[box], expected, atol=1e-6)


@pytest.mark.parametrize("pair", sorted(GRID_PAIRS))
def test_coverage_keeps_the_lesion_volume(pair):
    # Exact partial volumes conserve the volume of a lesion inside the target's field of
    # view, whatever the voxel sizes (1.5 mm, anisotropic, permuted axes).
    source, target = GRID_PAIRS[pair]
    mask = np.zeros(source.shape, bool)
    centre = np.array(source.shape) // 2
    mask[tuple(slice(c - 4, c + 5) for c in centre)] = True
    mask[centre[0], centre[1] + 5, centre[2]] = True
    covered = separable_coverage(mask, source, target).sum(dtype=np.float64) * target.voxel_volume_mm3
    assert covered == pytest.approx(mask.sum() * source.voxel_volume_mm3, rel=1e-6)


def test_coverage_of_a_mask_outside_the_target_is_empty():
    far = _grid((10, 10, 10), (1, 1, 1), (500, 500, 500))
    mask = np.ones((10, 10, 10), bool)
    assert not separable_coverage(mask, far, FSL2).any()


def test_trilinear_taps_match_scipy_at_arbitrary_points():
    shape = (7, 9, 8)
    data = np.random.default_rng(2).standard_normal(shape)
    points = np.random.default_rng(3).uniform(-1, 9, size=(500, 3))
    points[:5] = [[0, 0, 0], [6, 8, 7], [6, 0, 3.5], [-1e-9, 2, 2], [3, 8 + 1e-9, 1]]
    indices, weights = trilinear_taps(points, shape)
    ours = (data.reshape(-1)[indices] * weights).sum(axis=1)
    reference = ndimage.map_coordinates(data, points.T, order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_a_nan_reaches_only_its_neighbours():
    source, target = FSL2, FSL1
    data = np.ones(source.shape, np.float32)
    data[45, 54, 45] = np.nan
    with pytest.raises(ValueError, match="finite"):
        separable_trilinear(data, source, target)
    import nibabel as nib

    from lacuna.core.spaces import resample_continuous

    moved = np.asanyarray(resample_continuous(nib.Nifti1Image(data, source.affine), target).dataobj)
    reference = _scipy_trilinear(data, source, target)
    np.testing.assert_array_equal(np.isnan(moved), np.isnan(reference))
    assert 0 < np.isnan(moved).sum() <= 4**3  # scipy includes taps of weight 0


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
def test_nonzero_box_is_the_bounding_box_of_the_nonzero_voxels(dtype):
    rng = np.random.default_rng(11)
    for _ in range(20):
        mask = np.zeros((23, 17, 19), dtype=dtype)
        count = int(rng.integers(1, 6))
        ijk = [rng.integers(0, n, size=count) for n in mask.shape]
        mask[tuple(ijk)] = 1
        found = np.nonzero(mask)
        expected = tuple(slice(int(axis.min()), int(axis.max()) + 1) for axis in found)
        assert nonzero_box(mask) == expected
        assert nonzero_box(np.asfortranarray(mask)) == expected
    corners = np.zeros((4, 5, 6), dtype=dtype)
    corners[0, 0, 0] = corners[-1, -1, -1] = 1
    assert nonzero_box(corners) == (slice(0, 4), slice(0, 5), slice(0, 6))
    assert nonzero_box(np.zeros((4, 5, 6), dtype=dtype)) is None
