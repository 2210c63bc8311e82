"""The Boutiques descriptor: ``bosh validate`` and the demo dataset through ``bosh exec launch``.

Skipped when the ``boutiques`` package (``bosh``) is not installed.
"""

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
DESCRIPTOR = REPO / "boutiques.json"
BIN = Path(sys.executable).parent


def _bosh() -> str:
    found = shutil.which("bosh") or str(BIN / "bosh")
    if not Path(found).exists():
        pytest.skip("boutiques (bosh) is not installed: pip install boutiques")
    return found


def _run_bosh(*args, cwd: Path) -> subprocess.CompletedProcess:
    # `lacuna` of this environment first on PATH: bosh runs the command line in a shell.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([_bosh(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_descriptor_matches_the_package():
    descriptor = json.loads(DESCRIPTOR.read_text())
    assert descriptor["schema-version"] == "0.5"
    assert descriptor["tool-version"] == __version__
    assert descriptor["container-image"]["image"].endswith(f":{__version__}")
    ids = {item["id"] for item in descriptor["inputs"]}
    assert {"bids_dir", "output_dir", "analysis_level", "participant_label", "analysis", "functional_connectome", "atlas", "work_dir", "nprocs"} <= ids
    # Every option of the descriptor exists in the CLI.
    from click.testing import CliRunner

    from lacuna.cli.main import cli

    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for item in descriptor["inputs"]:
        if "command-line-flag" in item:
            assert item["command-line-flag"] in help_text, item["id"]


def test_bosh_validate_as_a_bids_app(tmp_path):
    result = _run_bosh("validate", "--bids", DESCRIPTOR, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BIDS validation OK" in result.stdout + result.stderr


def test_descriptor_error_codes_are_the_cli_ones():
    from lacuna.core.exit_codes import ExitCode

    descriptor = json.loads(DESCRIPTOR.read_text())
    assert {item["code"] for item in descriptor["error-codes"]} == {int(c) for c in ExitCode if c != ExitCode.SUCCESS}
    assert 2 not in {item["code"] for item in descriptor["error-codes"]}


def test_bosh_exec_launch_runs_the_demo(tmp_path):
    bids, atlases = tmp_path / "bids", tmp_path / "atlases"
    write_demo_atlas(atlases)
    write_demo_dataset(bids)
    out = tmp_path / "derivatives" / "lacuna"
    participant = {
        "bids_dir": str(bids),
        "output_dir": str(out),
        "analysis_level": "participant",
        "participant_label": ["01", "sub-02"],
        "atlas": [DEMO_ATLAS],
        "atlas_dir": str(atlases),
        "work_dir": str(tmp_path / "work"),
        "nprocs": 2,
        "nthreads": 2,
        "omp_nthreads": 1,
        "skip_bids_validation": True,
    }
    (tmp_path / "participant.json").write_text(json.dumps(participant))
    simulated = _run_bosh("exec", "simulate", "-i", tmp_path / "participant.json", DESCRIPTOR, cwd=tmp_path)
    assert simulated.returncode == 0, simulated.stdout + simulated.stderr
    assert "--participant_label 01 sub-02 " in simulated.stdout  # the BIDS Apps spelling
    assert "--atlas SyntheticDemo_16Parcels" in simulated.stdout
    assert "--nthreads 2 --omp-nthreads 1 --skip_bids_validator" in simulated.stdout

    launched = _run_bosh("exec", "launch", "--no-container", "--skip-data-collection", DESCRIPTOR, tmp_path / "participant.json", cwd=tmp_path)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "3 done" in launched.stdout  # sub-01 (two sessions) and sub-02
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-01", "sub-02"]
    settings = json.loads((tmp_path / "work" / "lacuna_participant_config.json").read_text())
    assert (settings["nthreads"], settings["omp_nthreads"], settings["skip_bids_validation"]) == (2, 1, True)

    group = {"bids_dir": str(bids), "output_dir": str(out), "analysis_level": "group"}
    (tmp_path / "group.json").write_text(json.dumps(group))
    launched = _run_bosh("exec", "launch", "--no-container", "--skip-data-collection", DESCRIPTOR, tmp_path / "group.json", cwd=tmp_path)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    found, missing = launched.stdout.split("Missing files", 1)
    assert f"{out} (derivatives_folder, Required)" in found.split("Output files", 1)[1]  # the one output
    assert not missing.strip()
    summary = json.loads((out / "group" / "summary.json").read_text())
    assert summary  # written by the group level
    tables = list((out / "group").glob("atlas-SyntheticDemo_seg-16Parcels_*_parcelstats.tsv"))
    assert tables and all(len(t.read_text().splitlines()) == 4 for t in tables)  # header + 3 masks


def test_bosh_exec_launch_reports_failure(tmp_path):
    bids = tmp_path / "bids"
    write_demo_dataset(bids)
    invocation = {"bids_dir": str(bids), "output_dir": str(tmp_path / "out"), "analysis_level": "participant", "participant_label": ["99"]}
    (tmp_path / "bad.json").write_text(json.dumps(invocation))
    launched = _run_bosh("exec", "launch", "--no-container", "--skip-data-collection", DESCRIPTOR, tmp_path / "bad.json", cwd=tmp_path)
    assert launched.returncode == 18, launched.stdout + launched.stderr  # the filter selected no mask
