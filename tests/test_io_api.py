"""Tests of the public API of ``lacuna.io`` (loading, saving, exporting, validating).

Expected values come from plain numpy/pandas/hashlib, never from lacuna's own functions.
"""

from __future__ import annotations

import hashlib
import json
import fnmatch
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import save_mask, write_bids_dataset
from lacuna.core.errors import BidsError, LacunaError
from lacuna.core.provenance import ProvenanceStep
from lacuna.core.results import ConnectivityMatrix, ParcelData, ScalarMetric, VoxelMap
from lacuna.core.subject import SubjectData
from lacuna.io import (
    batch_export_to_csv,
    batch_export_to_tsv,
    export_bids_derivatives,
    export_provenance_to_json,
    export_results_to_csv,
    export_results_to_json,
    export_results_to_tsv,
    load_bids_dataset,
    save_nifti,
    validate_bids_derivatives,
)

NLIN6 = "MNI152NLin6Asym"
NLIN2009C = "MNI152NLin2009cAsym"

SHAPE_6_2 = (91, 109, 91)
SHAPE_C_2 = (97, 115, 97)
SHAPE_6_1 = (182, 218, 182)


def affine_of(axes, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(axes)
    affine[:3, 3] = origin
    return affine


AFF_6_2 = affine_of((-2, 2, 2), (90, -126, -72))
AFF_C_2 = affine_of((2, 2, 2), (-96.5, -132.5, -78.5))
AFF_6_1 = affine_of((-1, 1, 1), (90, -126, -72))


def box(shape, lo=(40, 50, 40), size=(4, 5, 6)) -> np.ndarray:
    data = np.zeros(shape, dtype=np.uint8)
    data[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    return data


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def strict_json(path: Path):
    """Parse JSON rejecting the non-standard NaN/Infinity tokens."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token} in {path}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=reject)


def warning_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------- BIDS input dataset

K_CAS001_S1_AI = "sub-CAS001_ses-01_space-MNI152NLin6Asym_res-2_label-acuteinfarct"
K_CAS001_S1_WMH = "sub-CAS001_ses-01_space-MNI152NLin6Asym_res-2_label-WMH"
K_CAS001_S2_AI = "sub-CAS001_ses-02_space-MNI152NLin6Asym_res-2_label-acuteinfarct"
K_CAS002_S1_WMH = "sub-CAS002_ses-01_space-MNI152NLin2009cAsym_res-2_label-WMH"
K_CAS003_AI = "sub-CAS003_label-acuteinfarct"  # space only in the sidecar
K_CAS004 = "sub-CAS004_space-Talairach_label-lesion"  # unsupported space
K_CAS005 = "sub-CAS005_label-lesion"  # no space anywhere
ALL_VALID = {K_CAS001_S1_AI, K_CAS001_S1_WMH, K_CAS001_S2_AI, K_CAS002_S1_WMH, K_CAS003_AI}


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids") / "dataset"
    masks = {
        f"sub-CAS001/ses-01/anat/{K_CAS001_S1_AI}_mask.nii.gz": (box(SHAPE_6_2), AFF_6_2),
        f"sub-CAS001/ses-01/anat/{K_CAS001_S1_WMH}_mask.nii.gz": (box(SHAPE_6_2, lo=(20, 20, 20)), AFF_6_2),
        f"sub-CAS001/ses-02/anat/{K_CAS001_S2_AI}_mask.nii.gz": (box(SHAPE_6_2, size=(2, 2, 2)), AFF_6_2),
        f"sub-CAS002/ses-01/anat/{K_CAS002_S1_WMH}_mask.nii.gz": (box(SHAPE_C_2), AFF_C_2),
        f"sub-CAS004/anat/{K_CAS004}_mask.nii.gz": (box(SHAPE_6_2), AFF_6_2),
        f"sub-CAS005/anat/{K_CAS005}_mask.nii.gz": (box(SHAPE_6_2), AFF_6_2),
        # Outputs of an earlier run: must never be read back as inputs (pitfall 7).
        "derivatives/lacuna/sub-CAS001/ses-01/anat/"
        "sub-CAS001_ses-01_space-MNI152NLin6Asym_res-2_label-derived_mask.nii.gz": (box(SHAPE_6_2), AFF_6_2),
        "derivatives/lacuna/sub-CAS009/anat/"
        "sub-CAS009_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz": (box(SHAPE_6_2), AFF_6_2),
    }
    write_bids_dataset(root, masks)
    save_mask(
        root / f"sub-CAS003/anat/{K_CAS003_AI}_mask.nii.gz",
        box(SHAPE_6_2, lo=(30, 30, 30)),
        AFF_6_2,
        sidecar={"SpatialReference": NLIN6},
    )
    # An uncompressed mask, found only with suffix="_mask.nii".
    save_mask(
        root / "sub-CAS006/anat/sub-CAS006_space-MNI152NLin6Asym_label-lesion_mask.nii",
        box(SHAPE_6_2),
        AFF_6_2,
    )
    return root


def test_load_all(bids_root, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = load_bids_dataset(bids_root)
    assert set(dataset) == ALL_VALID
    assert all(isinstance(s, SubjectData) for s in dataset.values())
    # Unsupported and missing spaces: a warning each, and the file skipped.
    messages = warning_messages(caplog)
    assert any("sub-CAS004" in m for m in messages), messages
    assert any("sub-CAS005" in m for m in messages), messages


def test_load_keys_are_file_names_without_suffix_and_data_match(bids_root):
    dataset = load_bids_dataset(bids_root, pattern="CAS001*ses-02")
    assert list(dataset) == [K_CAS001_S2_AI]
    subject = dataset[K_CAS001_S2_AI]
    assert subject.n_voxels == 8
    assert subject.subject_id == "CAS001"
    assert subject.session_id == "02"
    assert subject.label == "acuteinfarct"
    assert subject.space == NLIN6
    assert subject.resolution == 2.0


def test_derivatives_are_never_loaded(bids_root):
    dataset = load_bids_dataset(bids_root)
    assert not any("derived" in key or "CAS009" in key for key in dataset)
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, pattern="derived")
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, subjects=["CAS009"])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("CAS001", {K_CAS001_S1_AI, K_CAS001_S1_WMH, K_CAS001_S2_AI}),
        ("CAS001*ses-01*acuteinfarct", {K_CAS001_S1_AI}),
        ("WMH", {K_CAS001_S1_WMH, K_CAS002_S1_WMH}),
        ("*WMH*", {K_CAS001_S1_WMH, K_CAS002_S1_WMH}),
        ("ses-01", {K_CAS001_S1_AI, K_CAS001_S1_WMH, K_CAS002_S1_WMH}),
        ("acuteinfarct", {K_CAS001_S1_AI, K_CAS001_S2_AI, K_CAS003_AI}),
        ("*", ALL_VALID),
    ],
)
def test_pattern_semantics(bids_root, pattern, expected):
    assert set(load_bids_dataset(bids_root, pattern=pattern)) == expected


def test_pattern_matches_the_file_name_not_folders(bids_root):
    # The pattern applies to the file name: the folder name "anat" is not in any file name.
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, pattern="anat")


def test_suffix(bids_root):
    dataset = load_bids_dataset(bids_root, suffix="_mask.nii")
    assert set(dataset) == {"sub-CAS006_space-MNI152NLin6Asym_label-lesion"}
    # ".nii.gz" as suffix: the keys keep "_mask".
    dataset = load_bids_dataset(bids_root, pattern="CAS001*ses-02", suffix=".nii.gz")
    assert set(dataset) == {K_CAS001_S2_AI + "_mask"}


def test_recursive_false(tmp_path):
    root = tmp_path / "flat"
    save_mask(root / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", box(SHAPE_6_2), AFF_6_2)
    save_mask(root / "sub-02/anat/sub-02_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", box(SHAPE_6_2), AFF_6_2)
    assert set(load_bids_dataset(root, recursive=False)) == {"sub-01_space-MNI152NLin6Asym_label-lesion"}
    assert set(load_bids_dataset(root)) == {
        "sub-01_space-MNI152NLin6Asym_label-lesion",
        "sub-02_space-MNI152NLin6Asym_label-lesion",
    }


def test_recursive_false_on_dataset_root_finds_nothing(bids_root):
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, recursive=False)


def test_folder_below_root(bids_root):
    anat = bids_root / "sub-CAS001" / "ses-01" / "anat"
    assert set(load_bids_dataset(anat)) == {K_CAS001_S1_AI, K_CAS001_S1_WMH}
    assert set(load_bids_dataset(anat, pattern="*WMH*")) == {K_CAS001_S1_WMH}
    assert set(load_bids_dataset(bids_root / "sub-CAS001")) == {K_CAS001_S1_AI, K_CAS001_S1_WMH, K_CAS001_S2_AI}


def test_space_from_sidecar(bids_root):
    dataset = load_bids_dataset(bids_root, pattern="CAS003")
    assert dataset[K_CAS003_AI].space == NLIN6
    assert dataset[K_CAS003_AI].resolution == 2.0


def test_space_and_resolution_overrides(bids_root):
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, pattern="CAS005")  # no space: skipped, nothing left
    dataset = load_bids_dataset(bids_root, pattern="CAS005", space=NLIN6, resolution=2.0)
    assert set(dataset) == {K_CAS005}
    assert dataset[K_CAS005].space == NLIN6
    assert dataset[K_CAS005].resolution == 2.0


def test_resolution_override_disagreeing_with_header(bids_root, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = load_bids_dataset(bids_root, pattern="CAS001*ses-02", resolution=1.0)
    assert dataset[K_CAS001_S2_AI].resolution == 2.0  # the header wins
    assert warning_messages(caplog)


def test_space_argument_overrides_entity(bids_root, caplog):
    # CAS002 is on the 2009c template grid: declared 6Asym, it is analysed as declared,
    # moved by its affine (never matched by shape), with a warning naming the file.
    with caplog.at_level(logging.WARNING):
        dataset = load_bids_dataset(bids_root, pattern="WMH", space=NLIN6)
    assert set(dataset) == {K_CAS001_S1_WMH, K_CAS002_S1_WMH}
    assert {subject.space for subject in dataset.values()} == {NLIN6}
    assert dataset[K_CAS001_S1_WMH].on_template_grid and not dataset[K_CAS002_S1_WMH].on_template_grid
    assert any("CAS002" in m and "MNI152NLin2009cAsym 2 mm template grid" in m for m in warning_messages(caplog))


def test_unsupported_space_argument_warns_and_skips(bids_root, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(BidsError):
        load_bids_dataset(bids_root, pattern="CAS001", space="MNI305")
    assert warning_messages(caplog)


def test_subjects_filter(bids_root, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = load_bids_dataset(bids_root, subjects=["CAS001", "CAS003"])
    assert set(dataset) == {K_CAS001_S1_AI, K_CAS001_S1_WMH, K_CAS001_S2_AI, K_CAS003_AI}
    # Filtered before loading: the unusable files of other subjects are not even looked at.
    assert not any("CAS004" in m or "CAS005" in m for m in warning_messages(caplog))
    assert set(load_bids_dataset(bids_root, subjects=["CAS002"])) == {K_CAS002_S1_WMH}
    # Subject IDs are exact labels, not substrings.
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, subjects=["CAS00"])


def test_missing_root_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_bids_dataset(tmp_path / "does-not-exist")


def test_nothing_matching_raises_bids_error(bids_root):
    with pytest.raises(BidsError):
        load_bids_dataset(bids_root, pattern="CAS999")


def test_bids_error_is_a_lacuna_error():
    assert issubclass(BidsError, LacunaError)


# ----------------------------------------------------------------------- save_nifti


@pytest.fixture
def subject(tmp_path) -> SubjectData:
    """sub-01, 6Asym 2 mm, loaded from a file (so it has a load provenance step)."""
    path = save_mask(
        tmp_path / "in" / "sub-01_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz",
        box(SHAPE_6_2),
        AFF_6_2,
    )
    return SubjectData.from_nifti(path)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_save_nifti_roundtrip(subject, tmp_path, name):
    out = tmp_path / "saved" / name
    save_nifti(subject, out)
    img = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), box(SHAPE_6_2))
    np.testing.assert_allclose(img.affine, AFF_6_2)
    assert not (tmp_path / "saved" / name.replace("out", "out_anatomical")).exists()


@pytest.mark.parametrize("name", ["out.txt", "out.img", "out.nii.gz.bak", "out"])
def test_save_nifti_rejects_other_extensions(subject, tmp_path, name):
    with pytest.raises(ValueError):
        save_nifti(subject, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_save_nifti_with_anatomical(tmp_path):
    anat = np.random.default_rng(0).random(SHAPE_6_2).astype(np.float32)
    subject = SubjectData(
        nib.Nifti1Image(box(SHAPE_6_2), AFF_6_2),
        NLIN6,
        metadata={"subject_id": "01"},
        anatomical_img=nib.Nifti1Image(anat, AFF_6_2),
    )
    save_nifti(subject, tmp_path / "lesion.nii.gz", save_anatomical=True)
    written = nib.load(tmp_path / "lesion_anatomical.nii.gz")
    np.testing.assert_allclose(np.asanyarray(written.dataobj), anat)
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "lesion.nii.gz").dataobj), box(SHAPE_6_2))


# ----------------------------------------------------------- hand-made results


REGIONS = ["A", "B", "C"]
PERCENT = np.array([10.0, np.nan, 0.0])
VOXELS = np.array([3.0, 0.0, 0.0])
MATRIX = np.arange(9, dtype=float).reshape(3, 3)


def with_results(subject: SubjectData, volume: float = 480.0) -> SubjectData:
    rd = {
        "percent_damaged_Toy_10Parcels": ParcelData(
            parcellation="Toy_10Parcels",
            measure="percent_damaged",
            region_ids=[1, 2, 3],
            region_names=REGIONS,
            values=PERCENT.copy(),
            description="Percentage of the parcel that is lesioned",
            units="%",
            table="regionaldamage",
        ),
        "lesioned_voxels_Toy_10Parcels": ParcelData(
            parcellation="Toy_10Parcels",
            measure="lesioned_voxels",
            region_ids=[1, 2, 3],
            region_names=REGIONS,
            values=VOXELS.copy(),
            description="Lesioned voxels",
            units="voxels",
            table="regionaldamage",
        ),
        "lesion_volume_mm3": ScalarMetric("lesion_volume_mm3", volume, "mm^3", "Lesion volume"),
    }
    damage = np.zeros(SHAPE_6_2, dtype=np.float32)
    damage[40:44, 50:55, 40:46] = 0.75
    struct = {
        "damage": VoxelMap(
            name="damage",
            data=damage,
            affine=AFF_6_2,
            space=NLIN6,
            resolution=2.0,
            description="Disconnection",
            units="",
        ),
        "count_Toy_10Parcels": ConnectivityMatrix(
            parcellation="Toy_10Parcels",
            measure="count",
            region_names=REGIONS,
            matrix=MATRIX.copy(),
            description="Streamline count",
            units="streamlines",
        ),
    }
    subject = subject.with_results(
        "RegionalDamage", rd, ProvenanceStep(name="RegionalDamage", kind="analysis", parameters={"x": 1}).finish()
    )
    return subject.with_results("Struct", struct, ProvenanceStep(name="Struct", kind="analysis").finish())


@pytest.fixture
def processed(subject) -> SubjectData:
    return with_results(subject)


PREFIX = "sub-01_space-MNI152NLin6Asym"
MASK_NAME = f"{PREFIX}_res-2_label-lesion_mask.nii.gz"
PARCEL_NAME = f"{PREFIX}_atlas-Toy_seg-10Parcels_label-lesion_desc-regionaldamage_parcelstats.tsv"
SCALARS_NAME = "sub-01_label-lesion_scalars.json"
PROV_NAME = "sub-01_label-lesion_provenance.json"
STATMAP_RE = re.compile(rf"^{PREFIX}_res-2_label-lesion_desc-[A-Za-z0-9]+_statmap\.nii\.gz$")
RELMAT_RE = re.compile(rf"^{PREFIX}_atlas-Toy_seg-10Parcels_label-lesion_desc-[A-Za-z0-9]+_relmat\.tsv$")


def files_below(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def anat_names(root: Path, folder="sub-01/anat") -> set[str]:
    return {p.name for p in (root / folder).iterdir()}


def _kinds(names: set[str]) -> dict[str, list[str]]:
    return {
        "mask": [n for n in names if n == MASK_NAME],
        "mask_json": [n for n in names if n == MASK_NAME.replace(".nii.gz", ".json")],
        "statmap": [n for n in names if STATMAP_RE.match(n)],
        "parcel": [n for n in names if n == PARCEL_NAME],
        "relmat": [n for n in names if RELMAT_RE.match(n)],
        "scalars": [n for n in names if n == SCALARS_NAME],
        "provenance": [n for n in names if n == PROV_NAME],
    }


# ------------------------------------------------------------- BIDS derivatives


def test_export_returns_subject_folder_and_names_files(processed, tmp_path):
    root = tmp_path / "derivatives" / "lacuna-v0.1.0"
    returned = export_bids_derivatives(processed, root)
    assert Path(returned).resolve() == (root / "sub-01").resolve()
    names = anat_names(root)
    kinds = _kinds(names)
    assert all(len(v) == 1 for v in kinds.values()), kinds
    # Every NIfTI/TSV has its sidecar, and nothing else is written in anat/.
    expected = set()
    for key in ("mask", "statmap", "parcel", "relmat"):
        name = kinds[key][0]
        expected |= {name, re.sub(r"\.(nii\.gz|tsv)$", ".json", name)}
    expected |= {SCALARS_NAME, PROV_NAME}
    assert names == expected
    assert (root / "dataset_description.json").is_file()


def test_export_mask_content_and_sidecar(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    img = nib.load(root / "sub-01/anat" / MASK_NAME)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), box(SHAPE_6_2))
    np.testing.assert_allclose(img.affine, AFF_6_2)
    assert img.header.get_xyzt_units()[0] == "mm"
    sidecar = strict_json(root / "sub-01/anat" / MASK_NAME.replace(".nii.gz", ".json"))
    assert sidecar["SpatialReference"] == NLIN6
    # BIDS: a res- file needs Resolution, a string or an object keyed by the res value.
    assert isinstance(sidecar["Resolution"], str) or set(sidecar["Resolution"]) == {"2"}
    statmap = next(n for n in anat_names(root) if STATMAP_RE.match(n))
    img = nib.load(root / "sub-01/anat" / statmap)
    data = np.asanyarray(img.dataobj)
    assert data.shape == SHAPE_6_2
    np.testing.assert_allclose(img.affine, AFF_6_2)
    assert float(data.sum()) == pytest.approx(0.75 * 4 * 5 * 6)
    map_sidecar = strict_json(root / "sub-01/anat" / statmap.replace(".nii.gz", ".json"))
    assert map_sidecar["SpatialReference"] == NLIN6
    assert isinstance(map_sidecar["Resolution"], str) or set(map_sidecar["Resolution"]) == {"2"}


def test_export_bidsignore_covers_non_bids_outputs(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    patterns = [line.strip() for line in (root / ".bidsignore").read_text().splitlines() if line.strip()]
    kinds = _kinds(anat_names(root))
    not_in_bids = kinds["statmap"] + kinds["parcel"] + kinds["relmat"] + kinds["scalars"] + kinds["provenance"]
    for name in not_in_bids:
        for candidate in (name, re.sub(r"\.(nii\.gz|tsv)$", ".json", name)):
            assert any(fnmatch.fnmatch(candidate, p) for p in patterns), (candidate, patterns)


def test_export_with_session(subject, tmp_path):
    subject.metadata["session_id"] = "02"
    root = tmp_path / "deriv"
    returned = export_bids_derivatives(with_results(subject), root)
    assert Path(returned).resolve() == (root / "sub-01" / "ses-02").resolve()
    names = anat_names(root, "sub-01/ses-02/anat")
    assert "sub-01_ses-02_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz" in names
    assert "sub-01_ses-02_label-lesion_provenance.json" in names
    assert all(n.startswith("sub-01_ses-02_") for n in names)
    assert validate_bids_derivatives(root)["errors"] == []


def test_export_twice_without_overwrite_raises(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    before = {name: sha256(root / name) for name in files_below(root)}
    with pytest.raises(FileExistsError):
        export_bids_derivatives(processed, root)
    # Nothing was touched by the refused export.
    assert {name: sha256(root / name) for name in files_below(root)} == before


def test_export_overwrite_replaces_files(subject, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(with_results(subject, volume=480.0), root)
    export_bids_derivatives(with_results(subject, volume=123.0), root, overwrite=True)
    scalars = strict_json(root / "sub-01/anat" / SCALARS_NAME)
    assert "123" in json.dumps(scalars) and "480" not in json.dumps(scalars)
    assert validate_bids_derivatives(root)["errors"] == []


def test_export_without_subject_id_raises_value_error(tmp_path):
    subject = SubjectData(nib.Nifti1Image(box(SHAPE_6_2), AFF_6_2), NLIN6, metadata={})
    with pytest.raises(ValueError):
        export_bids_derivatives(subject, tmp_path / "deriv")
    assert not (tmp_path / "deriv").exists() or not list((tmp_path / "deriv").rglob("*.nii.gz"))


@pytest.mark.parametrize(
    ("flag", "suppressed"),
    [
        ("export_lesion_mask", {"mask", "mask_json"}),
        ("export_voxelmaps", {"statmap"}),
        ("export_parcel_data", {"parcel"}),
        ("export_connectivity", {"relmat"}),
        ("export_scalars", {"scalars"}),
        ("export_provenance", {"provenance"}),
    ],
)
def test_export_flags_suppress_their_files(processed, tmp_path, flag, suppressed):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root, **{flag: False})
    kinds = _kinds(anat_names(root))
    for kind, found in kinds.items():
        if kind in suppressed:
            assert found == [], (flag, kind, found)
        else:
            assert len(found) == 1, (flag, kind, found)
    if flag == "export_parcel_data":
        assert not any(n.endswith("_parcelstats.json") for n in anat_names(root))
    if flag == "export_connectivity":
        assert not any(n.endswith("_relmat.json") for n in anat_names(root))
    if flag == "export_voxelmaps":
        assert not any(n.endswith("_statmap.json") for n in anat_names(root))


def test_export_provenance_lists_every_output_with_sha256(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    record = strict_json(root / "sub-01/anat" / PROV_NAME)
    listed = {item["path"]: item["sha256"] for item in record["outputs"]}
    written = {f"sub-01/anat/{name}" for name in anat_names(root)} - {f"sub-01/anat/{PROV_NAME}"}
    assert set(listed) == written
    for relpath, digest in listed.items():
        assert digest == sha256(root / relpath), relpath
    # The load step and the input file's checksum are there too.
    steps = {step["name"]: step for step in record["steps"]}
    assert {"load", "RegionalDamage", "Struct"} <= set(steps)
    source = processed.metadata["source_path"]
    assert steps["load"]["inputs"][0]["sha256"] == sha256(Path(source))


def test_export_parcel_table_equals_results(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    path = root / "sub-01/anat" / PARCEL_NAME
    text = path.read_text(encoding="utf-8")
    frame = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    assert list(frame.columns[:2]) == ["index", "name"]
    assert set(frame.columns) == {"index", "name", "percent_damaged", "lesioned_voxels"}
    assert frame["index"].tolist() == [1, 2, 3]
    assert frame["name"].tolist() == REGIONS
    np.testing.assert_array_equal(frame["percent_damaged"].to_numpy(), PERCENT)  # NaN == NaN here
    np.testing.assert_array_equal(frame["lesioned_voxels"].to_numpy(), VOXELS)
    assert "n/a" in text.splitlines()[2].split("\t")  # BIDS missing value for region B
    sidecar = strict_json(path.with_name(PARCEL_NAME.replace(".tsv", ".json")))
    assert {"index", "name", "percent_damaged", "lesioned_voxels"} <= set(sidecar)


def test_export_connectivity_table_equals_matrix(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    relmat = next(n for n in anat_names(root) if RELMAT_RE.match(n))
    frame = pd.read_csv(root / "sub-01/anat" / relmat, sep="\t")
    assert frame.iloc[:, 0].tolist() == REGIONS
    assert list(frame.columns[1:]) == REGIONS
    np.testing.assert_array_equal(frame.iloc[:, 1:].to_numpy(dtype=float), MATRIX)


def test_export_scalars_json(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    scalars = strict_json(root / "sub-01/anat" / SCALARS_NAME)
    assert scalars["RegionalDamage"]["lesion_volume_mm3"]["Value"] == 480.0


def test_export_leaves_no_temporary_files(processed, tmp_path):
    root = tmp_path / "deriv"
    export_bids_derivatives(processed, root)
    for path in root.rglob("*"):
        name = path.name
        assert not (name.startswith(".") and name != ".bidsignore"), path
        assert "tmp" not in name.lower() and not name.endswith(("~", ".part")), path


# --------------------------------------------------------------- tables and JSON


def read_table(path: Path, sep: str) -> pd.DataFrame:
    return pd.read_csv(path, sep=sep, dtype={"subject_id": str, "session_id": str})


@pytest.mark.parametrize(("exporter", "sep"), [(export_results_to_csv, ","), (export_results_to_tsv, "\t")])
def test_export_results_one_row_dotted_columns(processed, tmp_path, exporter, sep):
    out = tmp_path / ("r.csv" if sep == "," else "r.tsv")
    returned = exporter(processed, out)
    assert Path(returned) == out
    header = out.read_text(encoding="utf-8").splitlines()[0]
    assert sep in header and (sep == "\t") == ("\t" in header)
    frame = read_table(out, sep)
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["subject_id"] == "01"
    assert pd.isna(row["session_id"])
    assert row["coordinate_space"] == NLIN6
    for region, value in zip(REGIONS, PERCENT):
        column = f"RegionalDamage.percent_damaged_Toy_10Parcels.{region}"
        assert column in frame.columns
        if np.isnan(value):
            assert pd.isna(row[column])
        else:
            assert row[column] == value
    assert row["RegionalDamage.lesion_volume_mm3"] == 480.0
    assert any(c.startswith("Struct.") for c in frame.columns)


def test_export_results_analysis_name_and_no_metadata(processed, tmp_path):
    out = tmp_path / "r.csv"
    export_results_to_csv(processed, out, analysis_name="RegionalDamage", include_metadata=False)
    frame = pd.read_csv(out)
    assert len(frame) == 1
    assert all(c.startswith("RegionalDamage.") for c in frame.columns), list(frame.columns)
    assert "subject_id" not in frame.columns


@pytest.mark.parametrize("exporter", [export_results_to_csv, export_results_to_tsv, export_results_to_json])
def test_export_results_errors(subject, processed, tmp_path, exporter):
    with pytest.raises(ValueError):
        exporter(subject, tmp_path / "none.out")  # no results
    with pytest.raises(ValueError):
        exporter(processed, tmp_path / "unknown.out", analysis_name="NoSuchAnalysis")


def test_export_results_with_real_regional_damage(tmp_path, shared_atlases):
    from lacuna.analysis import RegionalDamage

    data = np.zeros(SHAPE_6_1, dtype=np.uint8)
    data[55:75, 95:115, 100:115] = 1
    path = save_mask(tmp_path / "sub-07_space-MNI152NLin6Asym_label-lesion_mask.nii.gz", data, AFF_6_1)
    subject = SubjectData.from_nifti(path)
    result = RegionalDamage(parcellations=["Schaefer2018_100Parcels7Networks"], atlas_dir=shared_atlases).run(subject)
    out = export_results_to_tsv(result, tmp_path / "rd.tsv", analysis_name="RegionalDamage")
    frame = read_table(out, "\t")
    # Independent numpy computation on the atlas (same 1 mm FSL grid as the mask).
    atlas_path = shared_atlases / "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg"
    atlas_img = nib.load(f"{atlas_path}.nii.gz")
    np.testing.assert_allclose(atlas_img.affine, AFF_6_1)
    atlas = np.asanyarray(atlas_img.dataobj).astype(int)
    names = Path(f"{atlas_path}.txt").read_text().split()
    hits = np.bincount(atlas[data.astype(bool)], minlength=101)
    sizes = np.bincount(atlas.ravel(), minlength=101)
    checked = 0
    for region_id in np.nonzero(hits[1:])[0] + 1:
        column = f"RegionalDamage.percent_damaged_Schaefer2018_100Parcels7Networks.{names[region_id - 1]}"
        assert frame.iloc[0][column] == pytest.approx(100.0 * hits[region_id] / sizes[region_id])
        checked += 1
    assert checked >= 1
    assert frame.iloc[0]["RegionalDamage.lesion_volume_mm3"] == pytest.approx(float(data.sum()))
    assert frame.iloc[0]["subject_id"] == "07"


def test_export_results_to_json_structure(processed, tmp_path):
    out = export_results_to_json(processed, tmp_path / "r.json")
    document = strict_json(out)
    assert set(document) == {"metadata", "results"}
    assert document["metadata"]["subject_id"] == "01"
    assert document["metadata"]["coordinate_space"] == NLIN6
    assert set(document["results"]) == {"RegionalDamage", "Struct"}
    assert "lesion_volume_mm3" in document["results"]["RegionalDamage"]
    assert "480" in json.dumps(document["results"]["RegionalDamage"]["lesion_volume_mm3"])
    assert len(out.read_text().splitlines()) > 1  # indent=2 by default

    out = export_results_to_json(
        processed, tmp_path / "p.json", analysis_name="Struct", include_metadata=False, include_provenance=True
    )
    document = strict_json(out)
    assert set(document) == {"results", "provenance"}
    assert set(document["results"]) == {"Struct"}
    assert "load" in json.dumps(document["provenance"])


def test_export_results_to_json_indent_zero_is_compact(processed, tmp_path):
    out = export_results_to_json(processed, tmp_path / "c.json", indent=0)
    text = out.read_text(encoding="utf-8")
    assert len(text.strip().splitlines()) == 1
    assert strict_json(out)["metadata"]["subject_id"] == "01"


def _second_subject(tmp_path) -> SubjectData:
    path = save_mask(
        tmp_path / "in2" / "sub-02_ses-03_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz",
        box(SHAPE_6_2, size=(2, 2, 2)),
        AFF_6_2,
    )
    subject = SubjectData.from_nifti(path)
    rd = {
        "percent_damaged_Toy_10Parcels": ParcelData(
            parcellation="Toy_10Parcels",
            measure="percent_damaged",
            region_ids=[1, 4],
            region_names=["A", "D"],
            values=np.array([50.0, 25.0]),
            table="regionaldamage",
        ),
        "lesion_volume_mm3": ScalarMetric("lesion_volume_mm3", 64.0, "mm^3"),
    }
    return subject.with_results("RegionalDamage", rd, ProvenanceStep(name="RegionalDamage", kind="analysis"))


@pytest.mark.parametrize(("exporter", "sep"), [(batch_export_to_csv, ","), (batch_export_to_tsv, "\t")])
def test_batch_export_union_of_columns_missing_is_nan(processed, tmp_path, exporter, sep):
    second = _second_subject(tmp_path)
    out = tmp_path / ("b.csv" if sep == "," else "b.tsv")
    returned = exporter([processed, second], out)
    assert Path(returned) == out
    frame = read_table(out, sep)
    assert len(frame) == 2
    assert frame["subject_id"].tolist() == ["01", "02"]
    assert pd.isna(frame["session_id"].iloc[0]) and frame["session_id"].iloc[1] == "03"
    col = "RegionalDamage.percent_damaged_Toy_10Parcels."
    for region in ("A", "B", "C", "D"):
        assert col + region in frame.columns
    assert frame[col + "A"].tolist() == [10.0, 50.0]
    assert frame[col + "C"].iloc[0] == 0.0 and pd.isna(frame[col + "C"].iloc[1])
    assert pd.isna(frame[col + "D"].iloc[0]) and frame[col + "D"].iloc[1] == 25.0
    assert frame["RegionalDamage.lesion_volume_mm3"].tolist() == [480.0, 64.0]
    # Struct.* exist only for the first subject.
    struct = [c for c in frame.columns if c.startswith("Struct.")]
    assert struct and frame[struct].iloc[1].isna().all()
    # Exactly one header line and one line per subject.
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_batch_export_errors(subject, processed, tmp_path):
    for exporter in (batch_export_to_csv, batch_export_to_tsv):
        with pytest.raises(ValueError):
            exporter([], tmp_path / "empty.csv")
        with pytest.raises(ValueError):
            exporter([processed, subject], tmp_path / "noresults.csv")  # second has none
    assert not (tmp_path / "empty.csv").exists()


def test_batch_export_analysis_name(processed, tmp_path):
    out = batch_export_to_csv([processed, _second_subject(tmp_path)], tmp_path / "b.csv", analysis_name="RegionalDamage")
    frame = pd.read_csv(out)
    assert not any(c.startswith("Struct.") for c in frame.columns)


def test_export_provenance_to_json(processed, tmp_path):
    out = export_provenance_to_json(processed, tmp_path / "prov.json")
    record = strict_json(out)
    text = json.dumps(record)
    source = Path(processed.metadata["source_path"])
    assert sha256(source) in text
    assert source.name in text
    assert "RegionalDamage" in text and "load" in text
    assert len(out.read_text().splitlines()) > 1
    compact = export_provenance_to_json(processed, tmp_path / "prov0.json", indent=0)
    assert len(compact.read_text().strip().splitlines()) == 1


def test_export_provenance_without_provenance_raises(tmp_path):
    subject = SubjectData(nib.Nifti1Image(box(SHAPE_6_2), AFF_6_2), NLIN6, metadata={"subject_id": "01"})
    assert not subject.provenance
    with pytest.raises(ValueError):
        export_provenance_to_json(subject, tmp_path / "prov.json")


# ------------------------------------------------------------ derivatives validation


@pytest.fixture
def exported(processed, tmp_path) -> Path:
    root = tmp_path / "derivatives" / "lacuna"
    export_bids_derivatives(processed, root)
    return root


def test_validate_fresh_export_passes(exported):
    result = validate_bids_derivatives(exported)
    assert set(result) >= {"errors", "warnings"}
    assert result["errors"] == []
    assert isinstance(result["warnings"], list)


def _assert_invalid(root: Path, *fragments: str) -> list[str]:
    result = validate_bids_derivatives(root, raise_on_error=False)
    assert result["errors"], "the validator found nothing wrong"
    for fragment in fragments:
        assert any(fragment in error for error in result["errors"]), (fragment, result["errors"])
    with pytest.raises(BidsError):
        validate_bids_derivatives(root)
    with pytest.raises(BidsError):
        validate_bids_derivatives(root, raise_on_error=True)
    return result["errors"]


def test_validate_missing_dataset_description(exported):
    (exported / "dataset_description.json").unlink()
    _assert_invalid(exported, "dataset_description")


def test_validate_invalid_json_description(exported):
    (exported / "dataset_description.json").write_text("{not: json", encoding="utf-8")
    _assert_invalid(exported, "dataset_description")


@pytest.mark.parametrize("key", ["GeneratedBy", "Name", "BIDSVersion"])
def test_validate_description_missing_required_key(exported, key):
    path = exported / "dataset_description.json"
    document = json.loads(path.read_text())
    del document[key]
    path.write_text(json.dumps(document), encoding="utf-8")
    _assert_invalid(exported, key)


def test_validate_badly_named_file(exported):
    bad = exported / "sub-01" / "anat" / "sub-01_lesion_mask.nii.gz"
    shutil.copy(exported / "sub-01" / "anat" / MASK_NAME, bad)
    bad.with_name("sub-01_lesion_mask.json").write_text("{}", encoding="utf-8")
    _assert_invalid(exported, "sub-01_lesion_mask.nii.gz")


def test_validate_bad_subject_folder(exported):
    shutil.copytree(exported / "sub-01", exported / "sub-01_x")
    _assert_invalid(exported, "sub-01_x")


def test_validate_nifti_without_sidecar(exported):
    (exported / "sub-01" / "anat" / MASK_NAME.replace(".nii.gz", ".json")).unlink()
    _assert_invalid(exported, MASK_NAME)


def test_validate_res_file_without_resolution(exported):
    sidecar = exported / "sub-01" / "anat" / MASK_NAME.replace(".nii.gz", ".json")
    document = json.loads(sidecar.read_text())
    del document["Resolution"]
    sidecar.write_text(json.dumps(document), encoding="utf-8")
    _assert_invalid(exported, "Resolution")


def test_validate_parcel_table_without_index(exported):
    path = exported / "sub-01" / "anat" / PARCEL_NAME
    frame = pd.read_csv(path, sep="\t", keep_default_na=False)
    frame.drop(columns=["index"]).to_csv(path, sep="\t", index=False)
    _assert_invalid(exported, "index")


def test_validate_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate_bids_derivatives(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        validate_bids_derivatives(tmp_path / "nope", raise_on_error=False)


def test_validate_does_not_modify_the_folder(exported):
    before = {name: sha256(exported / name) for name in files_below(exported)}
    validate_bids_derivatives(exported)
    assert {name: sha256(exported / name) for name in files_below(exported)} == before


def test_large_input_checksums_are_kept_between_runs(tmp_path, monkeypatch):
    import hashlib
    import os

    from lacuna.core import provenance
    from lacuna.core.datadir import get_data_dir

    def forget_in_process() -> None:
        provenance._sha256_cached.cache_clear()
        provenance._persisted_digests.cache_clear()

    monkeypatch.setattr(provenance, "PERSISTED_DIGEST_BYTES", 1024)
    forget_in_process()
    path = tmp_path / "tractogram.tck"
    path.write_bytes(bytes(range(256)) * 64)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance.sha256_file(path) == expected
    store = get_data_dir() / "checksums.json"
    entries = json.loads(store.read_text())
    (key,) = [k for k, v in entries.items() if v == expected]
    # A later process takes the stored digest for the same path, size and time...
    store.write_text(json.dumps({key: "f" * 64}))
    forget_in_process()
    assert provenance.sha256_file(path) == "f" * 64
    # ...and hashes the file again once it changed.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    forget_in_process()
    assert provenance.sha256_file(path) == expected
    forget_in_process()
