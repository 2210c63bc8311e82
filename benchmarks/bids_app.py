"""Benchmark the participant level end to end, as a user runs it.

Builds a synthetic BIDS dataset of L spherical lesion masks on the FSL 2 mm grid
(MNI152NLin6Asym) and a synthetic functional connectome of S subjects x T timepoints on
an ellipsoidal brain of about 235,000 voxels (float32, in three batch files, as GSP1000
is distributed), then runs the installed ``lacuna`` command in a subprocess::

    lacuna BIDS OUT participant --functional-connectome DIR --atlas-dir ATLASES -v

and prints its wall time, its peak RSS (of the command and everything it started), the
phase breakdown the command logs at ``-v`` and the connectome-pass time of the same run.
It also times the fixed cost (``lacuna --version``, and a participant run of one mask
with regional damage only).

Usage::

    python benchmarks/bids_app.py                      # S=30, T=120, L=100
    python benchmarks/bids_app.py --lesions 100 1000 --workdir /tmp/bench
    python benchmarks/bids_app.py --structural         # also 20 lesions, 200k streamlines
    python benchmarks/bids_app.py --outputs /dev/shm   # outputs on a tmpfs (see below)

Every run writes into a new, empty output folder (as a user's first run does), so it
computes everything; the folders (under ``--outputs``, default the work folder) are
removed when the benchmark ends. After thousands of files are deleted, ext4 creates new
files in the same block group more slowly for up to five minutes (its inode allocator
skips recently freed inodes): an L=100 run right after an earlier benchmark's clean-up
took 0.7-1 s longer here. For repeated measurements put ``--outputs`` on a tmpfs
(``/dev/shm``), where runs take what a first run on a fresh ext4 folder takes (and
keep it clear of other files: what a tmpfs holds is memory, and with 8 GB of old
outputs there an L=100 run took up to 1 s longer). The connectome is read once
before the runs, so that it is in the page cache. Memory is in GiB (2**30 bytes); the
first line says how much was available.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import threadpoolctl

import lacuna as lacuna_package

from lacuna.core.memory import available_memory_bytes
from lacuna.core.spaces import standard_grid
from lacuna.formats.functional_connectome import ConnectomeWriter

SPACE = "MNI152NLin6Asym"
ATLASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases"
BATCH_FILES = 3

# Runs a command and prints, on stderr, the peak RSS (kB) of everything it started
# (RUSAGE_CHILDREN: the largest of the waited-for descendants), the peaks of the
# command's private (RssAnon) and file-backed (RssFile: the connectome's page-cache
# pages it maps) resident memory, sampled every 20 ms, and the command's wall time and
# CPU time (not the wrapper's own start-up).
_RSS_WRAPPER = """
import resource, subprocess, sys, threading, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while child.poll() is None:
        try:
            for line in open(f"/proc/{child.pid}/status"):
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
code = child.wait()
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK_RSS_KB", usage.ru_maxrss, peaks["RssAnon"], peaks["RssFile"], file=sys.stderr)
print("COMMAND_SECONDS", wall, usage.ru_utime + usage.ru_stime, file=sys.stderr)
sys.exit(code)
"""


def brain_mask() -> np.ndarray:
    """An ellipsoidal 'brain' on the 2 mm grid of about 235,000 voxels (FSL's 2 mm brain
    mask holds 228,483, GSP1000's masks 230,000-330,000)."""
    grid = standard_grid(SPACE, 2)
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    inside = ((xyz[:, 0] / 67) ** 2 + ((xyz[:, 1] + 18) / 90) ** 2 + ((xyz[:, 2] - 10) / 75) ** 2) <= 1
    return inside.reshape(grid.shape)


def build_connectome(folder: Path, subjects: int, timepoints: int, seed: int = 0) -> None:
    """Batch files of synthetic timeseries: a few interleaved 'networks' plus noise."""
    grid = standard_grid(SPACE, 2)
    indices = np.array(np.nonzero(brain_mask()))
    n_voxels = indices.shape[1]
    rng = np.random.default_rng(seed)
    membership = (indices[0] * 7 + indices[1] * 3 + indices[2]) % 6
    sizes = [len(part) for part in np.array_split(np.arange(subjects), min(BATCH_FILES, subjects))]
    for number, size in enumerate(sizes):
        path = folder / f"synthetic_batch{number:02d}.h5"
        with ConnectomeWriter(path, size, timepoints, indices, grid.affine, grid.shape, SPACE, 2.0) as writer:
            for _ in range(size):
                signals = rng.standard_normal((timepoints, 6), dtype=np.float32)
                data = rng.standard_normal((timepoints, n_voxels), dtype=np.float32)
                data += signals[:, membership]
                data += 100.0
                writer.write(data)


def build_dataset(root: Path, lesions: int, seed: int = 1) -> None:
    """A BIDS dataset of spherical lesions (radius 4-12 mm) inside the brain."""
    grid = standard_grid(SPACE, 2)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    candidates = np.argwhere(brain_mask())
    rng = np.random.default_rng(seed)
    ijk = np.indices(grid.shape)
    for index in range(lesions):
        centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(2, 6)
        sphere = (((ijk - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).astype(np.uint8)
        folder = root / f"sub-{index:04d}" / "anat"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(sphere, grid.affine), folder / f"sub-{index:04d}_space-{SPACE}_res-2_label-lesion_mask.nii.gz")


def read_into_page_cache(folder: Path) -> None:
    for path in sorted(folder.glob("*.h5")):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


@dataclass
class Memory:
    """Peaks in GiB: RSS, and its private (anonymous) and file-backed parts."""

    rss: float
    private: float
    mapped_files: float

    def text(self) -> str:
        return f"peak RSS {self.rss:.2f} GiB (private {self.private:.2f} GiB, mapped files {self.mapped_files:.2f} GiB)"


@dataclass
class Run:
    """What a command cost: wall and CPU seconds (the CPU of a VM whose speed drifts
    compares better between runs than the wall time), peak memory, and its stderr."""

    seconds: float
    cpu_seconds: float
    memory: Memory
    log: str


def timed(command: list[str]) -> Run:
    """Run a command and measure it (its own wall and CPU time, as the wrapper process
    that samples its memory reports them)."""
    done = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *command], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rss, private, mapped = (int(value) / 1024**2 for value in re.search(r"PEAK_RSS_KB (\d+) (\d+) (\d+)", done.stderr).groups())
    seconds, cpu = (float(value) for value in re.search(r"COMMAND_SECONDS (\S+) (\S+)", done.stderr).groups())
    return Run(seconds, cpu, Memory(rss, private, mapped), done.stderr)


def phases(log: str) -> dict[str, float]:
    """The phase breakdown a ``-v`` run logs (lines ``time: <phase>: <seconds> s``)."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"time: ([^:\n]+): ([0-9.]+) s", log)}


def new_output_folder(runs: Path, label: str) -> Path:
    """A path under ``runs`` for a run's outputs that no run used before (created by
    the run)."""
    runs.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"out_{label}_", dir=runs)) / "derivatives"


def lacuna_command() -> str:
    found = shutil.which("lacuna", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        sys.exit("the lacuna command is not installed (pip install .)")
    return found


def report(label: str, run: Run) -> None:
    breakdown = phases(run.log)
    print(f"{label}: {run.seconds:.1f} s end to end ({run.cpu_seconds:.1f} CPU-seconds), {run.memory.text()}")
    for name, value in breakdown.items():
        print(f"    {name:<28} {value:7.2f} s")
    if "connectome pass" in breakdown:
        print(f"    end to end - connectome pass: {run.seconds - breakdown['connectome pass']:.1f} s")


def run_functional(workdir: Path, runs: Path, lacuna: str, subjects: int, timepoints: int, lesions: int, atlas: str) -> None:
    connectome = workdir / f"connectome_S{subjects}_T{timepoints}"
    if not connectome.is_dir():
        start = time.perf_counter()
        connectome.mkdir(parents=True)
        build_connectome(connectome, subjects, timepoints)
        size = sum(p.stat().st_size for p in connectome.glob("*.h5")) / 1e9
        print(f"built {connectome} ({size:.1f} GB) in {time.perf_counter() - start:.0f} s")
    read_into_page_cache(connectome)
    bids = workdir / f"bids_L{lesions}"
    if not bids.is_dir():
        build_dataset(bids, lesions)
    out = new_output_folder(runs, f"L{lesions}")
    command = [lacuna, str(bids), str(out), "participant", "--functional-connectome", str(connectome),
               "--atlas-dir", str(ATLASES), "--atlas", atlas, "--skip-bids-validation", "-v"]
    report(f"L={lesions}, S={subjects}, T={timepoints}", timed(command))


def run_structural(workdir: Path, runs: Path, lacuna: str, lesions: int, streamlines: int, atlas: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from slnm import write_tractogram

    tck = workdir / f"tractogram_{streamlines}.tck"
    if not tck.is_file():
        write_tractogram(tck, streamlines, step=1.0)
    tck.with_suffix(".json").write_text(json.dumps({"SpatialReference": SPACE}))
    bids = workdir / f"bids_structural_L{lesions}"
    if not bids.is_dir():
        build_dataset(bids, lesions, seed=2)

    def command(out: Path) -> list[str]:
        return [lacuna, str(bids), str(out), "participant", "--tractogram", str(tck),
                "--atlas-dir", str(ATLASES), "--atlas", atlas, "--skip-bids-validation", "-v"]

    timed(command(new_output_folder(runs, f"structural_L{lesions}_index")))  # builds the index once
    report(f"structural, L={lesions}, {streamlines} streamlines, warm index", timed(command(new_output_folder(runs, f"structural_L{lesions}"))))


def run_fixed_cost(workdir: Path, runs: Path, lacuna: str, atlas: str) -> None:
    seconds = timed([lacuna, "--version"]).seconds
    print(f"lacuna --version: {seconds:.2f} s")
    seconds = timed([lacuna, "--help"]).seconds
    print(f"lacuna --help: {seconds:.2f} s")
    bids = workdir / "bids_L1"
    if not bids.is_dir():
        build_dataset(bids, 1)
    out = new_output_folder(runs, "L1_regional")
    run = timed([lacuna, str(bids), str(out), "participant", "--atlas-dir", str(ATLASES), "--atlas", atlas, "--skip-bids-validation", "-v"])
    report("fixed cost: one mask, regional damage only", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--timepoints", type=int, default=120)
    parser.add_argument("--lesions", type=int, nargs="+", default=[100])
    parser.add_argument("--atlas", default="Schaefer2018_100Parcels7Networks")
    parser.add_argument("--structural", action="store_true", help="also the structural run (20 lesions)")
    parser.add_argument("--streamlines", type=int, default=200_000)
    parser.add_argument("--no-functional", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where to keep the synthetic data (reused)")
    parser.add_argument("--outputs", type=Path, help="where the runs write (default: WORKDIR/runs)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lacuna-bids-app-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="lacuna-bench-runs-", dir=args.outputs)) if args.outputs else workdir / "runs"
    lacuna = lacuna_command()
    # A wheel install compiles the package's bytecode once; an editable checkout under
    # PYTHONDONTWRITEBYTECODE would compile it at every run (0.3-0.5 s) instead.
    compileall.compile_dir(str(Path(lacuna_package.__file__).parent), quiet=1)
    kernels = ", ".join(sorted({str(lib.get("architecture")) for lib in threadpoolctl.threadpool_info() if lib.get("internal_api") == "openblas"}))
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    available = available_memory_bytes() / 2**30
    print(
        f"{os.cpu_count()} CPUs; OpenBLAS kernels {kernels or 'n/a'}" + (f" (OPENBLAS_CORETYPE={coretype})" if coretype else "")
        + f"; {available:.1f} GiB memory available; data in {workdir}"
    )
    try:
        run_fixed_cost(workdir, runs, lacuna, args.atlas)
        if not args.no_functional:
            for lesions in args.lesions:
                run_functional(workdir, runs, lacuna, args.subjects, args.timepoints, lesions, args.atlas)
        if args.structural:
            run_structural(workdir, runs, lacuna, 20, args.streamlines, args.atlas)
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
