"""The brainlife.io wrapper ``main``: config.json in, participant and group levels, output/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lacuna._version import __version__
from lacuna.workflows.demo import DEMO_ATLAS, write_demo_atlas, write_demo_dataset

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main"
BIN = Path(sys.executable).parent


@pytest.fixture
def demo(tmp_path):
    """Inputs as brainlife.io stages them: beside the task's working folder."""
    inputs = tmp_path / "inputs"
    write_demo_atlas(inputs / "atlases")
    write_demo_dataset(inputs / "bids")
    task = tmp_path / "task"
    task.mkdir()
    return inputs, task


def _main(task: Path, config: dict, path: str) -> subprocess.CompletedProcess:
    (task / "config.json").write_text(json.dumps(config, indent=2))
    env = {**os.environ, "PATH": path}
    return subprocess.run([str(MAIN)], cwd=task, env=env, capture_output=True, text=True, timeout=600)


def _native_path() -> str:
    return f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def test_main_is_an_executable_that_knows_the_version():
    assert os.access(MAIN, os.X_OK)
    assert MAIN.read_text().startswith("#!/usr/bin/env python3")
    assert f'VERSION = "{__version__}"' in MAIN.read_text()


def test_sample_config_runs_both_levels(demo):
    inputs, task = demo
    config = {  # a sample brainlife.io config.json
        "bids": "../inputs/bids",
        "participant_label": "01 02",
        "atlas": [DEMO_ATLAS],
        "atlas_dir": "../inputs/atlases",
        "nprocs": 2,
        "skip_bids_validation": True,
    }
    result = _main(task, config, _native_path())
    assert result.returncode == 0, result.stdout + result.stderr
    output = task / "output"
    assert (output / "dataset_description.json").is_file()
    assert sorted(p.name for p in output.glob("sub-*")) == ["sub-01", "sub-02"]
    tables = list((output / "group").glob("atlas-SyntheticDemo_seg-16Parcels_*_parcelstats.tsv"))
    assert tables and all(len(t.read_text().splitlines()) == 4 for t in tables)  # header + 3 masks
    settings = json.loads((task / "work" / "lacuna_participant_config.json").read_text())
    assert settings["participant_labels"] == ["01", "02"] and settings["nprocs"] == 2
    product = json.loads((task / "product.json").read_text())
    assert product["lacuna"]["n_masks"] == 3
    assert all(m["type"] == "info" for m in product["brainlife"])


def test_single_mask_config(demo):
    inputs, task = demo
    mask = next((inputs / "bids" / "sub-04" / "anat").glob("*_mask.nii.gz"))
    config = {"mask": str(mask), "space": "MNI152NLin6Asym", "participant_label": "sub-P7",
              "atlas": DEMO_ATLAS, "atlas_dir": str(inputs / "atlases")}
    result = _main(task, config, _native_path())
    assert result.returncode == 0, result.stdout + result.stderr
    anat = task / "output" / "sub-P7" / "anat"
    assert (anat / "sub-P7_label-lesion_provenance.json").is_file()
    assert list(anat.glob("*atlas-SyntheticDemo_seg-16Parcels*_parcelstats.tsv"))
    assert (task / "output" / "group" / "summary.json").is_file()


def test_without_lacuna_on_path_it_runs_the_image(demo, tmp_path):
    """No `lacuna` on PATH: the wrapper calls apptainer with the image (a stand-in here)."""
    inputs, task = demo
    fake = tmp_path / "fakebin"
    fake.mkdir()
    log = tmp_path / "apptainer.log"
    lacuna = shutil.which("lacuna", path=_native_path()) or str(BIN / "lacuna")
    (fake / "apptainer").write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "args = sys.argv[1:]\n"
        "rest = args[args.index('lacuna', args.index('exec')) + 1:]\n"
        f"os.execv({lacuna!r}, [{lacuna!r}] + rest)\n"
    )
    (fake / "apptainer").chmod(0o755)
    system_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "lacuna").exists())
    config = {"bids": str(inputs / "bids"), "participant_label": ["03"], "atlas": DEMO_ATLAS, "atlas_dir": str(inputs / "atlases")}
    result = _main(task, config, f"{fake}{os.pathsep}{system_path}")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2  # participant, then group
    first = calls[0]
    assert first[:2] == ["exec", "--cleanenv"]
    assert f"docker://ghcr.io/lacuna-neuro/lacuna:{__version__}" in first
    binds = [first[i + 1] for i, arg in enumerate(first) if arg == "-B"]
    assert f"{(inputs / 'bids').resolve()}:{(inputs / 'bids').resolve()}" in binds
    assert f"{(task / 'output').resolve()}:{(task / 'output').resolve()}" in binds
    assert (task / "output" / "sub-03").is_dir()


def test_config_without_input_fails_clearly(demo):
    _, task = demo
    result = _main(task, {"atlas": DEMO_ATLAS}, _native_path())
    assert result.returncode == 64  # usage error (BIDS execution specification)
    assert "'bids'" in result.stderr and "'mask'" in result.stderr
    missing = _main(task, {"bids": str(task / "nothing-here")}, _native_path())
    assert missing.returncode == 66 and "nothing-here" in missing.stderr  # missing input


def test_every_option_reaches_lacuna(demo, tmp_path):
    """tractogram, output_space, the thread options, a filter file and derivative datasets
    are passed on (a stand-in lacuna records its arguments)."""
    inputs, task = demo
    fake = tmp_path / "fakebin"
    fake.mkdir()
    log = tmp_path / "lacuna.log"
    (fake / "lacuna").write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (fake / "lacuna").chmod(0o755)
    tractogram = inputs / "tracts" / "my tracts.tck"
    tractogram.parent.mkdir()
    tractogram.write_bytes(b"")
    (inputs / "filter.json").write_text('{"mask": {"session": "01"}}')
    lesions = inputs / "lesions"
    lesions.mkdir()
    config = {
        "bids": str(inputs / "bids"),
        "tractogram": [str(tractogram), "HCP1065"],
        "output_space": "analysis",
        "nthreads": 4,
        "omp_nthreads": 2,
        "bids_filter_file": str(inputs / "filter.json"),
        "derivatives": str(lesions),
    }
    result = _main(task, config, f"{fake}{os.pathsep}{os.environ.get('PATH', '')}")
    assert result.returncode == 0, result.stdout + result.stderr
    participant, group = [json.loads(line) for line in log.read_text().splitlines()]
    assert participant[2] == "participant" and group[2] == "group"
    pairs = list(zip(participant, participant[1:]))
    for pair in [
        ("--tractogram", str(tractogram.resolve())),
        ("--tractogram", "HCP1065"),
        ("--output-space", "analysis"),
        ("--nthreads", "4"),
        ("--omp-nthreads", "2"),
        ("--bids-filter-file", str((inputs / "filter.json").resolve())),
        ("--derivatives", str(lesions.resolve())),
    ]:
        assert pair in pairs, (pair, participant)


def test_output_space_and_threads_in_a_real_run(demo):
    inputs, task = demo
    config = {"bids": str(inputs / "bids"), "participant_label": "02", "atlas": DEMO_ATLAS,
              "atlas_dir": str(inputs / "atlases"), "output_space": "analysis", "nthreads": 2, "skip_bids_validation": True}
    result = _main(task, config, _native_path())
    assert result.returncode == 0, result.stdout + result.stderr
    settings = json.loads((task / "work" / "lacuna_participant_config.json").read_text())
    assert (settings["output_space"], settings["nthreads"], settings["participant_labels"]) == ("analysis", 2, ["02"])
