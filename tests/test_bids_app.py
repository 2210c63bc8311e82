"""End-to-end tests of the BIDS App through its command line.

Every run goes through ``lacuna.cli.main.cli`` (with the argument pre-processing of the
console script) or through the installed ``lacuna`` executable where a real process
matters (killing a run). Numbers are checked against plain numpy computations on the
real Schaefer 2018 atlas from ``../shared/data/atlases``; the standard grids are written
out here by hand (not taken from lacuna).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import save_mask, write_bids_dataset

from lacuna.cli.main import cli, expand_multi_value_options
from lacuna.bids.validation import validate_bids_derivatives

# ----------------------------------------------------------------------------- constants

SPACE = "MNI152NLin6Asym"
ATLAS = "Schaefer2018_100Parcels7Networks"
ATLAS_200 = "Schaefer2018_200Parcels7Networks"
ATLAS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases"


def _affine(step: float, axes=(-1, 1, 1), origin=(90.0, -126.0, -72.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag([a * step for a in axes])
    affine[:3, 3] = origin
    return affine


#: MNI152NLin6Asym (FSL) grids, LAS, written out independently of lacuna.
SHAPE_1MM, AFFINE_1MM = (182, 218, 182), _affine(1)
SHAPE_2MM, AFFINE_2MM = (91, 109, 91), _affine(2)
#: MNI152NLin2009cAsym 2 mm grid (TemplateFlow), RAS.
SHAPE_2009C_2MM, AFFINE_2009C_2MM = (97, 115, 97), _affine(2, (1, 1, 1), (-96.5, -132.5, -78.5))

#: Cortical points (mm) where the Schaefer atlas has parcels.
CENTRES = [(-40, -25, 55), (42, 20, 30), (-30, -85, 5), (48, -55, 35), (-52, 8, 5), (10, 50, 30), (-8, -60, 40), (35, -20, 60)]

SUMMARY = re.compile(r"participant level: (\d+) mask\(s\): (\d+) done, (\d+) skipped, (\d+) failed")

pytestmark = pytest.mark.skipif(not ATLAS_ROOT.is_dir(), reason=f"{ATLAS_ROOT} not available")


# ------------------------------------------------------------------------------ helpers


def ball(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    """uint8 ball of voxel centres within ``radius_mm`` of ``centre_mm`` (only a box is computed)."""
    inverse = np.linalg.inv(affine)
    centre_vox = inverse[:3, :3] @ np.asarray(centre_mm, float) + inverse[:3, 3]
    reach = radius_mm / np.abs(np.diag(affine)[:3]).min() + 2
    low = np.clip(np.floor(centre_vox - reach).astype(int), 0, shape)
    high = np.clip(np.ceil(centre_vox + reach).astype(int) + 1, 0, shape)
    ijk = np.indices(tuple(high - low)).reshape(3, -1).T + low
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(xyz - np.asarray(centre_mm, float), axis=1) <= radius_mm
    out = np.zeros(shape, np.uint8)
    out[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = inside.reshape(tuple(high - low))
    assert out.sum() > 0
    return out


def ball_1mm(index: int, radius: float = 7) -> np.ndarray:
    return ball(SHAPE_1MM, AFFINE_1MM, CENTRES[index % len(CENTRES)], radius)


def ball_2mm(index: int, radius: float = 8) -> np.ndarray:
    return ball(SHAPE_2MM, AFFINE_2MM, CENTRES[index % len(CENTRES)], radius)


def _shifted(affine: np.ndarray, dx_mm: float) -> np.ndarray:
    """``affine`` moved by ``dx_mm`` along x: off every template grid."""
    moved = affine.copy()
    moved[0, 3] += dx_mm
    return moved


def mask_name(sub: str, ses: str | None = None, label: str = "lesion", space: str | None = SPACE) -> str:
    """Relative path of a mask in a raw dataset."""
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat/"
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"space-{space}"] if space else []) + [f"label-{label}", "mask.nii.gz"]
    return folder + "_".join(parts)


def lacuna(*args, cwd: Path | None = None):
    """Invoke the CLI in-process like the console script does; unexpected exceptions propagate."""
    argv = expand_multi_value_options([str(a) for a in args])
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        result = runner.invoke(cli, argv, prog_name="lacuna")
    finally:
        if cwd is not None:
            os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"lacuna {' '.join(argv)} raised:\n{result.output}") from result.exception
    return result


def participant(bids: Path, out: Path, *options, atlases=(ATLAS,)):
    args = [bids, out, "participant", "--atlas-dir", ATLAS_ROOT]
    for atlas in atlases:
        args += ["--atlas", atlas]
    return lacuna(*args, *options)


def counts(result) -> tuple[int, int, int, int]:
    """(total, done, skipped, failed) from the participant summary on stdout."""
    match = SUMMARY.search(result.stdout)
    assert match, f"no participant summary in:\n{result.output}"
    return tuple(int(g) for g in match.groups())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance_path(out: Path, sub: str, ses: str | None = None, label: str = "lesion") -> Path:
    folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    return folder / ("_".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + [f"label-{label}", "provenance.json"]))


def assert_complete(out: Path, sub: str, ses: str | None = None, label: str = "lesion") -> dict:
    """The mask's provenance exists and every output it lists exists with its checksum."""
    path = provenance_path(out, sub, ses, label)
    assert path.is_file(), f"missing {path}"
    record = json.loads(path.read_text())
    listed = [item["path"] for item in record["outputs"]]
    assert any(p.endswith("_mask.nii.gz") for p in listed)
    assert any(p.endswith("_parcelstats.tsv") for p in listed)
    for item in record["outputs"]:
        assert sha256(out / item["path"]) == item["sha256"], item["path"]
    return record


def assert_valid(out: Path) -> None:
    report = validate_bids_derivatives(out, raise_on_error=False)
    assert report["errors"] == [], report["errors"]


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def table(out: Path, sub: str, atlas: str = ATLAS, ses: str | None = None, label: str = "lesion") -> Path:
    atlas_entity, seg = atlas.split("_")
    prefix = "_".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []))
    folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    return folder / f"{prefix}_space-{SPACE}_atlas-{atlas_entity}_seg-{seg}_label-{label}_desc-regionaldamage_parcelstats.tsv"


# --------------------------------------------------------------- independent reference


