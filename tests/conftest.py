"""Shared fixtures: real atlases from ../shared, an isolated data cache, mask writers."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lacuna.core.spaces import Grid, standard_grid

SHARED_ATLASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases"
CLOSED_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own empty data cache and no network source."""
    cache = tmp_path_factory.mktemp("lacuna_cache")
    monkeypatch.setenv("LACUNA_DATA_DIR", str(cache))
    monkeypatch.delenv("LACUNA_DATA_PATH", raising=False)
    # No test may reach the internet: every source points at a closed local port unless
    # the test starts its own server and says so.
    for variable in ("LACUNA_ATLAS_URL", "LACUNA_TEMPLATEFLOW_URL", "LACUNA_DATAVERSE_URL", "LACUNA_FIGSHARE_API_URL", "LACUNA_HCP1065_URL"):
        monkeypatch.setenv(variable, CLOSED_URL)
    try:
        from lacuna.resources.parcellations import clear_parcellation_cache

        clear_parcellation_cache()
    except ImportError:
        pass
    return cache


@pytest.fixture(scope="session")
def shared_atlases() -> Path:
    """Folder of real public atlases (Schaefer 2018, Tian, HCP1065)."""
    if not SHARED_ATLASES.is_dir():
        pytest.skip("../shared/data/atlases not available")
    return SHARED_ATLASES


def save_mask(path: Path, data: np.ndarray, affine: np.ndarray, sidecar: dict | None = None) -> Path:
    """Write a mask NIfTI (and optional JSON sidecar) creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return path


def sphere(grid: Grid, centre_mm, radius_mm) -> np.ndarray:
    """uint8 sphere of voxel centres within ``radius_mm`` of ``centre_mm`` (plain numpy)."""
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    inside = np.linalg.norm(xyz - np.asarray(centre_mm, float), axis=1) <= radius_mm
    return inside.reshape(grid.shape).astype(np.uint8)


@pytest.fixture
def grid_1mm() -> Grid:
    return standard_grid("MNI152NLin6Asym", 1)


@pytest.fixture
def grid_2mm() -> Grid:
    return standard_grid("MNI152NLin6Asym", 2)


def write_bids_dataset(root: Path, masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A minimal BIDS dataset: ``masks`` maps relative paths to (data, affine)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    for relative, (data, affine) in masks.items():
        save_mask(root / relative, data, affine)
    return root


@pytest.fixture
def static_server():
    """Start HTTP servers on 127.0.0.1 serving folders; yields ``serve(folder) -> base URL``."""
    from fake_servers import FolderServer

    with ExitStack() as servers:
        yield lambda folder: servers.enter_context(FolderServer(folder)).url


def write_itk_transform(path: Path, affine_lps: np.ndarray | None = None, field=None) -> Path:
    """Write an ITK composite transform (HDF5) as ANTs/TemplateFlow do.

    ``affine_lps``: 4x4 matrix mapping reference (fixed) LPS points to moving LPS points.
    ``field``: (displacements (X, Y, Z, 3) in LPS mm, origin LPS, spacing) on an
    axis-aligned LPS grid; moving point = fixed point + displacement.
    """
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("TransformGroup")
        composite = group.create_group("0")
        composite["TransformType"] = np.array([b"CompositeTransform_double_3_3"])
        index = 1
        if affine_lps is not None:
            node = group.create_group(str(index))
            node["TransformType"] = np.array([b"AffineTransform_double_3_3"])
            node["TransformParameters"] = np.concatenate([affine_lps[:3, :3].ravel(), affine_lps[:3, 3]])
            node["TransformFixedParameters"] = np.zeros(3)
            index += 1
        if field is not None:
            displacements, origin, spacing = field
            node = group.create_group(str(index))
            node["TransformType"] = np.array([b"DisplacementFieldTransform_float_3_3"])
            # ITK order: the vector components vary fastest, then x, y, z.
            node["TransformParameters"] = np.moveaxis(displacements, -1, 0).ravel(order="F")
            node["TransformFixedParameters"] = np.concatenate(
                [displacements.shape[:3], origin, spacing, np.eye(3).ravel()]
            ).astype(float)
    return path
