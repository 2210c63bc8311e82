"""ParcelAggregation against plain numpy on the real Schaefer and HCP1065 atlases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lacuna import SubjectData
from lacuna.analysis import ParcelAggregation
from lacuna.core.errors import AnalysisError
from lacuna.core.provenance import ProvenanceStep
from lacuna.core.results import VoxelMap
from lacuna.core.spaces import standard_grid

from conftest import save_mask, sphere

SCHAEFER = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz"
NAME = "Schaefer2018_100Parcels7Networks"


@pytest.fixture(scope="module")
def labels(shared_atlases):
    return np.asanyarray(nib.load(shared_atlases / SCHAEFER).dataobj).astype(int)


def _with_map(subject: SubjectData, data: np.ndarray, grid) -> SubjectData:
    voxel_map = VoxelMap("t", data, grid.affine, "MNI152NLin6Asym", float(grid.voxel_sizes[0]))
    return subject.with_results("Fake", {"t": voxel_map}, ProvenanceStep("Fake", "analysis").finish())


@pytest.fixture
def subject(tmp_path, grid_1mm):
    path = save_mask(tmp_path / "sub-01_label-lesion_mask.nii.gz", sphere(grid_1mm, (-40, -20, 40), 12), grid_1mm.affine)
    return SubjectData.from_nifti(path, space="MNI152NLin6Asym")


@pytest.mark.parametrize("method", ["mean", "sum", "max", "percent"])
def test_voxel_map_aggregation_matches_numpy(subject, labels, shared_atlases, grid_1mm, method):
    rng = np.random.default_rng(0)
    values = rng.normal(size=grid_1mm.shape)
    values[0:5] = np.nan  # non-finite voxels are ignored
    subject = _with_map(subject, values, grid_1mm)
    analysis = ParcelAggregation("Fake.t", [NAME], method=method, threshold=0.5, atlas_dir=shared_atlases)
    result = analysis.run(subject).results["ParcelAggregation"][f"faket_{method}_{NAME}"]

    expected = []
    for region in range(1, 101):
        inside = values[(labels == region) & np.isfinite(values)]
        expected.append(
            {
                "mean": inside.mean(),
                "sum": inside.sum(),
                "max": inside.max(),
                "percent": 100 * np.mean(inside > 0.5),
            }[method]
        )
    np.testing.assert_allclose(result.values, expected, rtol=1e-10)
    assert result.measure == method and result.table == "faket"


def test_mask_mean_is_fraction_of_parcel_lesioned(subject, labels, shared_atlases):
    result = ParcelAggregation("mask", [NAME], method="mean", atlas_dir=shared_atlases).run(subject)
    values = result.results["ParcelAggregation"][f"mask_mean_{NAME}"].values
    lesion = subject.mask
    expected = [np.sum(lesion & (labels == r)) / np.sum(labels == r) for r in range(1, 101)]
    np.testing.assert_allclose(values, expected)
    assert max(values) > 0


def test_2mm_map_is_interpolated_onto_the_atlas_grid(subject, labels, shared_atlases, grid_2mm):
    # A map that is linear in x (mm) stays exactly linear under trilinear interpolation.
    ijk = np.indices(grid_2mm.shape)
    x_mm = grid_2mm.affine[0, 0] * ijk[0] + grid_2mm.affine[0, 3]
    subject = _with_map(subject, x_mm.astype(float), grid_2mm)
    result = ParcelAggregation("Fake.t", [NAME], method="mean", atlas_dir=shared_atlases).run(subject)
    values = result.results["ParcelAggregation"][f"faket_mean_{NAME}"].values
    x_1mm = 90.0 - np.indices(labels.shape)[0]
    expected = [x_1mm[labels == r].mean() for r in range(1, 101)]
    # Voxels at the edge of the 2 mm field of view (outside it: 0) are absent from cortex.
    np.testing.assert_allclose(values, expected, atol=1e-4)


def test_probabilistic_atlas_is_weighted(tmp_path, shared_atlases):
    grid = standard_grid("MNI152NLin2009cAsym", 1)
    path = save_mask(tmp_path / "sub-01_label-lesion_mask.nii.gz", sphere(grid, (-28, -10, 25), 8), grid.affine)
    subject = SubjectData.from_nifti(path, space="MNI152NLin2009cAsym")
    values = np.random.default_rng(1).uniform(size=grid.shape)
    voxel_map = VoxelMap("v", values, grid.affine, "MNI152NLin2009cAsym", 1.0)
    subject = subject.with_results("Fake", {"v": voxel_map}, ProvenanceStep("Fake", "analysis").finish())
    result = ParcelAggregation("Fake.v", ["HCP1065_thr0p1"], method="mean", atlas_dir=shared_atlases).run(subject)
    got = result.results["ParcelAggregation"]["fakev_mean_HCP1065_thr0p1"].values

    hcp = np.asanyarray(nib.load(shared_atlases / "tpl-MNI152NLin2009aAsym_res-01_atlas-HCP1065_desc-thr0p1_probseg.nii.gz").dataobj)
    on_hcp = values[5 : 5 + 182, 6 : 6 + 218, 6 : 6 + 182]  # HCP voxel (i,j,k) = 2009c (i+5,j+6,k+6)
    for region in (0, 10, 63):
        weights = hcp[..., region].astype(float)
        assert got[region] == pytest.approx(np.sum(weights * on_hcp) / weights.sum(), rel=1e-9)


def test_errors_are_clear(subject, shared_atlases):
    with pytest.raises(ValueError, match="method"):
        ParcelAggregation("mask", [NAME], method="median", atlas_dir=shared_atlases)
    with pytest.raises(AnalysisError, match="FunctionalNetworkMapping.t"):
        ParcelAggregation("FunctionalNetworkMapping.t", [NAME], atlas_dir=shared_atlases).run(subject)
