"""Moving masks and maps between MNI spaces with TemplateFlow-style ITK transforms."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from lacuna import SubjectData
from lacuna.analysis import RegionalDamage
from lacuna.core.errors import DownloadError
from lacuna.core.spaces import Grid, standard_grid
from lacuna.resources.transforms import map_to_space, mask_to_space

from conftest import save_mask, sphere, write_itk_transform

SIX, C = "MNI152NLin6Asym", "MNI152NLin2009cAsym"


def _serve_transforms(static_server, tmp_path, monkeypatch, forward, backward=None):
    """Serve transform files laid out as TemplateFlow's store; point Lacuna at them."""
    store = tmp_path / "templateflow"
    write_itk_transform(store / f"tpl-{C}" / f"tpl-{C}_from-{SIX}_mode-image_xfm.h5", **forward)
    if backward is not None:
        write_itk_transform(store / f"tpl-{SIX}" / f"tpl-{SIX}_from-{C}_mode-image_xfm.h5", **backward)
    monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", static_server(store))


def _centre_of_mass_mm(data: np.ndarray, grid: Grid) -> np.ndarray:
    ijk = np.argwhere(data > 0.5).mean(axis=0)
    return grid.affine[:3, :3] @ ijk + grid.affine[:3, 3]


def _translation(dx_lps=0.0, dy_lps=0.0, dz=0.0) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = (dx_lps, dy_lps, dz)
    return affine


def test_affine_transform_moves_a_known_point(tmp_path, static_server, monkeypatch):
    # ITK maps reference points to moving points: moving_LPS = p_LPS + (10, 0, 0), i.e.
    # moving_RAS = p_RAS + (-10, 0, 0). A blob at RAS (20, -10, 10) in the 6Asym image
    # therefore lands at RAS (30, -10, 10) on the 2009c grid.
    _serve_transforms(static_server, tmp_path, monkeypatch, {"affine_lps": _translation(10.0)})
    grid = standard_grid(SIX, 2)
    img = nib.Nifti1Image(sphere(grid, (20, -10, 10), 8), grid.affine)
    moved, notes = mask_to_space(img, SIX, C, resolution=2)
    target = standard_grid(C, 2)
    assert moved.shape == target.shape and np.allclose(moved.affine, target.affine)
    np.testing.assert_allclose(_centre_of_mass_mm(moved.get_fdata(), target), (30, -10, 10), atol=1.0)
    assert "mode-image_xfm.h5" in notes[0]


def test_displacement_field_is_read_in_itk_order(tmp_path, static_server, monkeypatch):
    # Displacement along z that grows with LPS x: u_z = 0.1 * x_LPS. A blob at RAS x=-40
    # (LPS x=+40) sees u_z=+4, so it lands 4 mm lower; a blob at RAS x=+40, 4 mm higher.
    origin, spacing, shape = np.array([-100.0, -130.0, -80.0]), np.array([10.0, 10.0, 10.0]), (21, 27, 19)
    x_lps = origin[0] + spacing[0] * np.arange(shape[0])
    displacements = np.zeros((*shape, 3))
    displacements[..., 2] = 0.1 * x_lps[:, None, None]
    _serve_transforms(static_server, tmp_path, monkeypatch, {"field": (displacements, origin, spacing)})
    grid = standard_grid(SIX, 2)
    for x, expected_dz in ((-40, -4.0), (40, 4.0)):
        img = nib.Nifti1Image(sphere(grid, (x, 0, 20), 8), grid.affine)
        moved, _ = mask_to_space(img, SIX, C, resolution=2)
        centre = _centre_of_mass_mm(moved.get_fdata(), standard_grid(C, 2))
        np.testing.assert_allclose(centre, (x, 0, 20 + expected_dz), atol=1.0)


