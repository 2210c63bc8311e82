"""Group inference through the CLI, on a small cohort whose participant level really ran
(functional LNM on a tiny synthetic connectome), against independent computations:
numpy (overlap), nilearn's permuted_ols (t, FWE p, TFCE), scipy (Student t, Fisher)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from lacuna.cli.main import cli, expand_multi_value_options
from lacuna.core.exit_codes import ExitCode

from test_functional import GRID, SPACE, _mask, _timeseries, _write

mass_univariate = pytest.importorskip("nilearn.mass_univariate")

ATLAS = "Schaefer2018_100Parcels7Networks"
N_MASKS = 16
T_MAP = "sub-{s}/anat/sub-{s}_space-MNI152NLin6Asym_res-2_label-lesion_desc-flnmconnt_statmap.nii.gz"
GROUP = "space-MNI152NLin6Asym_res-2_desc-flnmconnt{analysis}{statistic}_statmap"


@dataclass
class Cohort:
    bids: Path
    out: Path
    subjects: list[str]
    volumes: np.ndarray  # lesion volume in mm^3, computed here from the masks
    table: pd.DataFrame


def _run(*args):
    return CliRunner().invoke(cli, expand_multi_value_options([str(a) for a in args]), catch_exceptions=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_atlases) -> Cohort:
    root = tmp_path_factory.mktemp("group_inference")
    bids = root / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "group", "BIDSVersion": "1.10.0"}))
    rng = np.random.default_rng(18)
    subjects = [f"{i:02d}" for i in range(1, N_MASKS + 1)]
    volumes = []
    for number, subject in enumerate(subjects):
        data = np.zeros(GRID.shape, dtype=np.uint8)
        x0 = 36 + (0 if number % 2 == 0 else 7) + int(rng.integers(0, 5))  # cases left, controls right
        y0, z0 = int(rng.integers(50, 61)), int(rng.integers(40, 47))
        size = int(rng.integers(1, 4))
        data[x0 : x0 + size, y0 : y0 + 2, z0 : z0 + 2] = 1
        volumes.append(float(data.sum()) * 8.0)
        folder = bids / f"sub-{subject}" / "anat"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, GRID.affine), folder / f"sub-{subject}_space-{SPACE}_res-2_label-lesion_mask.nii.gz")
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{s}" for s in subjects],
            "group": ["patient" if i % 2 == 0 else "control" for i in range(N_MASKS)],
            "score": np.round(rng.normal(10, 3, N_MASKS), 2),
            "age": rng.integers(40, 80, N_MASKS),
            "sex": rng.choice(["F", "M"], N_MASKS),
        }
    )
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    _write(root / "conn.h5", _timeseries(8, 40, seed=3))
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LACUNA_DATA_DIR", str(root / "cache"))
        result = _run(
            bids, out, "participant", "--functional-connectome", root / "conn.h5", "--atlas-dir", shared_atlases,
            "--atlas", ATLAS, "--skip-bids-validation",
        )
    assert result.exit_code == 0, result.output
    return Cohort(bids, out, subjects, np.array(volumes), table)


def _maps(cohort: Cohort) -> np.ndarray:
    """The participant t maps at the connectome's voxels (independent read)."""
    mask = _mask()
    return np.stack([nib.load(cohort.out / T_MAP.format(s=s)).get_fdata()[mask] for s in cohort.subjects])


def _group_map(cohort: Cohort, analysis: str, statistic: str) -> tuple[np.ndarray, dict]:
    path = cohort.out / "group" / (GROUP.format(analysis=analysis, statistic=statistic) + ".nii.gz")
    sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    return nib.load(path).get_fdata(), sidecar


