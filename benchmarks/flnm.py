"""Benchmark functional lesion network mapping against the hardware's bound.

Builds a synthetic connectome on the real-size 2 mm MNI152NLin6Asym grid (an ellipsoidal
brain mask of 289,249 voxels, more than the 228,000 of FSL's 2 mm brain mask), then for each lesion
count L maps L spherical lesions and prints: seconds, lesion-subject maps per second,
peak RSS, read GB/s, achieved GFLOP/s, and the bound

    max(bytes read / measured read rate, flops / measured numpy sgemm rate)

from measurements taken in the same run (a pure read pass over the same file, which
brings every byte to the CPU and computes nothing: the best of the analysis's own reader
on all threads and of HDF5's; a numpy float32 matmul of the same shape, whose BLAS the
analysis calls too), as the ratio achieved / bound. Each L runs in its own
process so that its peak RSS is its own.

Usage::

    python benchmarks/flnm.py                          # S=100, T=120, L=1 and 100
    python benchmarks/flnm.py --subjects 200 --lesions 1 10 100 --dtype float32
    python benchmarks/flnm.py --cold                   # reads from the disk, as for GSP1000

Without ``--cold`` the connectome is first read back from the disk once, so that it sits
in the page cache as a connectome Lacuna has read from the disk does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numba
import numpy as np
import threadpoolctl

from lacuna.analysis.functional.engine import worker_threads
from lacuna.core.spaces import standard_grid
from lacuna.formats.functional_connectome import ConnectomeWriter, FunctionalConnectome

SPACE = "MNI152NLin6Asym"


def brain_mask() -> np.ndarray:
    """An ellipsoidal 'brain' on the 2 mm grid with 289,249 voxels (GSP1000 masks hold 230,000-330,000)."""
    grid = standard_grid(SPACE, 2)
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    inside = ((xyz[:, 0] / 72) ** 2 + ((xyz[:, 1] + 18) / 96) ** 2 + ((xyz[:, 2] - 10) / 80) ** 2) <= 1
    return inside.reshape(grid.shape)


def build_connectome(path: Path, subjects: int, timepoints: int, dtype: str, seed: int = 0) -> None:
    """Synthetic timeseries: a few smooth 'network' signals plus noise, raw offsets."""
    grid = standard_grid(SPACE, 2)
    mask = brain_mask()
    indices = np.array(np.nonzero(mask))
    n_voxels = indices.shape[1]
    rng = np.random.default_rng(seed)
    networks = 6
    membership = (indices[0] * 7 + indices[1] * 3 + indices[2]) % networks  # interleaved networks
    with ConnectomeWriter(path, subjects, timepoints, indices, grid.affine, grid.shape, SPACE, 2.0, dtype=dtype) as writer:
        for _ in range(subjects):
            signals = rng.standard_normal((timepoints, networks), dtype=np.float32)
            data = rng.standard_normal((timepoints, n_voxels), dtype=np.float32)
            data += signals[:, membership]
            data += 100.0
            writer.write(data.astype(dtype))


def lesions(count: int, seed: int = 1) -> list:
    """Spherical lesions (radius 4-12 mm) at random brain positions, as SubjectData."""
    import nibabel as nib

    from lacuna import SubjectData

    grid = standard_grid(SPACE, 2)
    mask = brain_mask()
    candidates = np.argwhere(mask)
    rng = np.random.default_rng(seed)
    ijk = np.indices(grid.shape)
    subjects = []
    for index in range(count):
        centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(2, 6)  # voxels
        sphere = (((ijk - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).astype(np.uint8)
        img = nib.Nifti1Image(sphere, grid.affine)
        subjects.append(SubjectData(img, SPACE, metadata={"subject_id": f"{index:04d}"}))
    return subjects


def cache_as_read(path: Path) -> None:
    """Put ``path`` in the page cache the way Lacuna leaves a connectome it has read
    from the disk: evicted, then read once by the analysis's own reader (which asks
    for huge pages: the page cache then holds the file in 2 MiB folios, which are
    cheaper to map than the mix of folio sizes a plain ``read`` leaves)."""
    evict_from_page_cache(path)
    for _ in FunctionalConnectome.open(path).iter_subjects():
        pass


def evict_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path`` from the page cache (no root needed), so that
    the next read comes from the disk, as for a 100+ GB connectome."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@numba.njit(nogil=True)
def _or_words(words: np.ndarray) -> int:
    """Bitwise OR of all words: the least work that still brings every byte in."""
    result = np.uint64(0)
    for word in words:
        result |= word
    return result


def _read_pass_mapped(path: Path, threads: int) -> int:
    """Read every byte of every subject as the analysis gets them (same reader), on
    ``threads`` threads; returns the bytes read."""
    connectome = FunctionalConnectome.open(path)
    total = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for subject in connectome.iter_subjects():
            words = subject.reshape(-1).view(np.uint8)
            words = words[: words.size // 8 * 8].view(np.uint64)
            list(pool.map(_or_words, np.array_split(words, threads)))
            total += subject.nbytes
    return total


def _read_pass_hdf5(path: Path) -> int:
    """Read every subject with HDF5 into one buffer; returns the bytes read."""
    with h5py.File(path, "r") as handle:
        dataset = handle["timeseries"]
        buffer = np.empty(dataset.shape[1:], dtype=dataset.dtype)
        for index in range(dataset.shape[0]):
            dataset.read_direct(buffer, source_sel=np.s_[index])
        return buffer.nbytes * dataset.shape[0]


def measured_read_rate(path: Path, repeats: int = 2, cold: bool = False) -> float:
    """Bytes per second of a pure read pass: every byte reaches the CPU, nothing is
    computed. The best of ``repeats`` passes of each way of reading (the analysis's own
    reader, on all threads, and HDF5's), so the bound is as tight as the machine
    allows. ``cold``: each pass reads from the disk (the file is evicted from the page
    cache first)."""
    _or_words(np.zeros(8, dtype=np.uint64))  # compile outside the timing
    rates = []
    for read_pass in (lambda: _read_pass_mapped(path, worker_threads()), lambda: _read_pass_hdf5(path)):
        for _ in range(repeats):
            if cold:
                evict_from_page_cache(path)
            start = time.perf_counter()
            total = read_pass()
            rates.append(total / (time.perf_counter() - start))
    return max(rates)


def measured_sgemm_rate(timepoints: int, lesions: int, voxels: int) -> float:
    """FLOP/s of numpy's float32 matmul of the shape the mapping uses (one subject's
    product for all lesions); the best of several products, like the read rate."""
    a = np.random.default_rng(0).standard_normal((lesions, timepoints), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((timepoints, voxels), dtype=np.float32)
    out = np.empty((lesions, voxels), dtype=np.float32)
    np.matmul(a, b, out=out)
    fastest = np.inf
    for _ in range(10):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * lesions * timepoints * voxels / fastest


def blas_kernels() -> str:
    """Which BLAS (and OpenBLAS kernel set) numpy's matmul uses: the analysis calls the
    same library, so the bound and the analysis share it."""
    for library in threadpoolctl.threadpool_info():
        if library.get("user_api") == "blas" and "numpy" in library.get("filepath", ""):
            return f"{library['internal_api']} {library.get('version')} {library.get('architecture', '')}".strip()
    return "unknown"


def run_one(path: Path, n_lesions: int, cold: bool = False) -> dict:
    """Map ``n_lesions`` lesions and report timings (runs in a fresh process)."""
    from lacuna.analysis.functional.network_mapping import FunctionalNetworkMapping

    connectome = FunctionalConnectome.open(path)
    subjects = lesions(n_lesions)
    read_rate = measured_read_rate(path, cold=cold)
    sgemm_rate = measured_sgemm_rate(connectome.files[0].n_timepoints, n_lesions, connectome.n_voxels)
    started = time.perf_counter()
    analysis = FunctionalNetworkMapping(connectome, compute_p_map=True)  # loads the compiled kernels
    setup_seconds = time.perf_counter() - started
    if cold:
        evict_from_page_cache(path)
    start = time.perf_counter()
    mapped = 0
    for _, outcome in analysis.iter_batch(subjects):
        if isinstance(outcome, Exception):
            raise outcome
        mapped += 1
    seconds = time.perf_counter() - start
    timing = analysis.last_timing
    bytes_read = sum(t.bytes_read for t in timing)
    flops = sum(t.flops for t in timing)
    bound = max(bytes_read / read_rate, flops / sgemm_rate)
    return {
        "lesions": n_lesions,
        "subjects": connectome.n_subjects,
        "voxels": connectome.n_voxels,
        "seconds": seconds,
        "setup_seconds": setup_seconds,
        "pass_seconds": sum(t.seconds for t in timing),
        "maps_per_second": n_lesions * connectome.n_subjects / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "read_gb_per_s": bytes_read / seconds / 1e9,
        "gflops": flops / seconds / 1e9,
        "measured_read_gb_per_s": read_rate / 1e9,
        "measured_sgemm_gflops": sgemm_rate / 1e9,
        "blas": blas_kernels(),
        "bound_seconds": bound,
        "ratio": seconds / bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--timepoints", type=int, default=120)
    parser.add_argument("--lesions", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--workdir", type=Path, help="where to write the synthetic connectome")
    parser.add_argument("--cold", action="store_true", help="read from the disk, not the page cache (posix_fadvise)")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--connectome", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single is not None:
        print(json.dumps(run_one(args.connectome, args.single, cold=args.cold)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lacuna-flnm-bench-"))
    path = workdir / f"synthetic_S{args.subjects}_T{args.timepoints}_{args.dtype}.h5"
    if not path.exists():
        start = time.perf_counter()
        build_connectome(path, args.subjects, args.timepoints, args.dtype)
        print(f"built {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    if not args.cold:
        start = time.perf_counter()
        cache_as_read(path)
        print(f"page cache: {path.name} read back from the disk in {time.perf_counter() - start:.0f} s")
    header = f"{'L':>5} {'S':>5} {'seconds':>8} {'maps/s':>8} {'RSS GB':>7} {'read GB/s':>9} {'GFLOP/s':>8} {'bound s':>8} {'ratio':>6}"
    print(header)
    for n_lesions in args.lesions:
        command = [sys.executable, __file__, "--single", str(n_lesions), "--connectome", str(path)]
        if args.cold:
            command.append("--cold")
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(
            f"{result['lesions']:>5} {result['subjects']:>5} {result['seconds']:>8.1f} {result['maps_per_second']:>8.0f} "
            f"{result['peak_rss_gb']:>7.2f} {result['read_gb_per_s']:>9.2f} {result['gflops']:>8.1f} "
            f"{result['bound_seconds']:>8.1f} {result['ratio']:>6.2f}"
        )
        print(
            f"      (measured: read {result['measured_read_gb_per_s']:.2f} GB/s, sgemm {result['measured_sgemm_gflops']:.0f} "
            f"GFLOP/s with {result['blas']}; {result['voxels']} voxels; compiled kernels loaded in {result['setup_seconds']:.2f} s, once per "
            "process, not in the timing)"
        )


if __name__ == "__main__":
    main()
