"""Integrity through the command line: concurrent runs, inputs and outputs checked against
their checksums, failures on record, the group level's selection and its all-or-nothing
``group/``, ``lacuna validate`` on incomplete folders, and no semaphore left by kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_mask, sphere
from test_conventions import (
    GRID,
    SPACE,
    lacuna,
    lacuna_executable,
    mask_path,
    participant,
    provenances,
    write_dataset,
)

from lacuna.workflows.demo import DEMO_ATLAS, write_demo_atlas
from lacuna.core.spaces import standard_grid
from lacuna.bids.validation import validate_bids_derivatives


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("atlases")
    write_demo_atlas(folder)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def anat(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}" / "anat"


def table_of(out: Path, sub: str) -> Path:
    return next(anat(out, sub).glob("*_desc-regionaldamage_parcelstats.tsv"))


def summary(out: Path) -> dict:
    return json.loads((out / "group" / "summary.json").read_text())


@pytest.fixture
def done(tmp_path, atlas_dir):
    """Three subjects analysed into ``out``."""
    bids = write_dataset(tmp_path / "bids", [(s, None, "lesion", SPACE) for s in ("01", "02", "03")])
    out = tmp_path / "out"
    result = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    return bids, out


# ------------------------------------------------------------ concurrent runs


def test_two_concurrent_runs_on_one_output_folder_both_succeed(tmp_path, atlas_dir):
    subjects = [f"{i:02d}" for i in range(1, 13)]
    bids = write_dataset(tmp_path / "bids", [(s, None, "lesion", SPACE) for s in subjects])
    out = tmp_path / "out"
    args = [lacuna_executable(), str(bids), str(out), "participant", "--atlas-dir", str(atlas_dir), "--atlas", DEMO_ATLAS,
            "--skip-bids-validation"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, text in zip(runs, outputs):
        assert run.returncode == 0, text
        assert "0 failed" in text and "FileNotFoundError" not in text
    assert len(provenances(out)) == len(subjects)
    for sub in subjects:
        record = json.loads(next(anat(out, sub).glob("*_provenance.json")).read_text())
        for item in record["outputs"]:
            assert sha256(out / item["path"]) == item["sha256"], item["path"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []


def test_start_up_clean_up_removes_only_temporaries_of_dead_processes(done, atlas_dir):
    bids, out = done
    folder = anat(out, "01")
    alive = folder / f".x.tmp-{_host_tag()}{os.getpid()}-1.json"  # this (live) test process
    dead_pid = _dead_pid()
    dead = folder / f".y.tmp-{_host_tag()}{dead_pid}-1.json"
    for path in (alive, dead):
        path.write_text("{}")
    result = participant(bids, out, atlas_dir, "--skip-bids-validation", "--overwrite")
    assert result.exit_code == 0, result.output
    assert alive.exists() and not dead.exists()
    alive.unlink()


def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ------------------------------------------------------------ inputs and outputs


def test_replaced_input_mask_is_recomputed(done, atlas_dir):
    bids, out = done
    before = table_of(out, "02").read_bytes()
    again = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert "0 done, 3 skipped" in again.output
    mask = mask_path(bids, "02")
    save_mask(mask, sphere(GRID, (40, -60, 30), 14), GRID.affine)  # same name, new lesion
    rerun = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert rerun.exit_code == 0, rerun.output
    assert "1 done, 2 skipped" in rerun.output
    assert table_of(out, "02").read_bytes() != before
    record = json.loads((anat(out, "02") / "sub-02_label-lesion_provenance.json").read_text())
    load = next(s for s in record["steps"] if s["name"] == "load")
    assert load["inputs"][0]["sha256"] == sha256(mask)


def test_edited_output_is_recomputed_not_skipped(done, atlas_dir):
    bids, out = done
    table = table_of(out, "03")
    original = table.read_bytes()
    table.write_bytes(original.replace(b"\t0.0\t", b"\t7.0\t", 1))
    assert table.read_bytes() != original
    rerun = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert "1 done, 2 skipped" in rerun.output
    assert table.read_bytes() == original


def test_failed_masks_are_recorded_until_they_succeed(done, atlas_dir):
    bids, out = done
    bad = mask_path(bids, "04")
    save_mask(bad, np.zeros(GRID.shape, np.uint8), GRID.affine)
    result = participant(bids, out, atlas_dir, "--skip-bids-validation")
    assert result.exit_code == 1
    crash = out / "logs" / f"crash_{bad.name.removesuffix('.nii.gz')}.json"
    record = json.loads(crash.read_text())
    assert record["mask"] == "sub-04/anat/" + bad.name and "empty" in record["error"]
    assert "Traceback" in record["details"]
    group = lacuna(bids, out, "group")
    assert group.exit_code == 0 and "1 failed" in group.output
    failed = summary(out)["failed"]
    assert len(failed) == 1 and failed[0]["mask"] == record["mask"] and "empty" in failed[0]["reason"]
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []

    save_mask(bad, sphere(GRID, (30, 20, 40), 8), GRID.affine)  # fixed
    assert participant(bids, out, atlas_dir, "--skip-bids-validation").exit_code == 0
    assert not crash.exists()
    lacuna(bids, out, "group")
    assert summary(out)["failed"] == [] and summary(out)["n_masks"] == 4


# ------------------------------------------------------------ group level


@pytest.mark.parametrize("damage", ["edited", "empty", "half-written", "bad-json"])
def test_group_leaves_out_masks_whose_outputs_changed(done, damage):
    bids, out = done
    assert lacuna(bids, out, "group").exit_code == 0
    if damage == "edited":
        victim = table_of(out, "01")
        text = victim.read_text()
        victim.write_text(text.replace("\t0.0\t", "\t9.0\t", 1))
        assert victim.read_text() != text
    elif damage == "empty":
        victim = next(anat(out, "01").glob("*_scalars.json"))
        victim.write_bytes(b"")
    elif damage == "half-written":
        victim = next(anat(out, "01").glob("*_mask.nii.gz"))
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim = next(anat(out, "01").glob("*_scalars.json"))
        victim.write_text('{"RegionalDamage": ')
    result = lacuna(bids, out, "group")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warning = [line for line in result.output.splitlines() if "WARNING" in line and "sub-01" in line]
    assert len(warning) == 1 and victim.name in warning[0]
    document = summary(out)
    assert document["n_masks"] == 2 and [m["participant_id"] for m in document["masks"]] == ["sub-02", "sub-03"]
    assert len(document["incomplete"]) == 1 and victim.name in document["incomplete"][0]
    group_table = next((out / "group").glob("*PercentDamaged_parcelstats.tsv"))
    assert [line.split("\t")[0] for line in group_table.read_text().splitlines()[1:]] == ["sub-02", "sub-03"]


def test_group_error_leaves_the_previous_group_folder_whole(done, monkeypatch):
    bids, out = done
    assert lacuna(bids, out, "group").exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in (out / "group").rglob("*") if p.is_file()}
    import lacuna.workflows.group as group_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while writing the overlap maps")

    monkeypatch.setattr(group_module, "_write_overlap_maps", broken)
    result = lacuna(bids, out, "--participant-label", "01", "group")
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "unexpected error" in result.output
    after = {p.relative_to(out): p.read_bytes() for p in (out / "group").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.iterdir() if p.name.startswith(".group")]


def test_group_level_honours_participant_label(done):
    bids, out = done
    result = lacuna(bids, out, "group", "--participant_label", "01", "03", "77")
    assert result.exit_code == 0, result.output
    assert [m["participant_id"] for m in summary(out)["masks"]] == ["sub-01", "sub-03"]
    assert any("WARNING" in line and "77" in line for line in result.output.splitlines())
    nothing = lacuna(bids, out, "group", "--participant-label", "99")
    assert nothing.exit_code == 18 and "99" in nothing.output
    assert [m["participant_id"] for m in summary(out)["masks"]] == ["sub-01", "sub-03"]  # untouched


# ------------------------------------------------------------ lacuna validate


def test_validate_fails_a_mask_without_provenance(done):
    _, out = done
    (anat(out, "02") / "sub-02_label-lesion_provenance.json").unlink()
    result = lacuna("validate", out)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sub-02" in errors[0] and "no provenance file lists this mask" in errors[0]


def test_validate_names_a_missing_table(done):
    _, out = done
    table = table_of(out, "03")
    table.unlink()
    result = lacuna("validate", out)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any(f"sidecar of {table.name}, which is missing" in e for e in errors), errors
    assert any(f"lists {table.relative_to(out).as_posix()}, which is missing" in e for e in errors), errors
    assert not any("does not match any pattern" in e for e in errors)


# ------------------------------------------------------------ inputs never outputs


def test_an_earlier_output_folder_inside_the_dataset_is_not_read(tmp_path, atlas_dir):
    bids = write_dataset(tmp_path / "bids", [("01", None, "lesion", SPACE), ("02", None, "lesion", SPACE)])
    first = participant(bids, bids / "lacuna_out", atlas_dir, "--skip-bids-validation")
    assert first.exit_code == 0, first.output
    second = participant(bids, tmp_path / "elsewhere", atlas_dir, "--skip-bids-validation")
    assert second.exit_code == 0, second.output
    assert "2 mask(s): 2 done, 0 skipped, 0 failed" in second.output
    assert len(provenances(tmp_path / "elsewhere")) == 2


# ------------------------------------------------------------ kill -9


def _semaphore_inodes(pid: int) -> set[int]:
    """Inodes of the POSIX semaphores (files in /dev/shm) a process has mapped. glibc
    creates each under a temporary name and links it to ``sem.<name>``, so the maps show
    the temporary name; the inode identifies the named file."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/dev/shm/sem." in line:
            inodes.add(int(line.split()[4]))
    return inodes