@lru_cache(maxsize=None)
def schaefer(atlas: str = ATLAS) -> tuple[np.ndarray, list[str]]:
    """Label array (int) and region names of a Schaefer atlas, read with nibabel only."""
    atlas_entity, desc = atlas.split("_")
    stem = f"tpl-MNI152NLin6Asym_res-01_atlas-{atlas_entity}_desc-{desc}_dseg"
    img = nib.load(ATLAS_ROOT / f"{stem}.nii.gz")
    assert img.shape == SHAPE_1MM and np.allclose(img.affine, AFFINE_1MM)
    labels = np.rint(np.asanyarray(img.dataobj)).astype(np.int64)
    names = [line.strip() for line in (ATLAS_ROOT / f"{stem}.txt").read_text().splitlines() if line.strip()]
    assert labels.max() == len(names)
    return labels, names


def expected_damage(mask_1mm: np.ndarray, atlas: str = ATLAS) -> tuple[np.ndarray, np.ndarray]:
    """(lesioned voxels, percent damaged) per parcel: bincount under the mask / parcel size."""
    labels, names = schaefer(atlas)
    n = len(names)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hits = np.bincount(labels[mask_1mm.astype(bool)], minlength=n + 1)[1 : n + 1]
    assert (sizes > 0).all()
    return hits.astype(float), hits / sizes * 100.0