def _nilearn(tested, maps, covariates, n_perm, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mass_univariate.permuted_ols(
            tested_vars=np.asarray(tested, float)[:, None], target_vars=maps, confounding_vars=covariates,
            model_intercept=True, two_sided_test=True, n_perm=n_perm, random_state=0, **options,
        )


def _within_monte_carlo(logp_ours, logp_theirs, n_perm):
    p1, p2 = 10.0 ** -np.asarray(logp_ours), 10.0 ** -np.asarray(logp_theirs)
    tolerance = 5 * np.sqrt(2 * np.clip(p2, 1 / n_perm, 1) * (1 - np.clip(p2, 0, 1 - 1 / n_perm)) / n_perm) + 2 / n_perm
    return np.all(np.abs(p1 - p2) <= tolerance)


def test_sensitivity_maps_equal_numpy_and_carry_the_binding_keys(cohort):
    result = _run(cohort.bids, cohort.out, "group", "--network-threshold", "2.5", "--n-permutations", "0")
    assert result.exit_code == 0, result.output
    maps = _maps(cohort)
    expected = {
        "PercentPositive": 100 * np.mean(maps > 2.5, axis=0),
        "PercentNegative": 100 * np.mean(maps < -2.5, axis=0),
    }
    expected["PercentSigned"] = expected["PercentPositive"] - expected["PercentNegative"]
    for statistic, values in expected.items():
        volume, sidecar = _group_map(cohort, "Sensitivity", statistic)
        np.testing.assert_allclose(volume[_mask()], values, atol=1e-4)
        assert np.all(volume[~_mask()] == 0)
        assert sidecar["Analysis"] == "Sensitivity" and sidecar["Statistic"] == statistic
        assert sidecar["Source"] == "flnmconnt" and sidecar["N"] == N_MASKS and sidecar["Threshold"] == 2.5
        assert sidecar["Excluded"] == [] and sidecar["Resolution"]


def test_specificity_equals_nilearn_with_covariates_and_liebermeister_equals_scipy(cohort):
    n_perm = 1000
    result = _run(
        cohort.bids, cohort.out, "group", "--cases-column", "group", "--cases", "patient",
        "--covariate", "age", "lesion_volume", "--n-permutations", n_perm, "--random-seed", 5,
        "--network-threshold", "2",
    )
    assert result.exit_code == 0, result.output
    maps = _maps(cohort)
    case = (cohort.table["group"] == "patient").to_numpy(float)
    covariates = np.column_stack([cohort.table["age"].to_numpy(float), cohort.volumes])
    reference = _nilearn(case, maps, covariates, n_perm)
    t, sidecar = _group_map(cohort, "Specificity", "T")
    np.testing.assert_allclose(t[_mask()], reference["t"][0], rtol=1e-5, atol=1e-5)
    dof = N_MASKS - 4
    logp, _ = _group_map(cohort, "Specificity", "Logp")
    np.testing.assert_allclose(logp[_mask()], -np.log10(2 * stats.t.sf(np.abs(reference["t"][0]), dof)), rtol=1e-4, atol=1e-6)
    logp_fwe, fwe_sidecar = _group_map(cohort, "Specificity", "LogpFwe")
    assert _within_monte_carlo(logp_fwe[_mask()], reference["logp_max_t"][0], n_perm)
    for document in (sidecar, fwe_sidecar):
        assert document["N"] == N_MASKS and document["NCases"] == 8 and document["NControls"] == 8
        assert document["Covariates"] == ["age", "lesion_volume"] and document["Source"] == "flnmconnt"
    assert fwe_sidecar["Statistic"] == "logp_fwe" and fwe_sidecar["NPermutations"] == n_perm and fwe_sidecar["RandomSeed"] == 5
    # Liebermeister on |t| > 2
    lieb, lieb_sidecar = _group_map(cohort, "Liebermeister", "Logp")
    above = np.abs(maps) > 2
    a, b = above[case == 1].sum(0), above[case == 0].sum(0)
    for voxel in np.unique(np.column_stack([a, b]), axis=0, return_index=True)[1]:
        p = stats.fisher_exact([[a[voxel] + 1, b[voxel]], [8 - a[voxel], 8 - b[voxel] + 1]], alternative="greater")[1]
        assert lieb[_mask()][voxel] == pytest.approx(-np.log10(p), rel=1e-5, abs=1e-6)
    assert lieb_sidecar["Threshold"] == 2 and lieb_sidecar["NCases"] == 8
    summary = json.loads((cohort.out / "group" / "summary.json").read_text())["inference"]
    assert summary["cases_column"] == "group" and summary["cases"] == ["patient"]
    assert summary["covariates"] == ["age", "lesion_volume"] and summary["n_permutations"] == n_perm
    assert summary["random_seed"] == 5
    records = {(r["Analysis"], r["Source"]): r for r in summary["analyses"]}
    assert records[("Specificity", "flnmconnt")]["NCases"] == 8
    assert records[("Liebermeister", "flnmconnt")]["Excluded"] == []


def test_association_and_parcel_tables_equal_nilearn(cohort):
    n_perm = 1000
    result = _run(
        cohort.bids, cohort.out, "group", "--score-column", "score", "--covariate", "sex",
        "--n-permutations", n_perm,
    )
    assert result.exit_code == 0, result.output
    maps = _maps(cohort)
    score = cohort.table["score"].to_numpy(float)
    sex = (cohort.table["sex"] == "M").to_numpy(float)[:, None]  # categorical: one indicator
    reference = _nilearn(score, maps, sex, n_perm)
    t, sidecar = _group_map(cohort, "Association", "T")
    np.testing.assert_allclose(t[_mask()], reference["t"][0], rtol=1e-5, atol=1e-5)
    assert sidecar["Score"] == "score" and sidecar["Covariates"] == ["sex"] and "NCases" not in sidecar
    # parcel level: the participants' mean t per parcel, FWE over parcels
    tables = [
        pd.read_csv(
            cohort.out / f"sub-{s}/anat/sub-{s}_space-{SPACE}_atlas-Schaefer2018_seg-100Parcels7Networks_label-lesion_desc-flnmconnt_parcelstats.tsv",
            sep="\t", na_values="n/a", keep_default_na=False,
        )["mean"].to_numpy(float)
        for s in cohort.subjects
    ]
    values = np.stack(tables)
    usable = np.isfinite(values).all(axis=0) & (np.ptp(values, axis=0) > 0)
    assert usable.sum() >= 3
    parcel_reference = _nilearn(score, values[:, usable], sex, n_perm)
    path = cohort.out / "group" / "atlas-Schaefer2018_seg-100Parcels7Networks_desc-flnmconntMeanAssociation_parcelstats.tsv"
    frame = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(frame.columns) == ["region", "t", "logp", "logp_fwe"] and len(frame) == values.shape[1]
    np.testing.assert_allclose(frame["t"].to_numpy()[usable], parcel_reference["t"][0], rtol=1e-5)
    assert _within_monte_carlo(frame["logp_fwe"].to_numpy()[usable], parcel_reference["logp_max_t"][0], n_perm)
    table_sidecar = json.loads(path.with_suffix(".json").read_text())
    assert table_sidecar["Analysis"] == "Association" and table_sidecar["N"] == N_MASKS
    assert table_sidecar["Source"] == "flnmconntMean" and table_sidecar["NPermutations"] == n_perm
    assert (cohort.out / "group" / "atlas-Schaefer2018_seg-100Parcels7Networks_desc-regionaldamagePercentDamagedAssociation_parcelstats.tsv").is_file()


def test_left_out_masks_are_listed_with_their_reasons(cohort, tmp_path):
    table = cohort.table.copy()
    table["group"] = table["group"].astype(object)
    table.loc[1, "group"] = "unclear"  # neither a case nor a control value
    table.loc[2, "age"] = None  # missing covariate
    table = table.drop(index=3)  # no row
    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    result = _run(
        cohort.bids, cohort.out, "group", "--participants-file", path, "--cases-column", "group",
        "--cases", "patient", "--controls", "control", "--covariate", "age", "--n-permutations", "50",
    )
    assert result.exit_code == 0, result.output
    _, sidecar = _group_map(cohort, "Specificity", "T")
    reasons = {entry["participant_id"]: entry["reason"] for entry in sidecar["Excluded"]}
    assert set(reasons) == {"sub-02", "sub-03", "sub-04"}
    assert "neither" in reasons["sub-02"] and "missing age" in reasons["sub-03"] and "no row" in reasons["sub-04"]
    assert sidecar["N"] == N_MASKS - 3
    summary = json.loads((cohort.out / "group" / "summary.json").read_text())["inference"]
    record = next(r for r in summary["analyses"] if r["Analysis"] == "Specificity" and r["Source"] == "flnmconnt")
    assert record["N"] == N_MASKS - 3 and len(record["Excluded"]) == 3
    sensitivity = next(r for r in summary["analyses"] if r["Analysis"] == "Sensitivity")
    assert sensitivity["N"] == N_MASKS  # needs no table


@pytest.mark.parametrize(
    "options, code, words",
    [
        (["--cases-column", "diagnosis", "--cases", "x"], ExitCode.USAGE, "no column diagnosis"),
        (["--score-column", "nosuch"], ExitCode.USAGE, "no column nosuch"),
        (["--covariate", "age", "--covariate", "height", "--score-column", "score"], ExitCode.USAGE, "no column height"),
        (["--cases", "patient"], ExitCode.USAGE, "--cases-column"),
        (["--cases-column", "group"], ExitCode.USAGE, "--cases VALUE"),
        (["--participants-file", "missing.tsv", "--score-column", "score"], ExitCode.NO_INPUT, "not found"),
    ],
)
def test_bad_columns_and_options_fail_before_any_work(cohort, options, code, words):
    summary = cohort.out / "group" / "summary.json"
    before = summary.stat().st_mtime_ns if summary.exists() else None
    result = _run(cohort.bids, cohort.out, "group", *options)
    assert result.exit_code == code, result.output
    assert words in result.output
    assert (summary.stat().st_mtime_ns if summary.exists() else None) == before


def test_same_seed_gives_identical_files_and_tfce_equals_nilearn(cohort):
    from nilearn.mass_univariate._utils import calculate_tfce
    from scipy.ndimage import generate_binary_structure

    args = [cohort.bids, cohort.out, "group", "--cases-column", "group", "--cases", "patient", "--n-permutations", "200", "--tfce"]
    outputs = []
    for seed in (3, 3, 4):
        assert _run(*args, "--random-seed", seed).exit_code == 0
        outputs.append({name: _group_map(cohort, "Specificity", name)[0] for name in ("LogpFwe", "LogpTfceFwe", "Tfce", "T")})
    np.testing.assert_array_equal(outputs[0]["LogpFwe"], outputs[1]["LogpFwe"])
    np.testing.assert_array_equal(outputs[0]["LogpTfceFwe"], outputs[1]["LogpTfceFwe"])
    assert not np.array_equal(outputs[0]["LogpFwe"], outputs[2]["LogpFwe"])
    # TFCE of the group t map on the connectome's voxels (the voxels where the maps are non-zero)
    t = outputs[0]["T"]
    inside = np.zeros(GRID.shape + (1,))
    inside[_mask(), 0] = t[_mask()]
    expected = calculate_tfce(inside, generate_binary_structure(3, 1))[..., 0]
    np.testing.assert_allclose(outputs[0]["Tfce"], expected, rtol=1e-4, atol=1e-3)
    _, sidecar = _group_map(cohort, "Specificity", "LogpTfceFwe")
    assert sidecar["Statistic"] == "logp_tfce_fwe" and sidecar["NPermutations"] == 200


def test_zero_permutations_write_parametric_maps_only(cohort):
    result = _run(cohort.bids, cohort.out, "group", "--cases-column", "group", "--cases", "patient", "--n-permutations", "0")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (cohort.out / "group").iterdir()}
    assert GROUP.format(analysis="Specificity", statistic="T") + ".nii.gz" in names
    assert not any("LogpFwe" in name for name in names)


