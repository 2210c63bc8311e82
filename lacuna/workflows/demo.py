"""``lacuna demo``: a small SYNTHETIC dataset, parcellation and connectome, run offline.

Nothing here is real data. The lesions are spheres; the parcellation
``SyntheticDemo_16Parcels`` cuts an ellipsoid "brain" into 16 blocks (hemisphere x 4
antero-posterior bands x inferior/superior); the functional connectome
``SyntheticDemo.h5`` holds a few subjects of random timeseries sharing one signal per
block. It exists so a new user can see every output of Lacuna within seconds, without
downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.workflows.config import RunConfig
from lacuna.workflows.participant import run_participant
from lacuna.core.spaces import Grid, standard_grid
from lacuna.workflows.group import run_group
from lacuna.bids.validation import validate_bids_derivatives

DEMO_ATLAS = "SyntheticDemo_16Parcels"
_BANDS = ("occipital", "parietal", "central", "frontal")

# (subject, session, label, resolution mm, centre mm, radius mm, name has space/res?)
_LESIONS = (
    ("01", "01", "acuteinfarct", 2, (-30, -20, 10), 12, True),
    ("01", "02", "acuteinfarct", 2, (-30, -20, 10), 9, True),
    ("02", None, "lesion", 1, (25, 30, 30), 15, True),
    ("03", None, "lesion", 2, (0, -70, 20), 10, False),
    ("04", None, "lesion", 1, (-40, 10, -5), 20, True),
)


def grid_coordinates(grid: Grid) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, shape (X, Y, Z, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    return ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def sphere_mask(grid: Grid, centre_mm, radius_mm: float) -> np.ndarray:
    """Boolean sphere on a grid (voxel centres within the radius)."""
    distance = np.linalg.norm(grid_coordinates(grid) - np.asarray(centre_mm, float), axis=-1)
    return distance <= radius_mm


def synthetic_parcellation(grid: Grid) -> tuple[np.ndarray, list[str]]:
    """The 16-block SYNTHETIC parcellation on ``grid``: labels array and names."""
    xyz = grid_coordinates(grid)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    inside = ((x / 68) ** 2 + ((y + 18) / 92) ** 2 + ((z - 12) / 62) ** 2) <= 1
    hemisphere = (x >= 0).astype(int)  # 0 left, 1 right
    band = np.clip(((y + 110) // 45).astype(int), 0, 3)
    level = (z >= 12).astype(int)
    labels = np.where(inside, 1 + hemisphere * 8 + band * 2 + level, 0).astype(np.int16)
    names = [
        f"Synthetic_{hemi}_{band_name}_{level_name}"
        for hemi in ("LH", "RH")
        for band_name in _BANDS
        for level_name in ("inferior", "superior")
    ]
    return labels, names


def _save(data: np.ndarray, grid: Grid, path: Path) -> None:
    img = nib.Nifti1Image(data, grid.affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(grid.affine, code=4)
    img.set_sform(grid.affine, code=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def write_demo_atlas(atlas_dir: Path) -> None:
    """Write the SYNTHETIC parcellation in TemplateFlow-style names into ``atlas_dir``."""
    grid = standard_grid("MNI152NLin6Asym", 2)
    labels, names = synthetic_parcellation(grid)
    stem = "tpl-MNI152NLin6Asym_res-02_atlas-SyntheticDemo_desc-16Parcels_dseg"
    _save(labels, grid, atlas_dir / f"{stem}.nii.gz")
    (atlas_dir / f"{stem}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")


def write_demo_connectome(path: Path, n_subjects: int = 5, n_timepoints: int = 40) -> Path:
    """Write the SYNTHETIC functional connectome: per subject, every voxel of a block
    follows that block's random signal plus noise (so lesions map onto their block)."""
    from lacuna.formats.functional_connectome import ConnectomeWriter

    grid = standard_grid("MNI152NLin6Asym", 2)
    labels, _ = synthetic_parcellation(grid)
    indices = np.array(np.nonzero(labels))
    blocks = labels[tuple(indices)] - 1
    rng = np.random.default_rng(2024)
    with ConnectomeWriter(
        path, n_subjects, n_timepoints, indices, grid.affine, grid.shape, "MNI152NLin6Asym", 2.0,
        dtype="float16", attributes={"source": "SYNTHETIC demo data, not a real connectome"},
    ) as writer:
        for _ in range(n_subjects):
            signals = rng.standard_normal((n_timepoints, 16), dtype=np.float32)
            noise = rng.standard_normal((n_timepoints, blocks.size), dtype=np.float32)
            writer.write((signals[:, blocks] + 1.5 * noise).astype(np.float16))
    return path


def write_demo_dataset(bids_dir: Path) -> list[Path]:
    """Write the SYNTHETIC BIDS dataset of lesion masks; returns the mask paths."""
    bids_dir.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": "Lacuna demo: SYNTHETIC lesion masks (not real data)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
    }
    (bids_dir / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (bids_dir / "README").write_text("Synthetic spherical lesion masks generated by `lacuna demo`.\n")
    paths = []
    for subject, session, label, resolution, centre, radius, named in _LESIONS:
        grid = standard_grid("MNI152NLin6Asym", resolution)
        folder = bids_dir / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        if named:
            name = f"{prefix}_space-MNI152NLin6Asym_res-{resolution}_label-{label}_mask.nii.gz"
        else:  # space and resolution declared in the sidecar only
            name = f"{prefix}_label-{label}_mask.nii.gz"
            sidecar = {"SpatialReference": "MNI152NLin6Asym", "Resolution": f"{resolution} mm isotropic"}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")
        _save(sphere_mask(grid, centre, radius).astype(np.uint8), grid, folder / name)
        paths.append(folder / name)
    return paths


def run_demo(out_dir: str | Path, nprocs: int = 1) -> str:
    """Create the demo inputs in ``out_dir``, run both levels, validate; return a report."""
    out_dir = Path(out_dir).resolve()
    bids_dir, atlas_dir = out_dir / "bids", out_dir / "atlases"
    derivatives = out_dir / "derivatives" / "lacuna"
    write_demo_atlas(atlas_dir)
    connectome = write_demo_connectome(out_dir / "connectome" / "SyntheticDemo.h5")
    masks = write_demo_dataset(bids_dir)
    config = RunConfig(
        bids_dir=bids_dir,
        output_dir=derivatives,
        analysis_level="participant",
        atlases=(DEMO_ATLAS,),
        atlas_dir=atlas_dir,
        nprocs=nprocs,
        overwrite=True,
        functional_connectomes=(str(connectome),),
        output_space="analysis",  # keep the demo light: maps on the 2 mm connectome grid
        skip_bids_validation=True,  # the demo's masks are named like derivatives, as usual
    )
    participant = run_participant(config)
    group = run_group(derivatives)
    report = validate_bids_derivatives(derivatives, raise_on_error=True)
    return "\n".join(
        [
            f"demo dataset (SYNTHETIC): {bids_dir} ({len(masks)} masks), connectome {connectome}",
            participant.text(),
            f"group level: {len(group.masks)} mask(s); outputs in {derivatives / 'group'}",
            f"validation: {len(report['errors'])} error(s), {len(report['warnings'])} warning(s)",
            f"derivatives: {derivatives}",
        ]
    )
