"""ATLAS v2.0 as distributed (Liew et al. 2022): one site folder through both levels.

Masks are named as ATLAS ships them (``space-MNI152NLin2009aSym_label-L_desc-T1lesion``)
on the ICBM 2009a 1 mm grid (197 x 233 x 189, RAS, origin (-98, -134, -72)), with the
T1w image beside each. The 2009a frame is analysed as MNI152NLin2009cAsym; the move to
the Schaefer atlas (MNI152NLin6Asym) uses a TemplateFlow transform served from a local
folder, here the identity, so the expected damage is plain numpy re-indexing.
"""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import write_itk_transform
from lacuna.io import validate_bids_derivatives
from test_bids_app import ATLAS, ATLAS_ROOT, _bids_validator, counts, lacuna

GRID_SHAPE = (197, 233, 189)
GRID_AFFINE = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
SPACE = "MNI152NLin2009aSym"
SUBJECTS = ("r001s001", "r001s002", "r001s003")
CENTRES_MM = ((-40, -20, 40), (35, 10, 30), (-20, -70, 20))


def _mask_name(subject: str, suffix: str = "label-L_desc-T1lesion_mask") -> str:
    return f"sub-{subject}/ses-1/anat/sub-{subject}_ses-1_space-{SPACE}_{suffix}.nii.gz"


def _ball(centre) -> np.ndarray:
    ijk = np.indices(GRID_SHAPE).reshape(3, -1).T
    xyz = ijk + GRID_AFFINE[:3, 3]
    return (np.linalg.norm(xyz - np.array(centre), axis=1) <= 9).reshape(GRID_SHAPE).astype(np.uint8)


def _atlas_site(root, with_description: bool = True):
    masks = {}
    for subject, centre in zip(SUBJECTS, CENTRES_MM):
        mask = _ball(centre)
        for relative, data in ((_mask_name(subject), mask), (_mask_name(subject, "T1w"), np.random.default_rng(0).random(GRID_SHAPE, np.float32))):
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, GRID_AFFINE), path)
        masks[subject] = mask
    if with_description:
        (root / "dataset_description.json").write_text(json.dumps({"Name": "ATLAS R001", "BIDSVersion": "1.10.0"}))
    return masks


@pytest.fixture
def identity_transforms(tmp_path, monkeypatch):
    store = tmp_path / "templateflow-mirror"
    for target, source in (("MNI152NLin6Asym", "MNI152NLin2009cAsym"), ("MNI152NLin2009cAsym", "MNI152NLin6Asym")):
        write_itk_transform(store / f"tpl-{target}" / f"tpl-{target}_from-{source}_mode-image_xfm.h5", affine_lps=np.eye(4))
    monkeypatch.setenv("LACUNA_TEMPLATEFLOW_URL", str(store))  # a local folder as the mirror


def _on_fsl_grid(mask: np.ndarray) -> np.ndarray:
    """The 2009a-grid mask on the FSL 1 mm grid under the identity (integer re-indexing)."""
    out = np.zeros((182, 218, 182), bool)
    j = np.arange(182)
    i = (90 - j) + 98  # x = 90 - j on the FSL grid, x = -98 + i on the 2009a grid
    jy, jz = np.arange(218), np.arange(182)
    iy, iz = jy - 126 + 134, jz - 72 + 72
    ok = [(i >= 0) & (i < GRID_SHAPE[0]), (iy >= 0) & (iy < GRID_SHAPE[1]), (iz >= 0) & (iz < GRID_SHAPE[2])]
    out[np.ix_(j[ok[0]], jy[ok[1]], jz[ok[2]])] = mask[np.ix_(i[ok[0]], iy[ok[1]], iz[ok[2]])] > 0
    return out


def test_a_site_folder_without_dataset_description_is_refused_with_the_fix(tmp_path):
    site = tmp_path / "R001"
    _atlas_site(site, with_description=False)
    result = lacuna(site, tmp_path / "out", "participant", "--atlas-dir", ATLAS_ROOT, "--atlas", ATLAS)
    assert result.exit_code == 16
    assert "dataset_description.json" in result.output and "Add one" in result.output


def test_atlas_site_runs_through_participant_and_group(tmp_path, identity_transforms, monkeypatch):
    from lacuna.core import subject

    monkeypatch.setattr(subject, "_warned_frames", set())  # warned once per process: not by an earlier test
    site = tmp_path / "R001"
    masks = _atlas_site(site)
    out = tmp_path / "out"
    result = lacuna(site, out, "participant", "--atlas-dir", ATLAS_ROOT, "--atlas", ATLAS)
    assert result.exit_code == 0, result.output
    assert counts(result) == (3, 3, 0, 0)  # the T1w images are not masks
    assert "treated as the coordinate system of MNI152NLin2009cAsym" in result.output

    labels = np.asanyarray(nib.load(ATLAS_ROOT / "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz").dataobj).astype(int)
    sizes = np.bincount(labels.ravel(), minlength=101)[1:]
    for subject in SUBJECTS:
        anat = out / f"sub-{subject}" / "ses-1" / "anat"
        stem = f"sub-{subject}_ses-1"
        # The mask's own entities are all kept: space as declared, label-L and desc-T1lesion.
        mask_out = anat / f"{stem}_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"
        assert mask_out.is_file()
        np.testing.assert_array_equal(np.asanyarray(nib.load(mask_out).dataobj), masks[subject])
        assert (anat / f"{stem}_label-L_desc-T1lesion_provenance.json").is_file()
        tables = sorted(anat.glob(f"{stem}_space-{SPACE}_atlas-Schaefer2018_seg-100Parcels7Networks_label-L_desc-T1lesion*_parcelstats.tsv"))
        assert tables, sorted(p.name for p in anat.iterdir())
        table = pd.read_csv(tables[0], sep="\t")
        hits = np.bincount(labels[_on_fsl_grid(masks[subject])], minlength=101)[1:]
        np.testing.assert_allclose(table["percent_damaged"].to_numpy(), 100 * hits / sizes, rtol=1e-9)
        assert hits.sum() > 100
        assert not list(anat.glob("*T1w*"))
        provenance = json.loads((anat / f"{stem}_label-L_desc-T1lesion_provenance.json").read_text())
        load = next(step for step in provenance["steps"] if step["name"] == "load")
        assert any("MNI152NLin2009aSym treated as the coordinate system" in note for note in load["notes"])

    report = validate_bids_derivatives(out, raise_on_error=False)
    assert report["errors"] == [], report["errors"]
    validator = _bids_validator()
    if validator is not None:  # the official validator, when installed
        proc = subprocess.run([validator, str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "[ERROR]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    group = lacuna(site, out, "group")
    assert group.exit_code == 0, group.output
    summary = json.loads((out / "group" / "summary.json").read_text())
    assert summary["n_masks"] == 3
    assert {m.get("desc") for m in summary["masks"]} == {"T1lesion"}
    overlap = sorted((out / "group").glob(f"space-{SPACE}_desc-lesioncount_statmap.nii.gz"))
    assert overlap, sorted(p.name for p in (out / "group").iterdir())
    np.testing.assert_array_equal(np.asanyarray(nib.load(overlap[0]).dataobj), sum(m.astype(np.float32) for m in masks.values()))