def test_regional_damage_of_a_2009c_mask_on_a_6asym_atlas(tmp_path, static_server, monkeypatch, shared_atlases):
    _serve_transforms(static_server, tmp_path, monkeypatch, {"affine_lps": np.eye(4)}, {"affine_lps": np.eye(4)})
    grid_c = standard_grid(C, 1)
    lesion = sphere(grid_c, (-40, -20, 40), 10)
    path = save_mask(tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz", lesion, grid_c.affine)
    result = RegionalDamage(["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases).run(SubjectData.from_nifti(path))
    atlas = nib.load(shared_atlases / "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz")
    labels = np.asanyarray(atlas.dataobj).astype(int)
    # Identity transform; both 1 mm grids have voxel centres on whole millimetres:
    # Schaefer voxel (i, j, k) is at RAS (90 - i, j - 126, k - 72) = 2009c voxel (186 - i, j + 6, k + 6).
    on_atlas = lesion[::-1][193 - 186 - 1 : 193 - 186 - 1 + 182][:, 6 : 6 + 218, 6 : 6 + 182].astype(bool)
    hits = np.bincount(labels[on_atlas], minlength=101)[1:]
    values = result.results["RegionalDamage"]["lesioned_voxels_Schaefer2018_100Parcels7Networks"].values
    np.testing.assert_array_equal(values, hits)
    step = result.provenance[-1]
    assert any(f.role == f"transform:{C}->{SIX}" and f.sha256 for f in step.inputs)


def test_missing_transform_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", "http://127.0.0.1:9")  # nothing listens there
    grid = standard_grid(SIX, 2)
    img = nib.Nifti1Image(sphere(grid, (0, 0, 0), 6), grid.affine)
    with pytest.raises(DownloadError, match="127.0.0.1"):
        mask_to_space(img, SIX, C, resolution=2)


def test_continuous_maps_within_a_space_use_nibabel_trilinear(tmp_path):
    grid = standard_grid(SIX, 2)
    values = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    img = nib.Nifti1Image(values, grid.affine)
    moved, _ = map_to_space(img, SIX, SIX, resolution=1)
    expected = resample_from_to(img, (standard_grid(SIX, 1).shape, standard_grid(SIX, 1).affine), order=1)
    np.testing.assert_allclose(moved.get_fdata(), expected.get_fdata(), atol=1e-5)


def test_functional_maps_come_back_in_the_input_space(tmp_path, static_server, monkeypatch):
    from lacuna.analysis.functional.network_mapping import FunctionalNetworkMapping
    from test_functional import _mask, _reference, _timeseries, _write

    _serve_transforms(static_server, tmp_path, monkeypatch, {"affine_lps": np.eye(4)}, {"affine_lps": np.eye(4)})
    data = _timeseries(6, 25, seed=2)
    _write(tmp_path / "conn.h5", data)
    grid_c = standard_grid(C, 2)
    lesion = sphere(grid_c, (-10, 0, 8), 5)  # inside the connectome's box mask
    path = save_mask(tmp_path / "sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz", lesion, grid_c.affine)
    subject = SubjectData.from_nifti(path)
    native = FunctionalNetworkMapping(tmp_path / "conn.h5", return_in_input_space=False).run(subject)
    back = FunctionalNetworkMapping(tmp_path / "conn.h5").run(subject)
    t_native = native.results["FunctionalNetworkMapping"]["conn_t"]
    t_back = back.results["FunctionalNetworkMapping"]["conn_t"]
    assert t_native.space == SIX and t_native.data.shape == (91, 109, 91)
    assert t_back.space == C and t_back.data.shape == (97, 115, 97)
    # Identity transform: bringing the map back is trilinear resampling by world coordinates.
    expected = resample_from_to(nib.Nifti1Image(t_native.data, t_native.affine), (grid_c.shape, grid_c.affine), order=1)
    np.testing.assert_allclose(t_back.data, expected.get_fdata(), atol=1e-4)
    # The seed: the 2009c mask interpolated onto the connectome grid, half-coverage.
    six = standard_grid(SIX, 2)
    on_connectome = resample_from_to(nib.Nifti1Image(lesion.astype(np.float32), grid_c.affine), (six.shape, six.affine), order=1).get_fdata() >= 0.5 - 1e-6
    lookup = np.full(six.shape, -1)
    lookup[_mask()] = np.arange(_mask().sum())
    columns = np.sort(lookup[on_connectome & _mask()])
    expected_t = _reference(data.astype(np.float32), columns)["t"]
    np.testing.assert_allclose(t_native.data[_mask()], expected_t, atol=1e-4)


def test_transforms_fetch_command_caches_both_directions(tmp_path, static_server, monkeypatch):
    from click.testing import CliRunner

    from lacuna.cli.main import cli

    _serve_transforms(static_server, tmp_path, monkeypatch, {"affine_lps": np.eye(4)}, {"affine_lps": np.eye(4)})
    result = CliRunner().invoke(cli, ["transforms", "fetch"])
    assert result.exit_code == 0, result.output
    from lacuna.core.datadir import get_data_dir

    cached = sorted(p.name for p in (get_data_dir() / "templateflow").rglob("*.h5"))
    assert cached == [f"tpl-{C}_from-{SIX}_mode-image_xfm.h5", f"tpl-{SIX}_from-{C}_mode-image_xfm.h5"]


@pytest.mark.parametrize("form", ["folder", "file-url", "templateflow-home"])
def test_transforms_come_from_a_local_mirror_or_templateflow_home(tmp_path, monkeypatch, form, isolated_data_dir):
    from lacuna.resources.templates import transform_path

    store = tmp_path / "templateflow"
    name = f"tpl-{C}_from-{SIX}_mode-image_xfm.h5"
    write_itk_transform(store / f"tpl-{C}" / name, affine_lps=_translation(10.0))
    if form == "templateflow-home":
        monkeypatch.setenv("TEMPLATEFLOW_HOME", str(store))  # LACUNA_TEMPLATEFLOW_URL stays closed
        assert transform_path(SIX, C) == store / f"tpl-{C}" / name  # used where it is
    else:
        monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", str(store) if form == "folder" else store.as_uri())
        copied = transform_path(SIX, C)
        assert copied == isolated_data_dir / "templateflow" / f"tpl-{C}" / name
        assert copied.read_bytes() == (store / f"tpl-{C}" / name).read_bytes()
    grid = standard_grid(SIX, 2)
    moved, _ = mask_to_space(nib.Nifti1Image(sphere(grid, (20, -10, 10), 8), grid.affine), SIX, C, resolution=2)
    np.testing.assert_allclose(_centre_of_mass_mm(moved.get_fdata(), standard_grid(C, 2)), (30, -10, 10), atol=1.0)