def _named_in_dev_shm(inodes: set[int]) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("sem.*") if p.stat().st_ino in inodes)


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not Path("/proc/self/maps").is_file(), reason="needs Linux /dev/shm")
def test_kill_9_of_a_parallel_run_leaves_no_named_semaphore(tmp_path, shared_atlases):
    grid = standard_grid(SPACE, 1)
    centres = [(-40, -25, 55), (42, 20, 30), (-30, -85, 5), (48, -55, 35), (-52, 8, 5), (10, 50, 30)]
    bids = tmp_path / "bids"
    write_dataset(bids, [])
    for index, centre in enumerate(centres):
        save_mask(mask_path(bids, f"0{index + 1}"), sphere(grid, centre, 20), grid.affine)
    out = tmp_path / "out"
    args = [lacuna_executable(), str(bids), str(out), "participant", "--atlas-dir", str(shared_atlases),
            "--atlas", "Schaefer2018_100Parcels7Networks", "--atlas", "TianSubcortex_3TS1", "--skip-bids-validation",
            "--nprocs", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("sub-*/anat/*_provenance.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before a mask was done"
            time.sleep(0.01)
        used = _semaphore_inodes(proc.pid)
        assert used, "the pool's semaphores are not mapped by the main process"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, resource tracker included
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)
    left = _named_in_dev_shm(used)
    assert left == [], f"named semaphores left in /dev/shm: {left}"


def test_provenance_lists_the_checksum_of_every_output_on_disk(done):
    """Checksums are taken from the bytes written, not read back: they must still be
    those of the files."""
    _, out = done
    provenances = list(out.glob("sub-*/anat/*_provenance.json"))
    assert len(provenances) == 3
    for provenance in provenances:
        listed = json.loads(provenance.read_text())["outputs"]
        assert len(listed) >= 4
        for output in listed:
            assert sha256(out / output["path"]) == output["sha256"], output["path"]


def test_atomic_write_makes_the_missing_folder_and_leaves_no_temporary(tmp_path, monkeypatch):
    from lacuna.core import atomic

    target = tmp_path / "new" / "deeper" / "x.json"
    atomic.write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": None}

    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_bytes(tmp_path / "new" / "y.nii.gz", b"data")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["deeper"]


def test_atomic_write_takes_any_bytes_like_data_whole_with_the_usual_mode(tmp_path, monkeypatch):
    """Buffers of wider items are written byte for byte, a write that stops short is
    continued, and the file gets the mode ``open`` would give it."""
    from lacuna.core import atomic

    values = np.arange(300_000, dtype=np.float32)
    target = atomic.atomic_write_bytes(tmp_path / "values.bin", memoryview(values))
    assert target.read_bytes() == values.tobytes()

    real_write = atomic.os.write

    def short_write(descriptor, data):
        return real_write(descriptor, bytes(memoryview(data)[:1000]))

    monkeypatch.setattr(atomic.os, "write", short_write)
    atomic.atomic_write_bytes(tmp_path / "short.bin", b"x" * 2500)
    assert (tmp_path / "short.bin").read_bytes() == b"x" * 2500
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "short.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.bin", "values.bin"]


