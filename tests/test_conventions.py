"""BIDS-App conventions through the command line: both option spellings, exit codes of the
BIDS execution specification, one-line errors, and input discovery (inheritance,
.bidsignore, filter files, derivative datasets, SourceDatasets, CITATION.md).

Small 2 mm masks on the synthetic demo parcellation keep each run to a second or two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import save_mask, sphere

from lacuna.workflows.demo import DEMO_ATLAS, write_demo_atlas
from lacuna.cli.main import cli, expand_multi_value_options
from lacuna.core.exit_codes import ExitCode
from lacuna.core.spaces import standard_grid
from lacuna.bids.validation import validate_bids_derivatives

SPACE = "MNI152NLin6Asym"
GRID = standard_grid(SPACE, 2)
CENTRES = [(-30, -20, 10), (25, 30, 30), (0, -70, 20), (-40, 10, -5)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("atlases")
    write_demo_atlas(folder)
    return folder


def mask_path(root: Path, sub: str, ses: str | None = None, label: str = "lesion", space: str | None = SPACE) -> Path:
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"space-{space}"] if space else []) + [f"label-{label}", "mask.nii.gz"]
    return folder / "_".join(parts)


def write_dataset(root: Path, masks: list[tuple], description: dict | None = None) -> Path:
    """A BIDS dataset of 2 mm spheres: ``masks`` holds (sub, ses, label, space) tuples."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(description or {"Name": "test", "BIDSVersion": "1.10.0"}))
    for index, (sub, ses, label, space) in enumerate(masks):
        save_mask(mask_path(root, sub, ses, label, space), sphere(GRID, CENTRES[index % len(CENTRES)], 10), GRID.affine)
    return root


def lacuna(*args):
    """The CLI in-process, with the console script's argument pre-processing."""
    argv = expand_multi_value_options([str(a) for a in args])
    result = CliRunner().invoke(cli, argv, prog_name="lacuna")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"lacuna {' '.join(argv)} raised:\n{result.output}") from result.exception
    return result


def participant(bids: Path, out: Path, atlas_dir: Path, *options, form: str = "positional"):
    prefix = ["run"] if form == "run" else []
    return lacuna(*prefix, bids, out, "participant", "--atlas-dir", atlas_dir, "--atlas", DEMO_ATLAS, *options)