# --- the design, without the CLI ------------------------------------------------


def _options(tmp_path, table: pd.DataFrame, **options):
    from lacuna.bids.group_options import InferenceOptions

    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return InferenceOptions(bids_dir=tmp_path, participants_file=path, **options)


def test_masks_match_rows_by_participant_and_session(tmp_path):
    from lacuna.bids.group_design import MaskIdentity, build_contrasts, load_participants

    table = pd.DataFrame(
        {"participant_id": ["sub-01", "sub-01", "02", "sub-03"], "session_id": ["ses-a", "b", "n/a", "ses-a"], "score": ["1", "2", "3", "x"]}
    )
    options = _options(tmp_path, table, score_column="score")
    masks = [
        MaskIdentity("sub-01", "ses-a", "m1"),
        MaskIdentity("sub-01", "ses-b", "m2"),
        MaskIdentity("sub-01", None, "m3"),  # two rows: ambiguous
        MaskIdentity("sub-02", None, "m4"),  # prefix added to the table's "02"
        MaskIdentity("sub-03", "ses-a", "m5"),  # not a number
        MaskIdentity("sub-04", None, "m6"),  # no row
    ]
    (contrast,) = build_contrasts(masks, load_participants(options), options)
    assert contrast.masks == [0, 1, 3]
    np.testing.assert_array_equal(contrast.tested, [1.0, 2.0, 3.0])
    reasons = [entry["reason"] for entry in contrast.excluded]
    assert "2 rows" in reasons[0] and "not a number" in reasons[1] and "no row" in reasons[2]