def test_resolved_paths_equal_pathlib_resolve_through_links(tmp_path):
    """Folders are resolved once and kept; links (of folders and files), missing files
    and '..' resolve as ``Path.resolve`` does, also after a link changed and the
    folders were forgotten."""
    from lacuna.core.provenance import forget_resolved_folders, resolved_path

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "mask.nii.gz").write_bytes(b"a")
    (tmp_path / "a" / "sub" / "linked.nii.gz").symlink_to(tmp_path / "a" / "sub" / "mask.nii.gz")
    (tmp_path / "dataset").symlink_to(tmp_path / "a")
    paths = [
        tmp_path / "dataset" / "sub" / "mask.nii.gz",
        tmp_path / "dataset" / "sub" / "linked.nii.gz",
        tmp_path / "dataset" / "sub" / "missing.nii.gz",
        tmp_path / "dataset" / "sub" / ".." / "sub" / "mask.nii.gz",
    ]
    for path in paths:
        assert resolved_path(path) == path.resolve()
    (tmp_path / "dataset").unlink()
    (tmp_path / "dataset").symlink_to(tmp_path / "b")
    forget_resolved_folders()
    assert resolved_path(paths[2]) == paths[2].resolve() == tmp_path / "b" / "sub" / "missing.nii.gz"


def test_an_input_read_whole_is_not_read_again_for_its_checksum(tmp_path, monkeypatch):
    from lacuna.core import provenance

    path = tmp_path / "sub-01_mask.nii.gz"
    content = bytes(range(256)) * 300
    path.write_bytes(content)
    assert provenance.read_input_bytes(path) == content

    def not_again(name):
        raise AssertionError(f"{name} read again")

    monkeypatch.setattr(provenance, "_sha256_of", not_again)
    provenance._sha256_cached.cache_clear()
    assert provenance.sha256_file(path) == sha256(path)
    assert provenance.InputFile.from_path("lesion_mask", path).sha256 == sha256(path)
    path.write_bytes(content[:-1])  # changed: its size and time are another key
    os.utime(path, ns=(1, 1))
    with pytest.raises(AssertionError, match="read again"):
        provenance.sha256_file(path)