def provenances(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*_provenance.json"))


def lacuna_executable() -> str:
    found = shutil.which("lacuna") or str(Path(sys.executable).with_name("lacuna"))
    if not Path(found).is_file():
        pytest.skip("the lacuna console script is not installed")
    return found


@pytest.fixture
def three(tmp_path) -> Path:
    return write_dataset(tmp_path / "bids", [("01", "1", "lesion", SPACE), ("01", "2", "lesion", SPACE), ("02", None, "lesion", SPACE)])


# ------------------------------------------------------------ 1. both spellings


@pytest.mark.parametrize("form", ["positional", "run"])
@pytest.mark.parametrize("flag", ["--participant_label", "--participant-label"])
def test_participant_label_both_spellings(tmp_path, three, atlas_dir, form, flag):
    out = tmp_path / "out"
    result = participant(three, out, atlas_dir, flag, "sub-01", "02", "--skip-bids-validation", form=form)
    assert result.exit_code == 0, result.output
    assert provenances(out) == [
        "sub-01/ses-1/anat/sub-01_ses-1_label-lesion_provenance.json",
        "sub-01/ses-2/anat/sub-01_ses-2_label-lesion_provenance.json",
        "sub-02/anat/sub-02_label-lesion_provenance.json",
    ]
    only = participant(three, tmp_path / "only", atlas_dir, flag, "02", "--skip-bids-validation", form=form)
    assert only.exit_code == 0 and provenances(tmp_path / "only") == ["sub-02/anat/sub-02_label-lesion_provenance.json"]


@pytest.mark.parametrize("form", ["positional", "run"])
@pytest.mark.parametrize("flag", ["--session_label", "--session-label"])
def test_session_label_both_spellings(tmp_path, three, atlas_dir, form, flag):
    out = tmp_path / "out"
    result = participant(three, out, atlas_dir, flag, "2", "--skip-bids-validation", form=form)
    assert result.exit_code == 0, result.output
    assert provenances(out) == ["sub-01/ses-2/anat/sub-01_ses-2_label-lesion_provenance.json"]


@pytest.mark.parametrize("flag", ["--skip_bids_validator", "--skip-bids-validation", "--skip_bids_validation"])
def test_skip_bids_validation_spellings(tmp_path, three, atlas_dir, flag):
    reported = participant(three, tmp_path / "a", atlas_dir)
    assert reported.exit_code == 0 and "does not accept" in reported.output
    skipped = participant(three, tmp_path / "b", atlas_dir, flag)
    assert skipped.exit_code == 0, skipped.output
    assert "does not accept" not in skipped.output and "bids-validator" not in skipped.output


@pytest.mark.parametrize(
    "options, per_process",
    [
        (["--nthreads", "4", "--nprocs", "2"], "2"),
        (["--n_cpus", "3"], "3"),
        (["--omp-nthreads", "3"], "3"),
        (["--nthreads", "8", "--omp-nthreads", "2", "--nprocs", "2"], "2"),
    ],
)
def test_thread_options_set_the_thread_settings(tmp_path, three, atlas_dir, monkeypatch, options, per_process):
    for variable in ("LACUNA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    work = tmp_path / "work"
    result = participant(three, tmp_path / "out", atlas_dir, *options, "-w", work, "--skip-bids-validation", "-v")
    assert result.exit_code == 0, result.output
    assert f"{per_process} thread(s) per process" in result.output
    # Inherited by the worker processes and read by the numerical libraries.
    assert os.environ["LACUNA_NUM_THREADS"] == per_process
    assert os.environ["OMP_NUM_THREADS"] == per_process == os.environ["OPENBLAS_NUM_THREADS"]
    settings = json.loads((work / "lacuna_participant_config.json").read_text())
    if "--nthreads" in options:
        assert settings["nthreads"] == int(options[options.index("--nthreads") + 1])


def test_contradicting_thread_options_are_a_usage_error(tmp_path, three, atlas_dir):
    result = participant(three, tmp_path / "out", atlas_dir, "--nthreads", "1", "--nprocs", "2")
    assert result.exit_code == ExitCode.USAGE == 64
    assert "--nthreads" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------- 2. exit codes


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["BIDS", "OUT", "banana"], 17, ["unknown analysis level 'banana'"]),
        (["BIDS", "OUT", "participant", "--no-such-option"], 64, ["No such option"]),
        (["run"], 64, ["Missing argument"]),
        (["BIDS", "OUT", "participant", "--output-space", "nowhere"], 64, ["--output-space"]),
        (["BIDS", "OUT", "participant", "--nprocs", "0"], 64, ["--nprocs"]),
        (["atlases", "fetch"], 64, ["--all"]),
    ],
    ids=["unknown-level", "unknown-option", "missing-argument", "bad-choice", "bad-number", "subcommand-usage"],
)
def test_usage_errors(tmp_path, three, args, code, words):
    args = [str(three) if a == "BIDS" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = lacuna(*args)
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output


def _no_description(root: Path) -> None:
    write_dataset(root, [("01", None, "lesion", SPACE)])
    (root / "dataset_description.json").unlink()


def _no_masks(root: Path) -> None:
    write_dataset(root, [])
    save_mask(root / "sub-01/anat/sub-01_T1w.nii.gz", sphere(GRID, CENTRES[0], 10), GRID.affine)


@pytest.mark.parametrize(
    "setup, options, code, words",
    [
        (lambda root: None, [], 66, ["BIDS folder not found"]),
        (_no_description, [], 16, ["dataset_description.json"]),
        (_no_masks, [], 66, ["no lesion masks selected", "_mask.nii.gz"]),
        (lambda root: write_dataset(root, [("01", None, "lesion", SPACE)]), ["--participant-label", "99"], 18, ["99", "sub-01"]),
        (lambda root: write_dataset(root, [("01", None, "lesion", SPACE)]), ["--session-label", "9"], 18, ["--session-label 9"]),
        (lambda root: write_dataset(root, [("01", None, "lesion", SPACE)]), ["--mask-label", "tumour"], 18, ["tumour"]),
    ],
    ids=["missing-folder", "no-description", "no-masks", "unknown-participant", "unknown-session", "unknown-label"],
)
def test_input_exit_codes(tmp_path, atlas_dir, setup, options, code, words):
    bids = tmp_path / "bids"
    setup(bids)
    out = tmp_path / "out"
    result = participant(bids, out, atlas_dir, *options)
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output
    assert not list(out.glob("sub-*"))


def test_some_masks_failed_exits_1(tmp_path, three, atlas_dir):
    save_mask(mask_path(three, "03"), np.zeros(GRID.shape, np.uint8), GRID.affine)  # empty: fails alone
    result = participant(three, tmp_path / "out", atlas_dir, "--skip-bids-validation")
    assert result.exit_code == ExitCode.FAILURE == 1
    assert "3 done" in result.output and "1 failed" in result.output


def test_console_script_exit_codes(tmp_path, three):
    """The installed executable (main(), not click's test runner) uses the same codes."""
    executable = lacuna_executable()
    codes = {}
    for name, args in {
        "usage": [str(three), str(tmp_path / "o"), "participant", "--bogus"],
        "level": [str(three), str(tmp_path / "o"), "session"],
        "missing": [str(tmp_path / "nope"), str(tmp_path / "o"), "participant"],
        "group-without-outputs": [str(three), str(tmp_path / "o"), "group"],
    }.items():
        done = subprocess.run([executable, *args], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in done.stderr + done.stdout, done.stderr
        codes[name] = done.returncode
    assert codes == {"usage": 64, "level": 17, "missing": 66, "group-without-outputs": 66}


def test_exit_codes_are_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, code


# ------------------------------------------------------- 3. one-line errors


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "out"
    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_create("/sys/lacuna-probe"):
        pytest.skip("no folder this (root) user cannot write to")
    return Path("/sys/lacuna-test-output")


def _can_create(path: str) -> bool:
    try:
        os.mkdir(path)
    except OSError:
        return False
    os.rmdir(path)
    return True


@pytest.mark.parametrize("where", ["unwritable", "file-in-the-way"])
def test_unwritable_output_folder_is_one_message(tmp_path, three, atlas_dir, where):
    if where == "unwritable":
        out = _unwritable_folder(tmp_path)
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
    result = participant(three, out, atlas_dir, "--skip-bids-validation")
    assert result.exit_code == ExitCode.CANNOT_CREATE == 73, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot write to" in errors[0]
    assert str(out.parent) in errors[0] and "output folder you can write to" in errors[0]


def test_unmatched_participant_label_is_named(tmp_path, three, atlas_dir):
    result = participant(three, tmp_path / "out", atlas_dir, "--participant-label", "01", "99", "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "WARNING" in line and "99" in line]
    assert len(warnings) == 1 and "--participant-label 99 matches no mask" in warnings[0]
    assert "01, 02" in warnings[0]  # the labels that do exist
    assert len(provenances(tmp_path / "out")) == 2  # sub-01's two sessions


# ------------------------------------------------------- 6. input discovery


def _off_grid_affine() -> np.ndarray:
    affine = GRID.affine.copy()
    affine[0, 3] += 1.0  # 1 mm off every template grid: the space must be declared
    return affine


def test_dataset_level_sidecar_is_inherited(tmp_path, atlas_dir):
    bids = write_dataset(tmp_path / "bids", [])
    for index, sub in enumerate(("01", "02", "03")):
        save_mask(mask_path(bids, sub, space=None), sphere(GRID, CENTRES[index], 10), _off_grid_affine())
    out = tmp_path / "out"
    undeclared = participant(bids, tmp_path / "undeclared", atlas_dir, "--skip-bids-validation")
    assert undeclared.exit_code == 1 and "3 failed" in undeclared.output  # no space anywhere

    (bids / "label-lesion_mask.json").write_text(json.dumps({"SpatialReference": SPACE}))
    # A more specific sidecar wins over the dataset-level one.
    (bids / "sub-03" / "sub-03_label-lesion_mask.json").write_text(json.dumps({"SpatialReference": "MNI305"}))
    result = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert result.exit_code == 1, result.output
    assert "2 done" in result.output and "1 failed" in result.output
    assert "FAILED sub-03_label-lesion_mask.nii.gz" in result.output and "MNI305" in result.output
    for sub in ("01", "02"):
        assert list(anat_of(out, sub).glob(f"sub-{sub}_space-{SPACE}_*_mask.nii.gz")), sub


def anat_of(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}" / "anat"


def test_input_bidsignore_is_honoured(tmp_path, atlas_dir):
    bids = write_dataset(
        tmp_path / "bids",
        [("01", None, "lesion", SPACE), ("02", None, "lesion", SPACE), ("03", None, "lesion", SPACE), ("01", None, "old", SPACE)],
    )
    (bids / ".bidsignore").write_text("# kept out of the analysis\nsub-03/\n*_label-old_mask.nii.gz\n")
    out = tmp_path / "out"
    result = participant(bids, out, atlas_dir)
    assert result.exit_code == 0, result.output
    assert "selected 2 mask(s)" in result.output
    assert provenances(out) == ["sub-01/anat/sub-01_label-lesion_provenance.json", "sub-02/anat/sub-02_label-lesion_provenance.json"]
    assert "does not accept 2 file name(s)" in result.output  # the ignored files are not reported either


@pytest.mark.parametrize(
    "query, expected",
    [
        ({"session": "1"}, ["sub-01/ses-1"]),
        ({"session": ["ses-2"], "subject": "01"}, ["sub-01/ses-2"]),
        ({"session": None}, ["sub-02", "sub-03"]),
        ({"label": "chronic"}, ["sub-03"]),
        ({"datatype": "anat", "space": SPACE, "session": ["1", None]}, ["sub-01/ses-1", "sub-02", "sub-03"]),
    ],
)
def test_bids_filter_file(tmp_path, atlas_dir, query, expected):
    bids = write_dataset(
        tmp_path / "bids",
        [("01", "1", "lesion", SPACE), ("01", "2", "lesion", SPACE), ("02", None, "lesion", SPACE), ("03", None, "chronic", SPACE)],
    )
    (tmp_path / "filter.json").write_text(json.dumps({"mask": query}))
    out = tmp_path / "out"
    result = participant(bids, out, atlas_dir, "--bids-filter-file", tmp_path / "filter.json", "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    assert sorted(str(Path(p).parent.parent) for p in provenances(out)) == expected


@pytest.mark.parametrize(
    "content, code, words",
    [
        (None, 64, ["no such file"]),
        ("{not json", 64, ["not valid JSON"]),
        ('{"t1w": {"session": "1"}}', 64, ['"mask"']),
        ('{"mask": {"flavour": "x"}}', 64, ["unknown entity 'flavour'"]),
        ('{"mask": {"session": "9"}}', 18, ["--bids-filter-file"]),
    ],
    ids=["missing", "not-json", "no-mask-query", "unknown-entity", "selects-nothing"],
)
def test_bad_bids_filter_file(tmp_path, three, atlas_dir, content, code, words):
    path = tmp_path / "filter.json"
    if content is not None:
        path.write_text(content)
    result = participant(three, tmp_path / "out", atlas_dir, "--bids-filter-file", path, "--skip-bids-validation")
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output
    assert "Traceback" not in result.output


def test_masks_in_a_derivative_dataset(tmp_path, atlas_dir):
    bids = write_dataset(tmp_path / "bids", [], {"Name": "raw", "BIDSVersion": "1.10.0", "DatasetDOI": "10.18112/openneuro.ds000001.v1.0.0", "License": "CC0"})
    save_mask(bids / "sub-01/anat/sub-01_T1w.nii.gz", sphere(GRID, CENTRES[0], 30), GRID.affine)
    lesions = write_dataset(
        bids / "derivatives" / "lesions",
        [("01", None, "lesion", SPACE), ("02", None, "lesion", SPACE)],
        {"Name": "lesion masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "manual"}], "License": "CC-BY-4.0"},
    )
    out = tmp_path / "out"
    without = participant(bids, tmp_path / "without", atlas_dir, "--skip-bids-validation")
    assert without.exit_code == 66 and "--derivatives" in without.output
    result = participant(bids, out, atlas_dir, "--derivatives", lesions, "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    assert len(provenances(out)) == 2
    sidecar = json.loads(next(anat_of(out, "02").glob("*_mask.json")).read_text())
    assert sidecar["Sources"] == [f"bids:lesions:sub-02/anat/sub-02_space-{SPACE}_label-lesion_mask.nii.gz"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": bids.resolve().as_uri(), "lesions": lesions.resolve().as_uri()}
    assert description["SourceDatasets"] == [
        {"URL": bids.resolve().as_uri(), "DOI": "doi:10.18112/openneuro.ds000001.v1.0.0", "License": "CC0"},
        {"URL": lesions.resolve().as_uri(), "License": "CC-BY-4.0"},
    ]
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []
    not_a_dataset = tmp_path / "plain"
    not_a_dataset.mkdir()
    missing = participant(bids, tmp_path / "o2", atlas_dir, "--derivatives", not_a_dataset)
    assert missing.exit_code == 66 and str(not_a_dataset) in missing.output


# ------------------------------------------------------- 7. citation, source datasets


def test_citation_and_source_datasets(tmp_path, atlas_dir, shared_atlases):
    description = {"Name": "raw", "BIDSVersion": "1.10.0", "DatasetDOI": "https://doi.org/10.5281/zenodo.123", "License": "PDDL"}
    grid_1mm = standard_grid(SPACE, 1)
    bids = write_dataset(tmp_path / "bids", [], description)
    save_mask(mask_path(bids, "01"), sphere(grid_1mm, (-40, -25, 55), 8), grid_1mm.affine)
    out = tmp_path / "out"
    result = lacuna(bids, out, "participant", "--atlas-dir", shared_atlases, "--atlas", "Schaefer2018_100Parcels7Networks",
                    "--atlas", "TianSubcortex_3TS1", "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    text = (out / "CITATION.md").read_text()
    from lacuna._version import __version__
    from lacuna.resources.parcellations import SCHAEFER_CITATION, TIAN_CITATION

    assert f"Lacuna {__version__}" in text and "Schaefer2018_100Parcels7Networks" in text and "TianSubcortex_3TS1" in text
    assert SCHAEFER_CITATION in text and TIAN_CITATION in text
    import numpy

    assert f"numpy {numpy.__version__}" in text and "## Methods" in text
    source = json.loads((out / "dataset_description.json").read_text())["SourceDatasets"][0]
    assert source == {"URL": bids.resolve().as_uri(), "DOI": "doi:10.5281/zenodo.123", "License": "PDDL"}
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []
    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if Path(validator).is_file():
        assert lacuna(bids, out, "group").exit_code == 0
        done = subprocess.run([validator, str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "[ERROR]" not in done.stdout, done.stdout + done.stderr


def test_unexpected_error_in_any_command_is_one_line(tmp_path, monkeypatch):
    import lacuna.bids.validation as validation

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(validation, "validate_bids_derivatives", broken)
    result = lacuna("validate", tmp_path)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "unexpected error (RuntimeError: simulated bug)" in result.output and "report" in result.output