def test_categorical_covariates_get_one_indicator_per_level_but_the_first(tmp_path):
    from lacuna.bids.group_design import MaskIdentity, build_contrasts, load_participants

    table = pd.DataFrame(
        {"participant_id": ["sub-1", "sub-2", "sub-3", "sub-4"], "g": ["y", "n", "y", "n"], "site": ["B", "A", "C", "A"], "age": ["50", "61.5", "70", "40"]}
    )
    options = _options(tmp_path, table, cases_column="g", cases=("y",), covariates=("site", "age", "lesion_volume"))
    masks = [MaskIdentity(f"sub-{i}", None, f"m{i}", lesion_volume=100.0 * i) for i in range(1, 5)]
    (contrast,) = build_contrasts(masks, load_participants(options), options)
    np.testing.assert_array_equal(contrast.tested, [1, 0, 1, 0])
    np.testing.assert_array_equal(contrast.covariates, [[1, 0, 50, 100], [0, 0, 61.5, 200], [0, 1, 70, 300], [0, 0, 40, 400]])


# --- structural maps ------------------------------------------------------------


def test_disconnection_maps_use_the_disconnection_threshold(tmp_path, shared_atlases):
    from test_structural import cortex_pool, sphere_mask, synthetic_streamlines, write_tck

    tck = write_tck(tmp_path / "tiny.tck", synthetic_streamlines(300, seed=3, pool=cortex_pool(shared_atlases)))
    (tmp_path / "tiny.json").write_text(json.dumps({"SpatialReference": SPACE}))
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "sLNM", "BIDSVersion": "1.10.0"}))
    centres = [(-24, -14, 20), (20, -30, 10), (-30, 0, 10), (26, -10, 24), (-20, -40, 30), (30, 10, 0)]
    for number, centre in enumerate(centres, start=1):
        folder = bids / f"sub-{number:02d}" / "anat"
        folder.mkdir(parents=True)
        data = sphere_mask(centre, 10)
        nib.save(nib.Nifti1Image(data, GRID.affine), folder / f"sub-{number:02d}_space-{SPACE}_res-2_label-lesion_mask.nii.gz")
    pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(1, 7)], "g": ["a", "b"] * 3}).to_csv(bids / "participants.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    assert _run(bids, out, "participant", "--tractogram", tck, "--atlas-dir", shared_atlases, "--atlas", ATLAS, "--skip-bids-validation").exit_code == 0
    result = _run(bids, out, "group", "--disconnection-threshold", "0.02", "--cases-column", "g", "--cases", "a", "--n-permutations", "20")
    assert result.exit_code == 0, result.output
    maps = np.stack([
        nib.load(out / f"sub-{i:02d}/anat/sub-{i:02d}_space-{SPACE}_res-2_label-lesion_desc-snmtinydisconnection_probseg.nii.gz").get_fdata()
        for i in range(1, 7)
    ])
    stem = out / "group" / f"space-{SPACE}_res-2_desc-snmtinydisconnection"
    positive = nib.load(f"{stem}SensitivityPercentPositive_statmap.nii.gz").get_fdata()
    np.testing.assert_allclose(positive, 100 * np.mean(maps > 0.02, axis=0), atol=1e-4)
    assert not Path(f"{stem}SensitivityPercentNegative_statmap.nii.gz").exists()
    sidecar = json.loads(Path(f"{stem}SensitivityPercentPositive_statmap.json").read_text())
    assert sidecar["Threshold"] == 0.02 and sidecar["Source"] == "snmtinydisconnection"
    lieb = nib.load(f"{stem}LiebermeisterLogp_statmap.nii.gz").get_fdata()
    above = maps > 0.02
    a, b = above[0::2].sum(0), above[1::2].sum(0)
    voxel = np.unravel_index(np.argmax(a - b), a.shape)
    p = stats.fisher_exact([[a[voxel] + 1, b[voxel]], [3 - a[voxel], 3 - b[voxel] + 1]], alternative="greater")[1]
    assert lieb[voxel] == pytest.approx(-np.log10(p), rel=1e-5)
    assert (out / "group" / "atlas-Schaefer2018_seg-100Parcels7Networks_desc-snmtinyFractionCutSpecificity_parcelstats.tsv").is_file()
