"""Converters: GSP1000 NIfTI to HDF5 batches, TrackVis to MRtrix .tck."""

from __future__ import annotations

import gzip
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
from nibabel.streamlines import Field, Tractogram, TrkFile

from lacuna.core.spaces import standard_grid
from lacuna.io import gsp1000_to_hdf5, merge_trk_to_tck, trk_to_tck
from lacuna.formats.functional_connectome import FunctionalConnectome

GRID = standard_grid("MNI152NLin6Asym", 2)


def _gsp(tmp_path, n_subjects=5, n_timepoints=12):
    rng = np.random.default_rng(0)
    mask = np.zeros(GRID.shape, np.uint8)
    mask[40:46, 50:55, 40:44] = 1
    nib.save(nib.Nifti1Image(mask, GRID.affine), tmp_path / "MNI152_T1_2mm_Brain_Mask.nii.gz")
    volumes = {}
    for index in range(n_subjects):
        data = rng.normal(100, 5, size=(*GRID.shape, n_timepoints)).astype(np.float32)
        name = f"sub-{index:04d}"
        folder = tmp_path / "gsp" / name / "func"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, GRID.affine), folder / f"{name}_bld001_rest_skip4_mni_finalmask.nii.gz")
        volumes[name] = data
    return tmp_path / "gsp", tmp_path / "MNI152_T1_2mm_Brain_Mask.nii.gz", mask.astype(bool), volumes


def test_gsp1000_to_hdf5_streams_raw_timeseries_into_chunks(tmp_path):
    gsp, mask_path, mask, volumes = _gsp(tmp_path)
    paths = gsp1000_to_hdf5(gsp, mask_path, tmp_path / "out", subjects_per_chunk=2)
    assert [p.name for p in paths] == ["gsp1000_chunk_000.h5", "gsp1000_chunk_001.h5", "gsp1000_chunk_002.h5"]
    with h5py.File(paths[0]) as handle:
        assert handle["timeseries"].shape == (2, 12, mask.sum())
        assert handle["timeseries"].chunks == (1, 12, mask.sum())
        np.testing.assert_array_equal(handle["timeseries"][1], volumes["sub-0001"][mask].T)  # raw, unnormalised
        assert handle.attrs["space"] == "MNI152NLin6Asym" and handle.attrs["resolution"] == 2.0
    connectome = FunctionalConnectome.open(tmp_path / "out")
    assert connectome.n_subjects == 5 and np.array_equal(connectome.mask_volume(), mask)


def test_gsp1000_to_hdf5_resumes_and_limits(tmp_path):
    gsp, mask_path, _, _ = _gsp(tmp_path, n_subjects=4)
    first = gsp1000_to_hdf5(gsp, mask_path, tmp_path / "out", subjects_per_chunk=2, max_subjects=2)
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns
    again = gsp1000_to_hdf5(gsp, mask_path, tmp_path / "out", subjects_per_chunk=2)
    assert len(again) == 2 and again[0].stat().st_mtime_ns == stamp  # kept, not rewritten
    gsp1000_to_hdf5(gsp, mask_path, tmp_path / "out", subjects_per_chunk=2, overwrite=True)
    assert again[0].stat().st_mtime_ns != stamp


def test_gsp1000_to_hdf5_errors(tmp_path):
    gsp, mask_path, _, _ = _gsp(tmp_path, n_subjects=1)
    with pytest.raises(FileNotFoundError):
        gsp1000_to_hdf5(tmp_path / "missing", mask_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        gsp1000_to_hdf5(gsp, tmp_path / "missing.nii.gz", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no functional files"):
        gsp1000_to_hdf5(tmp_path / "empty", mask_path, tmp_path / "out")


def _trk(path, streamlines):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-90, -126, -72)
    header = {Field.VOXEL_TO_RASMM: affine, Field.VOXEL_SIZES: (2, 2, 2), Field.DIMENSIONS: (91, 109, 91)}
    path.parent.mkdir(parents=True, exist_ok=True)
    TrkFile(Tractogram(streamlines, affine_to_rasmm=np.eye(4)), header=header).save(str(path))
    return path


def _streamlines(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-60, 60, size=(rng.integers(2, 30), 3)).astype(np.float32) for _ in range(n)]


def test_trk_to_tck_keeps_world_coordinates(tmp_path):
    streamlines = _streamlines(40)
    out = trk_to_tck(_trk(tmp_path / "a.trk", streamlines), tmp_path / "a.tck")
    back = list(nib.streamlines.load(str(out)).streamlines)
    assert len(back) == 40
    for original, converted in zip(streamlines, back):
        np.testing.assert_allclose(converted, original, atol=1e-4)
    with pytest.raises(FileExistsError):
        trk_to_tck(tmp_path / "a.trk", tmp_path / "a.tck")
    with pytest.raises(ValueError):
        trk_to_tck(tmp_path / "a.trk", tmp_path / "a.trk2")
    with pytest.raises(ValueError):
        trk_to_tck(tmp_path / "a.tck", tmp_path / "b.tck")


def test_merge_trk_to_tck_excludes_cranial_nerves(tmp_path):
    tracts = tmp_path / "tracts"
    _trk(tracts / "association" / "AF_L.trk", _streamlines(10, 1))
    _trk(tracts / "cranial_nerve" / "CNII_L.trk", _streamlines(7, 2))
    plain = _trk(tmp_path / "CST_R.trk", _streamlines(5, 3))
    (tracts / "projection").mkdir()
    with open(plain, "rb") as source, gzip.open(tracts / "projection" / "CST_R.trk.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    merged = merge_trk_to_tck(tracts, tmp_path / "merged.tck")
    assert len(nib.streamlines.load(str(merged)).streamlines) == 15
    everything = merge_trk_to_tck(tracts, tmp_path / "all.tck", exclude_patterns=[])
    assert len(nib.streamlines.load(str(everything)).streamlines) == 22
    with pytest.raises(ValueError, match="no .trk"):
        merge_trk_to_tck(tracts, tmp_path / "none.tck", exclude_patterns=["trk"])
