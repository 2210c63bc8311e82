"""Functional LNM through the BIDS App: options, outputs, numbers, validators."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from lacuna.cli.main import cli, expand_multi_value_options
from lacuna.core.spaces import standard_grid
from lacuna.bids.validation import validate_bids_derivatives

from test_functional import GRID, SPACE, _benjamini_hochberg, _columns, _mask, _reference, _timeseries, _write

ATLAS = "Schaefer2018_100Parcels7Networks"
LESIONS = {
    "01": [(40 + i, 55 + j, 44) for i in range(3) for j in range(3)],
    "02": [(45, 60, 46), (46, 60, 46)],
    "03": [(5, 5, 5)],  # outside the connectome mask: fails alone
}


def _run(*args):
    result = CliRunner().invoke(cli, expand_multi_value_options([str(a) for a in args]), catch_exceptions=False)
    return result


@pytest.fixture
def dataset(tmp_path, shared_atlases):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "fLNM", "BIDSVersion": "1.10.0"}))
    for subject, voxels in LESIONS.items():
        data = np.zeros(GRID.shape, dtype=np.uint8)
        for voxel in voxels:
            data[voxel] = 1
        folder = bids / f"sub-{subject}" / "anat"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, GRID.affine), folder / f"sub-{subject}_space-{SPACE}_res-2_label-lesion_mask.nii.gz")
    data = _timeseries(6, 30, seed=11)
    _write(tmp_path / "conn.h5", data)
    return bids, tmp_path / "conn.h5", data


def test_functional_outputs_match_numpy_and_validate(tmp_path, dataset, shared_atlases):
    bids, connectome, data = dataset
    out = tmp_path / "out"
    result = _run(bids, out, "participant", "--functional-connectome", connectome, "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation")
    assert result.exit_code == 1, result.output  # sub-03 lies outside the connectome mask
    assert "sub-03" in result.output and "brain mask" in result.output
    assert "2 done" in result.output and "1 failed" in result.output
    anat = out / "sub-01" / "anat"
    t_map = anat / f"sub-01_space-{SPACE}_res-2_label-lesion_desc-flnmconnt_statmap.nii.gz"
    expected = _reference(data.astype(np.float32), _columns(LESIONS["01"]))
    np.testing.assert_allclose(nib.load(t_map).get_fdata()[_mask()], expected["t"], atol=1e-4)
    pfdr = nib.load(anat / f"sub-01_space-{SPACE}_res-2_label-lesion_desc-flnmconnpfdr_statmap.nii.gz").get_fdata()
    np.testing.assert_allclose(pfdr[_mask()], _benjamini_hochberg(expected["p"]), atol=1e-5, rtol=1e-3)
    sidecar = json.loads(t_map.with_name(t_map.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Connectome"] == "conn" and sidecar["Method"] == "boes" and sidecar["NumberOfSubjects"] == 6
    # Parcel-level mean t: independent numpy mean of the t map (resampled by nibabel onto
    # the 1 mm atlas grid, trilinear) per Schaefer parcel.
    table = pd.read_csv(anat / f"sub-01_space-{SPACE}_atlas-Schaefer2018_seg-100Parcels7Networks_label-lesion_desc-flnmconnt_parcelstats.tsv", sep="\t")
    atlas = nib.load(shared_atlases / "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz")
    from nibabel.processing import resample_from_to

    t_1mm = resample_from_to(nib.load(t_map), atlas, order=1).get_fdata()
    labels = np.asanyarray(atlas.dataobj).astype(int)
    for region in (1, 50, 100):
        assert table.loc[table["index"] == region, "mean"].item() == pytest.approx(t_1mm[labels == region].mean(), abs=1e-4)
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []

    group = _run(bids, out, "group")
    assert group.exit_code == 0, group.output
    group_t = pd.read_csv(out / "group" / "atlas-Schaefer2018_seg-100Parcels7Networks_desc-flnmconntMean_parcelstats.tsv", sep="\t")
    assert list(group_t["participant_id"]) == ["sub-01", "sub-02"]
    assert group_t.loc[0, table.loc[0, "name"]] == pytest.approx(table.loc[0, "mean"])
    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if Path(validator).exists():
        official = subprocess.run([validator, str(out)], capture_output=True, text=True)
        assert official.returncode == 0 and "[ERROR]" not in official.stdout, official.stdout[-3000:]


def test_registered_connectome_pini_and_rerun_skips(tmp_path, dataset, shared_atlases, monkeypatch):
    bids, connectome, data = dataset
    register = _run("connectomes", "register", "Tiny", connectome, "--space", SPACE, "--resolution", "2")
    assert register.exit_code == 0, register.output
    out = tmp_path / "out"
    args = [bids, out, "participant", "--participant-label", "01", "02", "--functional-connectome", "Tiny", "--flnm-method", "pini", "--mem", "0.5", "--analysis", "FunctionalNetworkMapping", "--atlas-dir", shared_atlases, "--atlas", ATLAS]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    anat = out / "sub-01" / "anat"
    assert (anat / f"sub-01_space-{SPACE}_res-2_label-lesion_desc-flnmTinyz_statmap.nii.gz").is_file()
    assert not list(anat.glob("*regionaldamage*"))  # only the functional analysis was asked for
    provenance = json.loads((anat / "sub-01_label-lesion_provenance.json").read_text())
    step = next(s for s in provenance["steps"] if s["name"] == "FunctionalNetworkMapping")
    assert step["parameters"]["method"] == "pini" and step["parameters"]["connectome"] == "Tiny"
    second = _run(*args)
    assert "2 skipped" in second.output
    missing = _run(bids, out, "participant", "--analysis", "FunctionalNetworkMapping")
    assert missing.exit_code == 64 and "--functional-connectome" in missing.output


def test_mixed_space_cohort_and_output_space(tmp_path, dataset, shared_atlases, static_server, monkeypatch):
    """A 2009c mask next to 6Asym masks: moved to the connectome space for mapping (the
    batch path must not skip that), maps written in the requested space."""
    from conftest import write_itk_transform

    store = tmp_path / "templateflow"
    for target, source in (("MNI152NLin2009cAsym", SPACE), (SPACE, "MNI152NLin2009cAsym")):
        write_itk_transform(store / f"tpl-{target}" / f"tpl-{target}_from-{source}_mode-image_xfm.h5", affine_lps=np.eye(4))
    monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", static_server(store))
    bids, connectome, _ = dataset
    shutil.rmtree(bids / "sub-03")
    grid_c = standard_grid("MNI152NLin2009cAsym", 2)
    ijk = np.indices(grid_c.shape).reshape(3, -1).T
    xyz = ijk @ grid_c.affine[:3, :3].T + grid_c.affine[:3, 3]
    centre = GRID.affine[:3, :3] @ np.array([42, 57, 44]) + GRID.affine[:3, 3]  # inside the connectome mask
    lesion = (np.linalg.norm(xyz - centre, axis=1) <= 4).reshape(grid_c.shape).astype(np.uint8)
    folder = bids / "sub-04" / "anat"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(lesion, grid_c.affine), folder / "sub-04_space-MNI152NLin2009cAsym_res-2_label-lesion_mask.nii.gz")
    tables = {}
    for output_space in ("input", "analysis"):
        tables[output_space] = _check_output_space(tmp_path / output_space, bids, connectome, shared_atlases, output_space)
    # Parcel-level results do not depend on the space the maps are written in.
    assert tables["input"] == tables["analysis"]


def _check_output_space(out, bids, connectome, shared_atlases, output_space) -> bytes:
    result = _run(bids, out, "participant", "--functional-connectome", connectome, "--output-space", output_space, "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    maps = sorted(p.name for p in (out / "sub-04" / "anat").glob("*desc-flnmconnt_statmap.nii.gz"))
    expected_space = "MNI152NLin2009cAsym" if output_space == "input" else SPACE
    assert maps == [f"sub-04_space-{expected_space}_res-2_label-lesion_desc-flnmconnt_statmap.nii.gz"]
    shape = nib.load(out / "sub-04" / "anat" / maps[0]).shape
    assert shape == ((97, 115, 97) if output_space == "input" else (91, 109, 91))
    table = out / "sub-04" / "anat" / "sub-04_space-MNI152NLin2009cAsym_atlas-Schaefer2018_seg-100Parcels7Networks_label-lesion_desc-flnmconnt_parcelstats.tsv"
    assert table.is_file()
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []
    return table.read_bytes()


def test_unknown_connectome_is_a_clear_error(tmp_path, dataset, shared_atlases):
    bids, _, _ = dataset
    result = _run(bids, tmp_path / "out", "participant", "--functional-connectome", tmp_path / "missing.h5", "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation")
    assert result.exit_code == 66  # missing input
    assert "missing.h5" in result.output and "neither a registered functional connectome" in result.output


def test_one_lesion_per_pass_gives_the_same_outputs_and_a_time_breakdown(tmp_path, dataset, shared_atlases, monkeypatch):
    from lacuna.analysis.functional import network_mapping as functional_network_mapping

    bids, connectome, data = dataset
    common = ["--functional-connectome", connectome, "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation"]
    together = tmp_path / "together"
    _run(bids, together, "participant", *common)
    # Running sums of less than one lesion per pass: every mask gets a pass of its own
    # and is written while the next one is mapped.
    monkeypatch.setattr(functional_network_mapping, "CACHED_PASS_BYTES", 1)
    apart = tmp_path / "apart"
    result = _run(bids, apart, "participant", *common, "-v")
    assert result.exit_code == 1, result.output  # sub-03 still fails alone
    assert result.output.count("mapping 1 lesion(s)") == 2
    assert "[1/3]" in result.output and "ETA" in result.output
    for phase in ("connectome pass", "parcel aggregation", "writing outputs (background threads)", "total"):
        assert f"time: {phase}:" in result.output
    for subject in ("01", "02"):
        anat = f"sub-{subject}/anat"
        name = f"sub-{subject}_space-{SPACE}_res-2_label-lesion_desc-flnmconnt_statmap.nii.gz"
        np.testing.assert_allclose(nib.load(apart / anat / name).get_fdata(), nib.load(together / anat / name).get_fdata(), rtol=1e-5, atol=1e-5)
        table = f"sub-{subject}_space-{SPACE}_atlas-Schaefer2018_seg-100Parcels7Networks_label-lesion_desc-flnmconnt_parcelstats.tsv"
        pd.testing.assert_frame_equal(pd.read_csv(apart / anat / table, sep="\t"), pd.read_csv(together / anat / table, sep="\t"), atol=1e-5)


def test_mask_on_an_spm_grid_maps_back_onto_its_own_grid(tmp_path, dataset, shared_atlases):
    """A mask on SPM12's 2 mm bounding box (79 x 95 x 79, a lattice of the FSL 2 mm grid):
    mapped losslessly onto the connectome grid, and with --output-space input its maps
    are the analysis-space maps resampled (trilinear, by nibabel) onto its own grid."""
    from nibabel.processing import resample_from_to

    bids, connectome, data = dataset
    shutil.rmtree(bids / "sub-03")
    spm = np.diag([-2.0, 2.0, 2.0, 1.0])
    spm[:3, 3] = (78, -112, -70)  # FSL 2 mm voxel (i, j, k) is SPM voxel (i - 6, j - 7, k - 1)
    lesion = np.zeros((79, 95, 79), np.uint8)
    for i, j, k in LESIONS["01"]:
        lesion[i - 6, j - 7, k - 1] = 1
    folder = bids / "sub-05" / "anat"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(lesion, spm), folder / f"sub-05_space-{SPACE}_label-lesion_mask.nii.gz")
    outputs = {}
    for output_space in ("input", "analysis"):
        out = tmp_path / output_space
        result = _run(bids, out, "participant", "--functional-connectome", connectome, "--output-space", output_space, "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation")
        assert result.exit_code == 0, result.output
        assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []
        outputs[output_space] = out / "sub-05" / "anat"
    analysis_map = nib.load(outputs["analysis"] / f"sub-05_space-{SPACE}_res-2_label-lesion_desc-flnmconnt_statmap.nii.gz")
    expected = _reference(data.astype(np.float32), _columns(LESIONS["01"]))  # same lesion as sub-01
    np.testing.assert_allclose(analysis_map.get_fdata()[_mask()], expected["t"], atol=1e-4)
    # No res- entity on the mask's own (non-template) grid; its Resolution describes the grid.
    own = outputs["input"] / f"sub-05_space-{SPACE}_label-lesion_desc-flnmconnt_statmap.nii.gz"
    written = nib.load(own)
    assert written.shape == (79, 95, 79) and np.allclose(written.affine, spm)
    np.testing.assert_allclose(written.get_fdata(), resample_from_to(analysis_map, written, order=1).get_fdata(), atol=1e-4)
    sidecar = json.loads(own.with_name(own.name.replace(".nii.gz", ".json")).read_text())
    assert "shape (79, 95, 79)" in sidecar["Resolution"]
