"""RegionalDamage against independent numpy computations on the real atlases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lacuna import SubjectData
from lacuna.analysis import RegionalDamage
from lacuna.core.errors import DownloadError
from lacuna.core.spaces import Grid, standard_grid

from conftest import save_mask, sphere

SCHAEFER = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg"
TIAN = "tpl-MNI152NLin6Asym_res-01_atlas-TianSubcortex_desc-3TS1_dseg"
HCP = "tpl-MNI152NLin2009aAsym_res-01_atlas-HCP1065_desc-thr0p1_probseg"


def _subject(tmp_path, data, grid, space="MNI152NLin6Asym", name="sub-01_label-lesion_mask.nii.gz"):
    path = save_mask(tmp_path / name, data, grid.affine)
    return SubjectData.from_nifti(path, space=space)


def _numpy_damage(labels: np.ndarray, lesion: np.ndarray, n_regions: int):
    """Lesioned voxels and percent per label 1..n, and the fraction outside, in plain numpy."""
    hits = np.array([np.sum((labels == r) & lesion) for r in range(1, n_regions + 1)], float)
    sizes = np.array([np.sum(labels == r) for r in range(1, n_regions + 1)], float)
    outside = np.sum(lesion & (labels == 0)) / np.sum(lesion)
    return hits, 100 * hits / sizes, outside


def _parcel(subject, measure, parcellation):
    return subject.results["RegionalDamage"][f"{measure}_{parcellation}"]


@pytest.fixture(scope="module")
def schaefer_labels(shared_atlases):
    return np.asanyarray(nib.load(shared_atlases / f"{SCHAEFER}.nii.gz").dataobj).astype(int)


def test_schaefer_same_grid_matches_numpy(tmp_path, shared_atlases, schaefer_labels, grid_1mm):
    # Two blobs: one cortical (hits parcels), one deep (mostly outside every parcel).
    lesion = sphere(grid_1mm, (-40, -20, 40), 14) | sphere(grid_1mm, (10, -10, 5), 6)
    subject = _subject(tmp_path, lesion, grid_1mm)
    result = RegionalDamage(["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases).run(subject)

    hits, percent, outside = _numpy_damage(schaefer_labels, lesion.astype(bool), 100)
    name = "Schaefer2018_100Parcels7Networks"
    np.testing.assert_array_equal(_parcel(result, "lesioned_voxels", name).values, hits)
    np.testing.assert_allclose(_parcel(result, "lesioned_volume_mm3", name).values, hits * 1.0)
    np.testing.assert_allclose(_parcel(result, "percent_damaged", name).values, percent, rtol=1e-12)
    assert hits.sum() > 100  # the lesion really hits cortex
    scalars = result.results["RegionalDamage"]
    assert scalars[f"fraction_outside_{name}"].value == pytest.approx(outside)
    assert 0 < outside < 1
    assert scalars["lesion_volume_mm3"].value == pytest.approx(lesion.sum())
    names = _parcel(result, "percent_damaged", name).region_names
    labels_file = (shared_atlases / f"{SCHAEFER}.txt").read_text().split()
    assert names == labels_file


def _overlap_weights(target_centres, target_size, source_centres, source_size) -> np.ndarray:
    """Fraction of each target voxel (1-D interval) lying in each source voxel."""
    t_low, t_high = target_centres - target_size / 2, target_centres + target_size / 2
    s_low, s_high = source_centres - source_size / 2, source_centres + source_size / 2
    overlap = np.minimum(t_high[:, None], s_high[None, :]) - np.maximum(t_low[:, None], s_low[None, :])
    return np.clip(overlap, 0, None) / target_size


def _exact_coverage(lesion, source_grid, target_grid) -> np.ndarray:
    """Exact partial-volume coverage for axis-aligned grids, separably per axis."""
    weights = []
    for axis in range(3):
        t = target_grid.affine[axis, axis] * np.arange(target_grid.shape[axis]) + target_grid.affine[axis, 3]
        s = source_grid.affine[axis, axis] * np.arange(source_grid.shape[axis]) + source_grid.affine[axis, 3]
        weights.append(_overlap_weights(t, abs(target_grid.affine[axis, axis]), s, abs(source_grid.affine[axis, axis])))
    return np.einsum("ia,jb,kc,abc->ijk", *weights, lesion.astype(float), optimize=True)


def test_2mm_mask_on_1mm_atlas_uses_coverage_rule(tmp_path, shared_atlases, schaefer_labels, grid_2mm, grid_1mm):
    lesion_2mm = sphere(grid_2mm, (-36, -30, 36), 16)
    subject = _subject(tmp_path, lesion_2mm, grid_2mm)
    result = RegionalDamage(["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases).run(subject)

    coverage = _exact_coverage(lesion_2mm, grid_2mm, grid_1mm)
    hits, percent, _ = _numpy_damage(schaefer_labels, coverage >= 0.5 - 1e-9, 100)
    name = "Schaefer2018_100Parcels7Networks"
    np.testing.assert_array_equal(_parcel(result, "lesioned_voxels", name).values, hits)
    np.testing.assert_allclose(_parcel(result, "percent_damaged", name).values, percent)
    step = result.provenance[-1]
    assert any("resampled" in note for note in step.notes)
    assert step.parameters == {"parcellations": [name]}


def test_tian_2mm_header_wins_over_res01_name(tmp_path, shared_atlases, grid_2mm):
    """The Tian file says res-01 but is a 2 mm RAS grid: the mask is resampled onto it."""
    tian = nib.load(shared_atlases / f"{TIAN}.nii.gz")
    labels = np.asanyarray(tian.dataobj).astype(int)
    # Lesion on the 2009c-like 2 mm Tian grid expressed back on the 6Asym 2 mm grid: a
    # sphere around the left putamen (x=-25, y=5, z=0).
    lesion = sphere(grid_2mm, (-24, 4, 0), 10)
    subject = _subject(tmp_path, lesion, grid_2mm)
    result = RegionalDamage(["TianSubcortex_3TS1"], atlas_dir=shared_atlases).run(subject)
    # Independent: the Tian grid (2 mm RAS, origin -96.5/-132.5/-78.5) is offset from
    # the 6Asym 2 mm grid by a quarter voxel per axis, so each Tian voxel is covered
    # 0.75/0.25 by two mask voxels per axis: exact box overlaps, half-coverage rule.
    tian_grid = Grid(labels.shape, tian.affine)
    lesion_on_tian = _exact_coverage(lesion, grid_2mm, tian_grid) >= 0.5 - 1e-9
    hits, percent, _ = _numpy_damage(labels, lesion_on_tian, 16)
    np.testing.assert_array_equal(_parcel(result, "lesioned_voxels", "TianSubcortex_3TS1").values, hits)
    np.testing.assert_allclose(_parcel(result, "lesioned_volume_mm3", "TianSubcortex_3TS1").values, hits * 8.0)
    assert hits.sum() > 0


def test_hcp1065_probabilistic_overlap(tmp_path, shared_atlases):
    """4-D tract atlas in 2009aAsym, mask in 2009cAsym: probability-weighted overlap."""
    hcp = nib.load(shared_atlases / f"{HCP}.nii.gz")
    grid = standard_grid("MNI152NLin2009cAsym", 1)
    lesion = sphere(grid, (-28, -10, 25), 8)  # left corona radiata / arcuate region
    subject = _subject(tmp_path, lesion, grid, space="MNI152NLin2009cAsym")
    result = RegionalDamage(["HCP1065_thr0p1"], atlas_dir=shared_atlases).run(subject)

    # Independent: HCP origin (-91,-126,-72) vs 2009c origin (-96,-132,-78), both 1 mm
    # RAS: HCP voxel (i,j,k) is 2009c voxel (i+5, j+6, k+6).
    shifted = lesion[5 : 5 + 182, 6 : 6 + 218, 6 : 6 + 182].astype(bool)
    probabilities = np.asanyarray(hcp.dataobj)  # stored 0/1 uint8, no scaling
    hits = probabilities[shifted].sum(axis=0, dtype=float)
    sizes = np.array([probabilities[..., r].sum(dtype=float) for r in range(64)])
    name = "HCP1065_thr0p1"
    np.testing.assert_allclose(_parcel(result, "lesioned_voxels", name).values, hits)
    np.testing.assert_allclose(_parcel(result, "percent_damaged", name).values, 100 * hits / sizes)
    outside = np.mean(probabilities[shifted].max(axis=1) == 0)
    assert result.results["RegionalDamage"][f"fraction_outside_{name}"].value == pytest.approx(outside)
    assert hits.sum() > 0


def test_several_parcellations_in_one_run(tmp_path, shared_atlases, grid_1mm):
    lesion = sphere(grid_1mm, (30, 10, 50), 10)
    subject = _subject(tmp_path, lesion, grid_1mm)
    names = ["Schaefer2018_100Parcels7Networks", "Schaefer2018_400Parcels17Networks"]
    result = RegionalDamage(names, atlas_dir=shared_atlases).run(subject)
    for name, n in zip(names, (100, 400)):
        assert len(_parcel(result, "percent_damaged", name).values) == n
    # Both partitions of the same cortex see the same total damaged volume.
    totals = [_parcel(result, "lesioned_voxels", name).values.sum() for name in names]
    assert abs(totals[0] - totals[1]) / totals[0] < 0.05


def test_mask_in_other_space_without_transform_is_a_clear_error(tmp_path, shared_atlases, monkeypatch):
    monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", "http://127.0.0.1:9")  # offline: nothing there
    grid = standard_grid("MNI152NLin2009cAsym", 2)
    subject = _subject(tmp_path, sphere(grid, (0, 0, 0), 8), grid, space="MNI152NLin2009cAsym")
    with pytest.raises(DownloadError, match="MNI152NLin6Asym"):
        RegionalDamage(["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases).run(subject)


def test_lesion_vanishing_on_coarse_grid_gives_nan_fraction(tmp_path, shared_atlases, grid_1mm):
    lesion = np.zeros(grid_1mm.shape, np.uint8)
    lesion[100, 120, 60] = 1  # a single 1 mm voxel covers at most 1/8... of a 2 mm voxel
    subject = _subject(tmp_path, lesion, grid_1mm)
    result = RegionalDamage(["TianSubcortex_3TS1"], atlas_dir=shared_atlases).run(subject)
    assert np.isnan(result.results["RegionalDamage"]["fraction_outside_TianSubcortex_3TS1"].value)
    assert _parcel(result, "lesioned_voxels", "TianSubcortex_3TS1").values.sum() == 0


def test_run_does_not_modify_input_and_records_provenance(tmp_path, shared_atlases, grid_2mm):
    subject = _subject(tmp_path, sphere(grid_2mm, (-30, 0, 30), 8), grid_2mm)
    analysis = RegionalDamage(["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases)
    result = analysis.run(subject)
    assert subject.results == {} and len(subject.provenance) == 1
    step = result.provenance[-1]
    assert step.name == "RegionalDamage" and step.kind == "analysis" and step.finished
    roles = {f.role for f in step.inputs}
    assert "parcellation:Schaefer2018_100Parcels7Networks" in roles
    assert "Schaefer2018_100Parcels7Networks" in repr(analysis)
