"""The fast NIfTI writer gives the files nibabel writes; isal and zlib give the same data."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from lacuna.core import compression
from lacuna.core.nifti_files import binary_mask_bytes, binary_mask_image, float_map_bytes, float_map_image
from lacuna.core.spaces import standard_grid


@pytest.mark.parametrize("order", ["C", "F"])
def test_float_map_bytes_equal_nibabel_save(tmp_path, order):
    grid = standard_grid("MNI152NLin6Asym", 2)
    data = np.asarray(np.random.default_rng(0).standard_normal(grid.shape), dtype=np.float32, order=order)
    nib.save(float_map_image(data, grid.affine), tmp_path / "reference.nii")
    assert float_map_bytes(data, grid.affine, "map.nii") == (tmp_path / "reference.nii").read_bytes()
    assert float_map_bytes(data * 2, grid.affine, "map.nii")[:352] == (tmp_path / "reference.nii").read_bytes()[:352]


def _reference_mask_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The mask image as nibabel makes it, step by step (uint8, mm, codes 4)."""
    img = nib.Nifti1Image(data.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=4)
    img.set_sform(affine, code=4)
    return img


_OBLIQUE = np.array([[1.1, 0.2, 0.0, -80.0], [-0.1, 0.9, 0.3, 20.0], [0.05, -0.2, 1.3, 5.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("affine", "shape", "order"),
    [
        (standard_grid("MNI152NLin6Asym", 2).affine, standard_grid("MNI152NLin6Asym", 2).shape, "C"),
        (standard_grid("MNI152NLin2009cAsym", 1).affine, standard_grid("MNI152NLin2009cAsym", 1).shape, "F"),
        (np.diag([3.0, -1.5, 2.2, 1.0]), (20, 30, 25), "C"),
        (_OBLIQUE, (31, 27, 29), "F"),
    ],
)
def test_mask_images_and_bytes_equal_nibabel(tmp_path, affine, shape, order):
    """Mask images (their header copied after the first of a grid) and the lesion mask
    as written (header bytes made once per grid) are byte for byte nibabel's, for the
    first mask of a grid and the next."""
    for seed in (0, 1):
        data = np.asarray(np.random.default_rng(seed).uniform(size=shape) < 0.05, dtype=np.uint8, order=order)
        reference = _reference_mask_image(data, affine)
        nib.save(reference, tmp_path / "reference.nii")
        assert binary_mask_image(data, affine).to_bytes() == (tmp_path / "reference.nii").read_bytes()
        assert bytes(binary_mask_bytes(data, affine, "mask.nii")) == (tmp_path / "reference.nii").read_bytes()
        written = tmp_path / "mask.nii.gz"
        written.write_bytes(binary_mask_bytes(data, affine, written.name))
        assert gzip.decompress(written.read_bytes()) == (tmp_path / "reference.nii").read_bytes()


@pytest.mark.parametrize("stored_values", [False, True])
def test_compressed_maps_read_back_exactly(tmp_path, stored_values):
    grid = standard_grid("MNI152NLin6Asym", 2)
    data = np.random.default_rng(1).standard_normal(grid.shape).astype(np.float32)
    path = tmp_path / "map.nii.gz"
    path.write_bytes(float_map_bytes(data, grid.affine, path.name, stored_values=stored_values))
    img = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, grid.affine)
    assert img.header.get_xyzt_units()[0] == "mm" and int(img.header["sform_code"]) == 4


def test_isal_and_zlib_write_the_same_content(monkeypatch):
    payload = np.random.default_rng(2).standard_normal(100_000).astype(np.float32).tobytes() + bytes(200_000)
    fast = compression.gzip_bytes(payload)
    monkeypatch.setattr(compression, "_fast_gzip", None)
    plain = compression.gzip_bytes(payload)
    assert gzip.decompress(fast) == gzip.decompress(plain) == payload
    assert fast[4:8] == plain[4:8] == bytes(4)  # gzip header mtime 0: identical maps, identical files