def upsample_2mm_to_1mm(mask_2mm: np.ndarray) -> np.ndarray:
    """A 2 mm mask on the 1 mm grid by the half-coverage rule, in plain numpy.

    The grids share origin and orientation, so 1 mm voxel j lies at 2 mm index j/2: an even
    j sits inside one 2 mm voxel, an odd j straddles two halves. The covered fraction is
    thus separable linear interpolation; lesioned where at least half is covered.
    """
    data = mask_2mm.astype(float)
    for axis, n in enumerate(SHAPE_1MM):
        padded = np.concatenate([data, np.zeros_like(np.take(data, [0], axis=axis))], axis=axis)
        j = np.arange(n)
        low = np.take(padded, j // 2, axis=axis)
        high = np.take(padded, j // 2 + (j % 2), axis=axis)
        data = (low + high) / 2
    return data >= 0.5


TIAN = "TianSubcortex_3TS1"
#: The Tian S1 file is named res-01 but is a 2 mm RAS grid of 97x115x97 (pitfalls 1, 2, 13).
TIAN_STEM = "tpl-MNI152NLin6Asym_res-01_atlas-TianSubcortex_desc-3TS1_dseg"


def expected_tian_damage(mask_1mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(lesioned voxels, percent damaged, names) of the Tian S1 atlas, plain numpy.

    Tian voxel (i, j, k) (centre -96.5 + 2i, -132.5 + 2j, -78.5 + 2k) covers exactly the
    2x2x2 block of 1 mm FSL voxels (181 - a, b, c) with a in {2i-6, 2i-5}, b in {2j-7, 2j-6},
    c in {2k-7, 2k-6}; a Tian voxel is lesioned when at least 4 of its 8 are.
    """
    img = nib.load(ATLAS_ROOT / f"{TIAN_STEM}.nii.gz")
    assert img.shape == SHAPE_2009C_2MM and np.allclose(img.affine, AFFINE_2009C_2MM)
    labels = np.rint(np.asanyarray(img.dataobj)).astype(np.int64)
    names = [line.strip() for line in (ATLAS_ROOT / f"{TIAN_STEM}.txt").read_text().splitlines() if line.strip()]
    big = np.zeros((2 * 97, 2 * 115, 2 * 97))
    big[6 : 6 + 182, 7 : 7 + 218, 7 : 7 + 182] = mask_1mm[::-1]
    lesion = big.reshape(97, 2, 115, 2, 97, 2).mean(axis=(1, 3, 5)) >= 0.5
    n = len(names)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hits = np.bincount(labels[lesion], minlength=n + 1)[1 : n + 1].astype(float)
    return hits, hits / sizes * 100.0, names


def check_tian_table(path: Path, mask_1mm: np.ndarray) -> None:
    frame = pd.read_csv(path, sep="\t", keep_default_na=False)
    hits, percent, names = expected_tian_damage(mask_1mm)
    assert frame["name"].tolist() == names
    np.testing.assert_array_equal(frame["lesioned_voxels"].to_numpy(float), hits)
    np.testing.assert_allclose(frame["lesioned_volume_mm3"].to_numpy(float), hits * 8.0, rtol=1e-12)
    np.testing.assert_allclose(frame["percent_damaged"].to_numpy(float), percent, rtol=1e-10, atol=1e-12)


def check_table(path: Path, mask_1mm: np.ndarray, atlas: str = ATLAS) -> None:
    """A participant parcel table equals the numpy reference."""
    frame = pd.read_csv(path, sep="\t", keep_default_na=False)
    _, names = schaefer(atlas)
    hits, percent = expected_damage(mask_1mm, atlas)
    assert list(frame.columns) == ["index", "name", "lesioned_voxels", "lesioned_volume_mm3", "percent_damaged"]
    assert frame["index"].tolist() == list(range(1, len(names) + 1))
    assert frame["name"].tolist() == names
    np.testing.assert_array_equal(frame["lesioned_voxels"].to_numpy(float), hits)
    np.testing.assert_allclose(frame["lesioned_volume_mm3"].to_numpy(float), hits * 1.0, rtol=1e-12)
    np.testing.assert_allclose(frame["percent_damaged"].to_numpy(float), percent, rtol=1e-10, atol=1e-12)
    assert hits.sum() > 0  # the test lesion really touches parcels


@pytest.fixture
def good_dataset(tmp_path):
    """Three 1 mm masks (sub-01..03) and their arrays."""
    masks = {mask_name(f"0{i}"): (ball_1mm(i - 1), AFFINE_1MM) for i in (1, 2, 3)}
    return write_bids_dataset(tmp_path / "bids", masks), {k.split("/")[0][4:]: v[0] for k, v in masks.items()}


# ------------------------------------------------------------------ 1. bad masks


def _truncated(path: Path) -> None:
    save_mask(path, ball_2mm(1), AFFINE_2MM)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _nonbinary():
    data = ball_2mm(1).astype(np.float32)
    i, j, k = np.nonzero(data)
    data[i[:10], j[:10], k[:10]] = 0.5
    assert set(np.unique(data)) == {0.0, 0.5, 1.0}
    return data


def _with_nan():
    data = ball_2mm(1).astype(np.float32)
    data[0, 0, 0] = np.nan
    return data


def _with_degenerate_affine(path):
    img = nib.Nifti1Image(ball_2mm(1), None)
    img.set_sform(np.diag([2.0, 2.0, 0.0, 1.0]), code=2)  # the z axis collapsed
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _without_spatial_transform(path):
    img = nib.Nifti1Image(ball_2mm(1), AFFINE_2MM)
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


BAD_MASKS = {
    # case: (file name of sub-02's mask, writer, words the message must contain)
    "empty": (mask_name("02"), lambda p: save_mask(p, np.zeros(SHAPE_2MM, np.uint8), AFFINE_2MM), ["empty"]),
    "nonbinary": (mask_name("02"), lambda p: save_mask(p, _nonbinary(), AFFINE_2MM), ["not binary"]),
    "4d": (
        mask_name("02"),
        lambda p: save_mask(p, np.stack([ball_2mm(1), ball_2mm(2)], axis=-1), AFFINE_2MM),
        ["3-D", "(91, 109, 91, 2)"],
    ),
    "nan": (mask_name("02"), lambda p: save_mask(p, _with_nan(), AFFINE_2MM), ["NaN"]),
    "truncated": (mask_name("02"), _truncated, ["cannot be read"]),
    "garbage": (mask_name("02"), _garbage, ["cannot be read"]),
    # Any grid of the space is accepted (moved by its affine); what cannot be a brain
    # lesion in the declared space is not.
    "scanner-space": (  # a native-space mask: its lesion lies 400 mm from the template's box
        mask_name("02"),
        lambda p: save_mask(p, ball_2mm(1), _shifted(AFFINE_2MM, 400.0)),
        ["field of view", "x 4", "--mask-transform"],
    ),
    "degenerate-affine": (
        mask_name("02"),
        _with_degenerate_affine,
        ["degenerate", "voxel sizes"],
    ),
    "no-spatial-transform": (mask_name("02"), _without_spatial_transform, ["sform_code and qform_code"]),
    "space-MNI305": (
        mask_name("02", space="MNI305"),
        lambda p: save_mask(p, ball_2mm(1), AFFINE_2MM),
        ["MNI305", "unsupported"],
    ),
    "sidecar-MNI305": (
        mask_name("02", space=None),
        lambda p: save_mask(p, ball_2mm(1), AFFINE_2MM, sidecar={"SpatialReference": "MNI305"}),
        ["MNI305", "unsupported"],
    ),
    "no-space": (  # no space declared, and a grid 1 mm off the template's
        mask_name("02", space=None),
        lambda p: save_mask(p, ball_2mm(1), _shifted(AFFINE_2MM, 1.0)),
        ["no coordinate space"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_mask_fails_alone(tmp_path, case):
    relative, writer, words = BAD_MASKS[case]
    good = ball_1mm(0)
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (good, AFFINE_1MM), mask_name("03"): (ball_1mm(2), AFFINE_1MM)})
    writer(bids / relative)
    out = tmp_path / "out"

    result = participant(bids, out)

    assert result.exit_code == 1, result.output
    assert counts(result) == (3, 2, 0, 1)
    bad_name = Path(relative).name
    failed_lines = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert len(failed_lines) == 1 and bad_name in failed_lines[0], result.stdout
    for word in words:
        assert word in failed_lines[0], (word, failed_lines[0])
    # The good participants are complete and valid, with the right numbers.
    assert_complete(out, "01")
    assert_complete(out, "03")
    check_table(table(out, "01"), good)
    assert_valid(out)
    # Nothing was written for the bad mask but its crash record, which says why.
    assert not (out / "sub-02").exists()
    crash = out / "logs" / f"crash_{bad_name.removesuffix('.nii.gz')}.json"
    assert [p for p in out.rglob("*") if "sub-02" in p.name] == [crash]
    assert json.loads(crash.read_text())["error"] in failed_lines[0]


def test_all_bad_masks_in_one_dataset_are_each_reported(tmp_path):
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM)})
    bad = {}
    for i, (case, (relative, writer, _)) in enumerate(BAD_MASKS.items()):
        relative = relative.replace("sub-02", f"sub-bad{i}")
        writer(bids / relative)
        bad[case] = Path(relative).name
    out = tmp_path / "out"
    result = participant(bids, out, "--skip-bids-validation")
    assert result.exit_code == 1
    assert counts(result) == (1 + len(bad), 1, 0, len(bad))
    for name in bad.values():
        assert f"FAILED {name}" in result.stdout
    assert_complete(out, "01")
    assert_valid(out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("sub-")) == ["sub-01"]


# ------------------------------------------------------------- 2. every option


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["--participant-label", "01"], ["01"]),
        (["--participant-label", "sub-02"], ["02"]),
        (["--participant-label", "01", "--participant-label", "sub-03"], ["01", "03"]),
        (["--participant-label", "01", "02"], ["01", "02"]),
        (["--participant-label", "sub-02", "03"], ["02", "03"]),
    ],
)
def test_participant_label(tmp_path, good_dataset, labels, expected):
    bids, masks = good_dataset
    out = tmp_path / "out"
    result = participant(bids, out, *labels)
    assert result.exit_code == 0, result.output
    assert counts(result) == (len(expected), len(expected), 0, 0)
    assert sorted(p.name for p in out.glob("sub-*")) == [f"sub-{s}" for s in expected]
    for sub in expected:
        assert_complete(out, sub)
        check_table(table(out, sub), masks[sub])


def test_participant_label_before_positionals(tmp_path, good_dataset):
    bids, _ = good_dataset
    out = tmp_path / "out"
    result = lacuna("--participant-label", "01", "03", bids, out, "participant", "--atlas-dir", ATLAS_ROOT, "--atlas", ATLAS)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-01", "sub-03"]


def test_session_label(tmp_path):
    masks = {
        mask_name("01", "01"): (ball_1mm(0), AFFINE_1MM),
        mask_name("01", "02"): (ball_1mm(1), AFFINE_1MM),
        mask_name("02", "02"): (ball_1mm(2), AFFINE_1MM),
    }
    bids = write_bids_dataset(tmp_path / "bids", masks)
    out = tmp_path / "out"
    result = participant(bids, out, "--session-label", "02")
    assert result.exit_code == 0, result.output
    assert counts(result) == (2, 2, 0, 0)
    assert sorted(p.relative_to(out).parent.parent.as_posix() for p in out.rglob("*_provenance.json")) == ["sub-01/ses-02", "sub-02/ses-02"]
    check_table(table(out, "01", ses="02"), ball_1mm(1))
    out2 = tmp_path / "out2"
    result = participant(bids, out2, "--session-label", "ses-01", "--participant-label", "01")
    assert result.exit_code == 0, result.output
    assert counts(result) == (1, 1, 0, 0)
    assert_complete(out2, "01", "01")
    check_table(table(out2, "01", ses="01"), ball_1mm(0))


def test_mask_label(tmp_path):
    masks = {
        mask_name("01", label="acuteinfarct"): (ball_1mm(0), AFFINE_1MM),
        mask_name("01", label="chronic"): (ball_1mm(1), AFFINE_1MM),
        mask_name("02", label="chronic"): (ball_1mm(2), AFFINE_1MM),
    }
    bids = write_bids_dataset(tmp_path / "bids", masks)
    out = tmp_path / "out"
    result = participant(bids, out, "--mask-label", "acuteinfarct")
    assert result.exit_code == 0, result.output
    assert counts(result) == (1, 1, 0, 0)
    assert [p.name for p in out.rglob("*_provenance.json")] == ["sub-01_label-acuteinfarct_provenance.json"]
    check_table(table(out, "01", label="acuteinfarct"), ball_1mm(0))
    out2 = tmp_path / "out2"
    result = participant(bids, out2, "--mask-label", "label-chronic", "acuteinfarct")
    assert result.exit_code == 0, result.output
    assert counts(result) == (3, 3, 0, 0)
    check_table(table(out2, "02", label="chronic"), ball_1mm(2))


def test_mask_space(tmp_path):
    good = ball_1mm(3)
    # sub-01 declares no space but lies on the FSL 1 mm template grid: it gets that space.
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01", space=None): (good, AFFINE_1MM)})
    # sub-02 declares an unsupported space in its sidecar; --mask-space overrides it.
    save_mask(bids / mask_name("02", space=None), ball_1mm(4), AFFINE_1MM, sidecar={"SpatialReference": "MNI305"})
    out = tmp_path / "out"
    result = participant(bids, out)
    assert result.exit_code == 1
    assert counts(result) == (2, 1, 0, 1)
    assert "MNI305" in result.stdout and f"{SPACE} 1 mm template grid" in result.output

    result = participant(bids, out, "--mask-space", SPACE)
    assert result.exit_code == 0, result.output
    assert counts(result) == (2, 2, 0, 0)
    assert (out / "sub-01/anat" / f"sub-01_space-{SPACE}_res-1_label-lesion_mask.nii.gz").is_file()
    check_table(table(out, "01"), good)
    check_table(table(out, "02"), ball_1mm(4))
    assert_valid(out)

    bad = participant(bids, tmp_path / "out3", "--mask-space", "MNI305")
    assert bad.exit_code == 64 and "--mask-space" in bad.output  # usage error


@pytest.mark.parametrize("form", ["repeated", "space-separated"])
def test_two_atlases_both_produce_tables(tmp_path, form):
    mask = ball_1mm(1)
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (mask, AFFINE_1MM)})
    out = tmp_path / "out"
    if form == "repeated":
        result = participant(bids, out, atlases=(ATLAS, ATLAS_200))
    else:
        result = lacuna(bids, out, "participant", "--atlas", ATLAS, ATLAS_200, "--atlas-dir", ATLAS_ROOT)
    assert result.exit_code == 0, result.output
    check_table(table(out, "01", ATLAS), mask, ATLAS)
    check_table(table(out, "01", ATLAS_200), mask, ATLAS_200)
    assert_valid(out)
    lacuna(bids, out, "group")
    group_tables = sorted(p.name for p in (out / "group").glob("*PercentDamaged_parcelstats.tsv"))
    assert group_tables == [
        "atlas-Schaefer2018_seg-100Parcels7Networks_desc-regionaldamagePercentDamaged_parcelstats.tsv",
        "atlas-Schaefer2018_seg-200Parcels7Networks_desc-regionaldamagePercentDamaged_parcelstats.tsv",
    ]


def test_atlas_dir(tmp_path, good_dataset):
    bids, _ = good_dataset
    out = tmp_path / "out"
    result = participant(bids, out, "--participant-label", "01")
    assert result.exit_code == 0, result.output
    record = assert_complete(out, "01")
    inputs = [i for step in record["steps"] for i in step.get("inputs", []) if i["role"].startswith("parcellation:")]
    assert [Path(i["path"]).parent for i in inputs] == [ATLAS_ROOT]
    stem = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz"
    assert inputs[0]["sha256"] == sha256(ATLAS_ROOT / stem)
    # A missing folder is a usage error; an atlas not in the folder is named in the error.
    missing = lacuna(bids, tmp_path / "o2", "participant", "--atlas-dir", tmp_path / "nope")
    assert missing.exit_code == 64 and "--atlas-dir" in missing.output
    unknown = participant(bids, tmp_path / "o3", atlases=("NoSuchAtlas_5Parcels",))
    assert unknown.exit_code == 66 and "NoSuchAtlas_5Parcels" in unknown.output  # missing input
    assert not list((tmp_path / "o3").glob("sub-*"))


def test_work_dir(tmp_path, good_dataset):
    bids, _ = good_dataset
    for flag in ("-w", "--work-dir"):
        work, out = tmp_path / f"work{flag}", tmp_path / f"out{flag}"
        result = participant(bids, out, flag, work, "--participant-label", "sub-02", "--nprocs", "1")
        assert result.exit_code == 0, result.output
        config = json.loads((work / "lacuna_participant_config.json").read_text())
        assert config["bids_dir"] == str(bids.resolve())
        assert config["output_dir"] == str(out.resolve())
        assert config["work_dir"] == str(work.resolve())
        assert config["participant_labels"] == ["02"]
        assert config["atlases"] == [ATLAS]
        assert config["atlas_dir"] == str(ATLAS_ROOT.resolve())
        assert config["analysis_level"] == "participant"
        assert not temporaries(work)


def test_nprocs_two_gives_the_same_bytes(tmp_path):
    masks = {mask_name(f"0{i}"): (ball_1mm(i), AFFINE_1MM) for i in range(1, 5)}
    masks[mask_name("05")] = (np.zeros(SHAPE_2MM, np.uint8), AFFINE_2MM)  # fails in its worker
    bids = write_bids_dataset(tmp_path / "bids", masks)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = participant(bids, one, "--nprocs", "1", "--skip-bids-validation")
    r2 = participant(bids, two, "--nprocs", "2", "--skip-bids-validation")
    assert r1.exit_code == 1 and r2.exit_code == 1, r2.output
    assert counts(r1) == counts(r2) == (5, 4, 0, 1)
    assert "FAILED sub-05_space-MNI152NLin6Asym_label-lesion_mask.nii.gz" in r2.stdout and "empty" in r2.stdout
    assert not (two / "sub-05").exists()
    tsv1 = sorted(p.relative_to(one) for p in one.rglob("*.tsv"))
    tsv2 = sorted(p.relative_to(two) for p in two.rglob("*.tsv"))
    assert tsv1 == tsv2 and len(tsv1) == 4
    for rel in tsv1:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    for i in range(1, 5):
        assert_complete(two, f"0{i}")
        check_table(two / [r for r in tsv2 if r.parts[0] == f"sub-0{i}"][0], ball_1mm(i))
    assert_valid(two)


def test_skip_bids_validation(tmp_path, good_dataset):
    bids, _ = good_dataset
    with_report = participant(bids, tmp_path / "a")
    assert with_report.exit_code == 0
    assert "bids-validator" in with_report.output and "does not accept 3 file name(s)" in with_report.output
    without = participant(bids, tmp_path / "b", "--skip-bids-validation")
    assert without.exit_code == 0, without.output
    assert "bids-validator" not in without.output
    assert counts(without) == (3, 3, 0, 0)


def test_overwrite(tmp_path, good_dataset):
    bids, masks = good_dataset
    out = tmp_path / "out"
    first = participant(bids, out, "--participant-label", "01")
    assert counts(first) == (1, 1, 0, 0)
    prov = provenance_path(out, "01")
    before = prov.read_bytes()
    time.sleep(1.05)  # timestamps have a resolution of one second

    again = participant(bids, out, "--participant-label", "01")
    assert again.exit_code == 0
    assert counts(again) == (1, 0, 1, 0)
    assert "--overwrite" in again.output  # the skip says how to recompute
    assert prov.read_bytes() == before

    forced = participant(bids, out, "--participant-label", "01", "--overwrite")
    assert forced.exit_code == 0
    assert counts(forced) == (1, 1, 0, 0)
    old, new = json.loads(before), json.loads(prov.read_text())
    assert new["exported"] != old["exported"]
    assert [s["started"] for s in new["steps"]] != [s["started"] for s in old["steps"]]
    assert_complete(out, "01")
    check_table(table(out, "01"), masks["01"])


def test_verbose_and_quiet(tmp_path):
    empty = np.zeros(SHAPE_1MM, np.uint8)
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM), mask_name("02"): (empty, AFFINE_1MM)})
    runs = {}
    for flags in ([], ["-v"], ["--verbose"], ["-q"], ["--quiet", "--quiet"]):
        result = participant(bids, tmp_path / f"out{'_'.join(flags)}", *flags)
        assert result.exit_code == 1 and counts(result) == (2, 1, 0, 1)
        runs[" ".join(flags)] = result.output
    default, verbose, quiet, quieter = runs[""], runs["-v"], runs["-q"], runs["--quiet --quiet"]
    assert "selected 2 mask(s)" in default and "Traceback" not in default
    assert "does not accept" in default
    for text in (verbose, runs["--verbose"]):
        assert "DEBUG" in text and "Traceback" in text and "selected 2 mask(s)" in text
    assert "selected 2 mask(s)" not in quiet and "does not accept" in quiet and "ERROR" in quiet
    assert "does not accept" not in quieter and "ERROR" in quieter
    for text in runs.values():  # the summary is always printed
        assert "FAILED sub-02_space-MNI152NLin6Asym_label-lesion_mask.nii.gz" in text


def test_version():
    result = lacuna("--version")
    assert result.exit_code == 0
    assert importlib.metadata.version("lacuna") in result.output
    assert result.output.startswith("lacuna")


def test_help():
    top = lacuna("--help")
    assert top.exit_code == 0
    assert "BIDS_DIR OUTPUT_DIR {participant,group}" in top.output
    for command in ("run", "atlases", "demo", "validate"):
        assert re.search(rf"^\s+{command}\b", top.output, re.M), command
    assert lacuna("-h").output == top.output
    run = lacuna("run", "--help")
    assert run.exit_code == 0
    for option in (
        "--participant-label", "--session-label", "--mask-label", "--mask-space", "--analysis", "--atlas ",
        "--atlas-dir", "-w, --work-dir", "--nprocs", "--skip-bids-validation", "--overwrite", "-v, --verbose",
        "-q, --quiet", "BIDS_DIR OUTPUT_DIR",
    ):
        assert option in run.output, option


def test_atlases_list_beside_positional_form(tmp_path, good_dataset):
    result = lacuna("atlases", "list", "--atlas-dir", ATLAS_ROOT)
    assert result.exit_code == 0, result.output
    listed = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.strip()}
    for image in ATLAS_ROOT.glob("tpl-*_atlas-*.nii.gz"):
        entities = dict(part.split("-", 1) for part in image.name.split("_")[:-1])
        assert f"{entities['atlas']}_{entities['desc']}" in listed, image.name
    assert listed[ATLAS] == SPACE
    assert listed["HCP1065_thr0p1"] == "MNI152NLin2009aAsym"
    # The positional form still works in the same session.
    bids, _ = good_dataset
    result = participant(bids, tmp_path / "out", "--participant-label", "01")
    assert result.exit_code == 0 and counts(result) == (1, 1, 0, 0)


# ------------------------------------------------------------ 3. unusable datasets


def _no_description(root: Path) -> None:
    write_bids_dataset(root, {mask_name("01"): (ball_1mm(0), AFFINE_1MM)})
    (root / "dataset_description.json").unlink()


def _no_subjects(root: Path) -> None:
    write_bids_dataset(root, {"anat/sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz": (ball_2mm(0), AFFINE_2MM)})


def _only_other_files(root: Path) -> None:
    write_bids_dataset(root, {})
    (root / "sub-01" / "anat").mkdir(parents=True)
    save_mask(root / "sub-01/anat/sub-01_T1w.nii.gz", ball_2mm(0), AFFINE_2MM)


def _one_mask(root: Path) -> None:
    write_bids_dataset(root, {mask_name("01"): (ball_2mm(0), AFFINE_2MM)})


@pytest.mark.parametrize(
    "setup, options, code, words",
    [
        (_no_description, [], 16, ["dataset_description.json"]),
        (_no_subjects, [], 66, ["sub-<label>"]),
        (_only_other_files, [], 66, ["no lesion masks selected"]),
        (_one_mask, ["--participant-label", "99"], 18, ["no lesion masks selected"]),
        (_one_mask, ["--session-label", "9"], 18, ["no lesion masks selected"]),
        (_one_mask, ["--mask-label", "nothing"], 18, ["no lesion masks selected"]),
        (lambda r: None, [], 66, ["BIDS folder not found"]),
    ],
    ids=["no-description", "no-subjects", "no-masks", "unknown-participant", "unknown-session", "unknown-label", "missing-folder"],
)
def test_unusable_dataset_exit_codes(tmp_path, setup, options, code, words):
    """Exit codes of the BIDS execution specification: 16 not BIDS, 66 no input, 18 the
    filters select nothing."""
    bids = tmp_path / "bids"
    setup(bids)
    out = tmp_path / "out"
    result = participant(bids, out, *options)
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output
    assert not list(out.glob("sub-*"))


# --------------------------------------------------- 4. outputs never read back


def test_relative_paths_with_output_inside_bids(tmp_path):
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM)})
    args = ["bids", "bids/derivatives/lacuna", "participant", "--atlas-dir", ATLAS_ROOT, "--atlas", ATLAS, "-w", "bids/work"]
    for expected in ((1, 1, 0, 0), (1, 0, 1, 0)):
        result = lacuna(*args, cwd=tmp_path)
        assert result.exit_code == 0, result.output
        assert counts(result) == expected
    result = lacuna(*args, "--overwrite", cwd=tmp_path)
    assert counts(result) == (1, 1, 0, 0)
    assert lacuna("bids", "bids/derivatives/lacuna", "group", cwd=tmp_path).exit_code == 0
    out = bids / "derivatives" / "lacuna"
    assert [p.relative_to(out).as_posix() for p in out.rglob("*_provenance.json")] == ["sub-01/anat/sub-01_label-lesion_provenance.json"]
    assert (tmp_path / "bids/work/lacuna_participant_config.json").is_file()
    check_table(table(out, "01"), ball_1mm(0))


def test_output_dir_equal_to_bids_dir_is_refused(tmp_path):
    """Writing derivatives into the raw dataset root would replace its description and
    turn the outputs into inputs of the next run: a usage error, nothing written."""
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM)})
    description = (bids / "dataset_description.json").read_bytes()
    before = sorted(p.relative_to(bids) for p in bids.rglob("*"))
    result = participant(bids, bids)
    assert result.exit_code == 64, result.output
    assert (bids / "dataset_description.json").read_bytes() == description
    assert sorted(p.relative_to(bids) for p in bids.rglob("*")) == before


def test_masks_that_would_collide_fail_clearly(tmp_path):
    """Two masks of sub-01 that differ only by res- would write the same outputs (pitfall 8)."""
    bids = write_bids_dataset(
        tmp_path / "bids",
        {
            f"sub-01/anat/sub-01_space-{SPACE}_res-1_label-lesion_mask.nii.gz": (ball_1mm(0), AFFINE_1MM),
            f"sub-01/anat/sub-01_space-{SPACE}_res-2_label-lesion_mask.nii.gz": (ball_2mm(1), AFFINE_2MM),
        },
    )
    out = tmp_path / "out"
    result = participant(bids, out)
    assert result.exit_code == 1
    assert counts(result) == (2, 1, 0, 1)
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "res-2_label-lesion_mask.nii.gz" in failed[0] and "res-1_label-lesion_mask.nii.gz" in failed[0]
    assert_complete(out, "01")
    check_table(table(out, "01"), ball_1mm(0))


@pytest.mark.parametrize("inside", ["derivatives/lacuna", "lacuna-out"])
def test_outputs_inside_bids_are_not_inputs(tmp_path, inside):
    masks = {mask_name("01"): (ball_1mm(0), AFFINE_1MM), mask_name("02", "01"): (ball_1mm(1), AFFINE_1MM)}
    bids = write_bids_dataset(tmp_path / "bids", masks)
    out = bids / inside
    work = bids / "work"
    # A stray mask-like file in the work folder must not be picked up either.
    save_mask(work / "sub-09/anat/sub-09_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", ball_1mm(2), AFFINE_1MM)
    # Nor masks of other pipelines or source data.
    save_mask(bids / "derivatives/othertool/sub-07/anat/sub-07_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", ball_1mm(3), AFFINE_1MM)
    save_mask(bids / "sourcedata/sub-08/anat/sub-08_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", ball_1mm(4), AFFINE_1MM)

    first = participant(bids, out, "-w", work)
    assert first.exit_code == 0, first.output
    assert counts(first) == (2, 2, 0, 0)
    assert "does not accept 2 file name(s)" in first.output
    second = participant(bids, out, "-w", work)
    assert second.exit_code == 0, second.output
    assert counts(second) == (2, 0, 2, 0)
    assert "does not accept 2 file name(s)" in second.output
    third = participant(bids, out, "-w", work, "--overwrite")
    assert third.exit_code == 0, third.output
    assert counts(third) == (2, 2, 0, 0)
    group = lacuna(bids, out, "group")
    assert group.exit_code == 0, group.output
    fourth = participant(bids, out, "-w", work, "--overwrite")
    assert counts(fourth) == (2, 2, 0, 0)

    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_provenance.json")) == [
        "sub-01/anat/sub-01_label-lesion_provenance.json",
        "sub-02/ses-01/anat/sub-02_ses-01_label-lesion_provenance.json",
    ]
    assert not [p for p in out.glob("sub-*") if p.name not in ("sub-01", "sub-02")]
    assert not [p for p in out.rglob("*") if "derivatives" in p.relative_to(out).as_posix() or inside in p.relative_to(out).as_posix()]
    check_table(table(out, "02", ses="01"), ball_1mm(1))
    assert_valid(out)


# ------------------------------------------------------------- 5. kill and re-run


def _lacuna_executable() -> str:
    found = shutil.which("lacuna") or str(Path(sys.executable).with_name("lacuna"))
    if not Path(found).is_file():
        pytest.skip("the lacuna console script is not installed")
    return found


def test_kill_and_rerun_gives_identical_tables(tmp_path):
    # Eight large 1 mm lesions, mapped onto Schaefer and onto the 2 mm Tian grid (resampled:
    # slow enough that the run is still going when the first mask is done).
    masks = {mask_name(f"0{i}"): (ball_1mm(i - 1, 22), AFFINE_1MM) for i in range(1, 9)}
    bids = write_bids_dataset(tmp_path / "bids", masks)
    clean_bids = tmp_path / "clean_bids"
    shutil.copytree(bids, clean_bids)
    out = tmp_path / "out"
    atlases = ["--atlas", ATLAS, "--atlas", TIAN]
    args = [_lacuna_executable(), str(bids), str(out), "participant", "--atlas-dir", str(ATLAS_ROOT), *atlases, "--skip-bids-validation"]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        try:
            while not list(out.glob("sub-*/anat/*_provenance.json")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no mask finished within 60 s"
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = {p: p.read_bytes() for p in out.glob("sub-*/anat/*_provenance.json")}
    assert 1 <= len(finished) < 8, "the run was not interrupted"
    # The group level on the interrupted outputs uses only the finished masks.
    partial = lacuna(bids, out, "group")
    assert partial.exit_code == 0, partial.output
    assert json.loads((out / "group" / "summary.json").read_text())["n_masks"] == len(finished)

    rerun = participant(bids, out, "--skip-bids-validation", atlases=(ATLAS, TIAN))
    assert rerun.exit_code == 0, rerun.output
    total, done, skipped, failed = counts(rerun)
    assert total == 8 and failed == 0 and skipped >= len(finished) and done + skipped == 8
    for path, content in finished.items():  # finished masks were not recomputed
        assert path.read_bytes() == content

    clean_out = tmp_path / "clean_out"
    clean = participant(clean_bids, clean_out, "--skip-bids-validation", atlases=(ATLAS, TIAN))
    assert clean.exit_code == 0 and counts(clean) == (8, 8, 0, 0)
    for folder in (out, clean_out):
        assert lacuna(folder.parent / folder.name, folder, "group").exit_code == 0
    assert json.loads((out / "group" / "summary.json").read_text())["n_masks"] == 8

    tsvs = sorted(p.relative_to(out) for p in out.rglob("*.tsv"))
    assert tsvs == sorted(p.relative_to(clean_out) for p in clean_out.rglob("*.tsv"))
    assert len(tsvs) == 16 + 6 + 1  # per mask 2 atlases; group: 2 atlases x 3 measures + scalars
    for rel in tsvs:
        assert (out / rel).read_bytes() == (clean_out / rel).read_bytes(), rel
    assert temporaries(out) == []
    for i in range(1, 9):
        assert_complete(out, f"0{i}")
    check_table(table(out, "08"), ball_1mm(7, 22))
    assert_valid(out)


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is ``pgid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_killing_a_parallel_run_leaves_no_worker_behind(tmp_path):
    """SIGKILL of the main process (what a scheduler or OOM killer does) must not leave
    --nprocs workers running on, still writing outputs that race with the re-run."""
    masks = {mask_name(f"0{i}"): (ball_1mm(i - 1, 22), AFFINE_1MM) for i in range(1, 9)}
    bids = write_bids_dataset(tmp_path / "bids", masks)
    out = tmp_path / "out"
    args = [_lacuna_executable(), str(bids), str(out), "participant", "--atlas-dir", str(ATLAS_ROOT), "--atlas", ATLAS,
            "--atlas", TIAN, "--skip-bids-validation", "--nprocs", "2"]
    log = tmp_path / "lacuna.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("sub-*/anat/*_provenance.json")):
            assert proc.poll() is None, f"lacuna exited ({proc.returncode}) before writing any output:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no output after 60 s:\n{log.read_text()}"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _live_processes_in_group(proc.pid)
        assert left == [], f"worker processes still running 10 s after the main process was killed: {left}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _live_processes_in_group(proc.pid):  # clean up what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    rerun = participant(bids, out, "--skip-bids-validation", atlases=(ATLAS, TIAN))
    assert rerun.exit_code == 0 and counts(rerun)[0] == 8
    assert temporaries(out) == []


def test_tian_atlas_is_used_on_its_own_2mm_grid(tmp_path):
    """The Tian file says res-01 but is 2 mm on a 97x115x97 RAS grid: trust the header."""
    putamen = ball(SHAPE_1MM, AFFINE_1MM, (-26, 2, 2), 9)
    thalamus = ball(SHAPE_1MM, AFFINE_1MM, (11, -18, 7), 7)
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (putamen, AFFINE_1MM), mask_name("02"): (thalamus, AFFINE_1MM)})
    out = tmp_path / "out"
    result = participant(bids, out, atlases=(TIAN,))
    assert result.exit_code == 0, result.output
    for sub, mask in (("01", putamen), ("02", thalamus)):
        path = out / f"sub-{sub}/anat/sub-{sub}_space-{SPACE}_atlas-TianSubcortex_seg-3TS1_label-lesion_desc-regionaldamage_parcelstats.tsv"
        check_tian_table(path, mask)
        assert expected_tian_damage(mask)[0].sum() > 0
    hits, _, names = expected_tian_damage(putamen)
    assert names[int(np.argmax(hits))] == "PUT-lh"  # a left-right mirror would say PUT-rh
    assert_valid(out)


# ------------------------------------------------------------------ 6. group level


def test_group_level_against_numpy(tmp_path):
    masks_1mm = {("01", None): ball_1mm(0, 9), ("02", "01"): ball_1mm(1, 8), ("02", "02"): ball_1mm(0, 6), ("03", None): ball_1mm(4, 10)}
    mask_2mm = ball_2mm(5, 9)
    files = {mask_name(sub, ses): (data, AFFINE_1MM) for (sub, ses), data in masks_1mm.items()}
    files[mask_name("04")] = (mask_2mm, AFFINE_2MM)
    bids = write_bids_dataset(tmp_path / "bids", files)
    out = tmp_path / "derivatives"
    result = participant(bids, out)
    assert result.exit_code == 0, result.output
    group = lacuna(bids, out, "group")
    assert group.exit_code == 0, group.output
    assert "5 mask(s)" in group.output

    on_atlas_grid = {**masks_1mm, ("04", None): upsample_2mm_to_1mm(mask_2mm)}
    order = sorted(on_atlas_grid, key=lambda k: (k[0], k[1] or ""))
    _, names = schaefer()
    prefix = "atlas-Schaefer2018_seg-100Parcels7Networks_desc-regionaldamage"
    for measure, column in (("PercentDamaged", 1), ("LesionedVoxels", 0)):
        frame = pd.read_csv(out / "group" / f"{prefix}{measure}_parcelstats.tsv", sep="\t", keep_default_na=False)
        assert list(frame.columns) == ["participant_id", "session_id", "label", *names]
        assert frame["participant_id"].tolist() == [f"sub-{s}" for s, _ in order]
        assert frame["session_id"].tolist() == [f"ses-{t}" if t else "n/a" for _, t in order]
        assert frame["label"].tolist() == ["lesion"] * 5
        expected = np.array([expected_damage(on_atlas_grid[key])[column] for key in order])
        np.testing.assert_allclose(frame[names].to_numpy(float), expected, rtol=1e-10, atol=1e-12)
        sidecar = json.loads((out / "group" / f"{prefix}{measure}_parcelstats.json").read_text())
        assert set(names) <= set(sidecar)

    count_1mm = nib.load(out / "group" / f"space-{SPACE}_res-1_desc-lesioncount_statmap.nii.gz")
    assert count_1mm.shape == SHAPE_1MM and np.allclose(count_1mm.affine, AFFINE_1MM)
    np.testing.assert_array_equal(np.asanyarray(count_1mm.dataobj), np.sum(list(masks_1mm.values()), axis=0))
    overlap_1mm = nib.load(out / "group" / f"space-{SPACE}_res-1_desc-lesionoverlap_probseg.nii.gz")
    np.testing.assert_allclose(np.asanyarray(overlap_1mm.dataobj), np.sum(list(masks_1mm.values()), axis=0) / 4, rtol=1e-6)
    count_2mm = nib.load(out / "group" / f"space-{SPACE}_res-2_desc-lesioncount_statmap.nii.gz")
    assert count_2mm.shape == SHAPE_2MM and np.allclose(count_2mm.affine, AFFINE_2MM)
    np.testing.assert_array_equal(np.asanyarray(count_2mm.dataobj), mask_2mm)

    summary = json.loads((out / "group" / "summary.json").read_text())
    assert summary["n_masks"] == 5
    assert [(m["participant_id"], m.get("session_id")) for m in summary["masks"]] == [
        (f"sub-{s}", f"ses-{t}" if t else None) for s, t in order
    ]
    assert summary["incomplete"] == []
    assert_valid(out)


@pytest.mark.parametrize("state", ["missing", "empty", "description-only", "no-provenance"])
def test_group_without_participant_outputs_exits_66(tmp_path, state):
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_2mm(0), AFFINE_2MM)})
    out = tmp_path / "out"
    if state != "missing":
        out.mkdir()
    if state == "description-only":
        (out / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    if state == "no-provenance":  # a mask whose run never finished
        save_mask(out / "sub-01/anat" / f"sub-01_space-{SPACE}_res-2_label-lesion_mask.nii.gz", ball_2mm(0), AFFINE_2MM)
    result = lacuna(bids, out, "group")
    assert result.exit_code == 66, result.output  # missing input
    assert "participant" in result.output and "Traceback" not in result.output
    assert not (out / "group").exists()


# ------------------------------------------------------ 7. official BIDS validator


def _bids_validator() -> str | None:
    found = shutil.which("bids-validator-deno")
    candidate = Path(sys.executable).with_name("bids-validator-deno")
    return found or (str(candidate) if candidate.is_file() else None)


def test_official_bids_validator_accepts_derivatives(tmp_path):
    validator = _bids_validator()
    if validator is None:
        pytest.skip("bids-validator-deno is not installed")
    files = {
        mask_name("01", "01"): (ball_1mm(0), AFFINE_1MM),
        mask_name("01", "02", label="chronic"): (ball_1mm(1), AFFINE_1MM),
        mask_name("02"): (ball_2mm(2), AFFINE_2MM),
    }
    bids = write_bids_dataset(tmp_path / "bids", files)
    save_mask(bids / mask_name("03", space=None), ball_1mm(3), AFFINE_1MM, sidecar={"SpatialReference": SPACE})
    save_mask(bids / f"sub-04/anat/sub-04_acq-flair_run-2_space-{SPACE}_label-lesion_mask.nii.gz", ball_1mm(4), AFFINE_1MM)
    save_mask(bids / f"sub-04/anat/sub-04_acq-t1_space-{SPACE}_desc-lesion_mask.nii.gz", ball_1mm(5), AFFINE_1MM)
    out = bids / "derivatives" / "lacuna"
    assert counts(participant(bids, out)) == (6, 6, 0, 0)
    assert lacuna(bids, out, "group").exit_code == 0
    assert len(list(out.rglob("*_provenance.json"))) == 6
    assert_valid(out)
    proc = subprocess.run([validator, str(out)], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "[ERROR]" not in text, text
    assert "Summary" in text or "summary" in text.lower()


# -------------------------------------------------------------------------- 8. demo


def test_demo(tmp_path):
    result = lacuna("demo", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "validation: 0 error(s)" in result.output
    assert counts(result)[3] == 0
    derivatives = tmp_path / "demo" / "derivatives" / "lacuna"
    assert (derivatives / "group" / "summary.json").is_file()
    assert json.loads((derivatives / "group" / "summary.json").read_text())["n_masks"] == 5
    assert_valid(derivatives)


def test_version_and_help_start_without_the_numerical_stack():
    code = (
        "import sys\n"
        "from lacuna.cli.main import main\n"
        "for argv in (['--version'], ['--help'], ['run', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('numpy', 'scipy', 'nibabel', 'pandas', 'numba', 'h5py') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_the_participant_level_holds_the_numerical_libraries_to_one_thread(tmp_path, monkeypatch):
    """Lacuna parallelises the work itself: while it runs, BLAS must not start its own
    threads beside Lacuna's (and the limit is lifted again afterwards)."""
    import threadpoolctl

    from lacuna.analysis.regional.damage import RegionalDamage

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}

    seen = []
    compute = RegionalDamage.compute

    def recording(self, subject, step):
        seen.append(blas_threads())
        return compute(self, subject, step)

    monkeypatch.setattr(RegionalDamage, "compute", recording)
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM)})
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        result = participant(bids, tmp_path / "out")
        after = blas_threads()
    assert result.exit_code == 0, result.output
    assert seen == [{1}]
    assert after == before == {2}


def test_the_console_entry_point_spares_the_last_garbage_collection(monkeypatch):
    """The process ends after the command: the interpreter's final collection need not
    walk the numerical libraries' objects (``gc.freeze`` before exit), also on errors."""
    import gc

    from lacuna.cli import main as cli_main

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    for argv in (["--version"], ["no-such-folder", "out", "participant"]):
        with pytest.raises(SystemExit):
            cli_main.main(argv)
    assert frozen == [True, True]


def test_an_atlas_that_cannot_be_read_ahead_fails_each_mask_with_its_name(tmp_path):
    """The read-ahead thread meets the broken atlas first; it only logs, and each mask
    then fails with the message that names the file and the fix."""
    atlases = tmp_path / "atlases"
    atlases.mkdir()
    stem = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg"
    shutil.copy(Path(ATLAS_ROOT) / f"{stem}.txt", atlases)
    (atlases / f"{stem}.nii.gz").write_bytes((Path(ATLAS_ROOT) / f"{stem}.nii.gz").read_bytes()[:20000])
    bids = write_bids_dataset(tmp_path / "bids", {mask_name("01"): (ball_1mm(0), AFFINE_1MM), mask_name("02"): (ball_1mm(1), AFFINE_1MM)})

    result = lacuna(bids, tmp_path / "out", "participant", "--atlas-dir", atlases, "--atlas", ATLAS, "-v")

    assert result.exit_code == 1, result.output
    assert counts(result) == (2, 0, 0, 2)
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and all(f"{stem}.nii.gz" in line and "truncated or corrupt" in line for line in failed), failed
    assert "reading ahead (RegionalDamage.warm_up) failed" in result.output
