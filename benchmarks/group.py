"""Benchmark the group-level permutation GLM (and TFCE) against nilearn's permuted_ols.

Synthetic cohort: N maps on the FSL 2 mm MNI152NLin6Asym grid (91 x 109 x 91), inside
an ellipsoidal brain mask of exactly 235,375 voxels (as many as FSL's 2 mm brain mask);
each map a random mixture of 64 smooth spatial components plus white noise (LNM maps are
smooth), half the maps "cases" with an effect in one block; 2 covariates. Then:

* Lacuna's :func:`~lacuna.analysis.group.statistics.permutation_glm` with the full
  number of permutations (and, separately, with TFCE);
* ``nilearn.mass_univariate.permuted_ols`` on the same data (float32, n_jobs=1: its
  matrix products use every core through BLAS, as ours do), once without permutations
  (its set-up) and once with a few, so that its time for the full number is
  ``set-up + n * (time per permutation)``;

each in its own process, so that each peak RSS is its own. Prints seconds, peak RSS,
nilearn's scaled seconds, the ratio, the largest difference between the two t maps, and
the bound set by the permutation products alone (``2 N V (1 + covariates)`` FLOP per
permutation at the float32 matrix-product rate measured in the same process, on the
same blocks and threads as the engine): on a loaded machine both move together.

Usage::

    python benchmarks/group.py                         # N=1000, 5000 permutations, TFCE too
    python benchmarks/group.py --maps 200 --permutations 1000 --no-tfce
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lacuna.core.spaces import standard_grid

SPACE = "MNI152NLin6Asym"
BRAIN_VOXELS = 235_375


def brain_mask() -> np.ndarray:
    """The 235,375 voxels of the 2 mm grid nearest the centre of an ellipsoid 'brain'."""
    grid = standard_grid(SPACE, 2)
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    radius = (xyz[:, 0] / 72) ** 2 + ((xyz[:, 1] + 18) / 96) ** 2 + ((xyz[:, 2] - 10) / 80) ** 2
    inside = np.zeros(radius.size, dtype=bool)
    inside[np.argsort(radius, kind="stable")[:BRAIN_VOXELS]] = True
    return inside.reshape(grid.shape)


def cohort(n_maps: int, n_covariates: int, seed: int = 0):
    """Maps (N x V float32), case indicator, covariates; the same for the same seed."""
    from scipy.ndimage import gaussian_filter

    mask = brain_mask()
    rng = np.random.default_rng(seed)
    components = np.stack([gaussian_filter(rng.standard_normal(mask.shape), 3.0)[mask] for _ in range(64)])
    components = (components / components.std(axis=1, keepdims=True)).astype(np.float32)
    maps = np.empty((n_maps, int(mask.sum())), dtype=np.float32)
    rng.standard_normal(out=maps, dtype=np.float32)
    maps *= 0.5
    weights = rng.standard_normal((n_maps, 64)).astype(np.float32)
    for start in range(0, n_maps, 64):  # in chunks: no N x V temporary
        maps[start : start + 64] += weights[start : start + 64] @ components
    case = (np.arange(n_maps) % 2).astype(np.float64)
    block = np.zeros(mask.shape, dtype=bool)
    block[40:48, 60:68, 40:48] = True
    maps[:, block[mask]] += (0.3 * case[:, None]).astype(np.float32)
    covariates = rng.standard_normal((n_maps, n_covariates))
    return mask, maps, case, covariates


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def measured_gemm_rate(residuals: np.ndarray, columns: int, threads: int) -> float:
    """FLOP/s of the permutation product as the engine runs it (blocks of voxels on the
    engine's threads, each with single-threaded BLAS), best of three passes."""
    from concurrent.futures import ThreadPoolExecutor

    from lacuna.analysis.group import statistics as group_statistics
    from lacuna.analysis.compiled_primitives import single_threaded_blas

    design = np.asfortranarray(np.random.default_rng(0).standard_normal((residuals.shape[1], columns), dtype=np.float32))
    blocks = group_statistics._blocks(residuals.shape[0], group_statistics._VOXEL_BLOCK)
    buffers = [np.empty((group_statistics._VOXEL_BLOCK, columns), np.float32) for _ in blocks]

    def product(index):
        block = blocks[index]
        np.matmul(residuals[block], design, out=buffers[index][: block.stop - block.start])

    fastest = np.inf
    with single_threaded_blas(), ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(product, range(len(blocks))))
            fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * residuals.shape[0] * residuals.shape[1] * columns / fastest


def run_ours(args, t_path: Path) -> dict:
    from lacuna.analysis.group.statistics import TFCEGrid, permutation_glm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    mask, maps, case, covariates = cohort(args.maps, args.covariates)
    grid = TFCEGrid.from_mask(mask) if args.tfce else None
    permutation_glm(maps[:50, :1000], case[:50], covariates[:50], n_permutations=10, tfce_grid=None)  # load kernels
    start = time.perf_counter()
    result = permutation_glm(maps, case, covariates, n_permutations=args.permutations, random_seed=0, tfce_grid=grid)
    seconds = time.perf_counter() - start
    rss = peak_rss_gb()
    np.save(t_path, result.t)
    from lacuna.analysis.group import statistics as group_statistics
    from lacuna.core.threads import worker_threads

    columns = group_statistics._PRODUCT_COLUMNS // (1 + args.covariates) * (1 + args.covariates)
    rate = measured_gemm_rate(maps.T.copy(), columns, worker_threads())  # after the peak RSS was read
    flops = 2.0 * maps.shape[0] * maps.shape[1] * args.permutations * (1 + args.covariates)
    return {"seconds": seconds, "peak_rss_gb": rss, "voxels": maps.shape[1], "bound_seconds": flops / rate, "gflops": rate / 1e9}


def run_nilearn(args, t_path: Path) -> dict:
    from nilearn.mass_univariate import permuted_ols

    mask, maps, case, covariates = cohort(args.maps, args.covariates)
    options = dict(confounding_vars=covariates, model_intercept=True, two_sided_test=True, random_state=0, n_jobs=1)
    if args.tfce:
        import nibabel as nib
        from nilearn.maskers import NiftiMasker

        grid = standard_grid(SPACE, 2)
        options.update(tfce=True, masker=NiftiMasker(mask_img=nib.Nifti1Image(mask.astype(np.uint8), grid.affine)).fit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        setup = permuted_ols(case[:, None], maps, n_perm=0, **options)
        setup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        permuted_ols(case[:, None], maps, n_perm=args.nilearn_permutations, **options)
        seconds = time.perf_counter() - start
    ours = np.load(t_path)
    per_permutation = max(seconds - setup_seconds, 1e-9) / args.nilearn_permutations
    return {
        "setup_seconds": setup_seconds,
        "seconds": seconds,
        "scaled_seconds": setup_seconds + per_permutation * args.permutations,
        "peak_rss_gb": peak_rss_gb(),
        "max_t_difference": float(np.max(np.abs(setup["t"][0] - ours))),
        "max_abs_t": float(np.max(np.abs(ours))),
    }


def in_subprocess(args, mode: str, tfce: bool, t_path: Path) -> dict:
    command = [
        sys.executable, __file__, "--single", mode, "--t-path", str(t_path),
        "--maps", str(args.maps), "--covariates", str(args.covariates),
        "--permutations", str(args.permutations),
        "--nilearn-permutations", str(args.nilearn_tfce_permutations if tfce else args.nilearn_permutations),
    ]
    if tfce:
        command.append("--tfce")
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--covariates", type=int, default=2)
    parser.add_argument("--permutations", type=int, default=5000)
    parser.add_argument("--nilearn-permutations", type=int, default=50, help="nilearn's permutations without TFCE (scaled)")
    parser.add_argument("--nilearn-tfce-permutations", type=int, default=2, help="nilearn's permutations with TFCE (scaled)")
    parser.add_argument("--no-tfce", action="store_true", help="skip the TFCE measurements")
    parser.add_argument("--single", choices=["ours", "nilearn"], help=argparse.SUPPRESS)
    parser.add_argument("--t-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tfce", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        run = run_ours if args.single == "ours" else run_nilearn
        print(json.dumps(run(args, args.t_path)))
        return

    print(
        f"N={args.maps} maps x {BRAIN_VOXELS} voxels (2 mm grid), {args.covariates} covariates, "
        f"{args.permutations} permutations; {os.cpu_count()} CPUs"
    )
    print(f"{'':10} {'ours s':>8} {'RSS GB':>7} {'nilearn s (scaled)':>20} {'RSS GB':>7} {'ratio':>7} {'max |dt|':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for tfce in ([False] if args.no_tfce else [False, True]):
            t_path = Path(folder) / "t.npy"
            ours = in_subprocess(args, "ours", tfce, t_path)
            theirs = in_subprocess(args, "nilearn", tfce, t_path)
            n = args.nilearn_tfce_permutations if tfce else args.nilearn_permutations
            print(
                f"{'max |t|' + (' + TFCE' if tfce else ''):10} {ours['seconds']:>8.1f} {ours['peak_rss_gb']:>7.2f} "
                f"{theirs['scaled_seconds']:>20.0f} {theirs['peak_rss_gb']:>7.2f} "
                f"{theirs['scaled_seconds'] / ours['seconds']:>7.1f} {theirs['max_t_difference']:>9.1e}"
            )
            print(
                f"{'':10} (nilearn: set-up {theirs['setup_seconds']:.1f} s, then {n} permutations in "
                f"{theirs['seconds']:.1f} s incl. set-up; max |t| {theirs['max_abs_t']:.2f}; ours: the products "
                f"alone take {ours['bound_seconds']:.1f} s at the {ours['gflops']:.0f} GFLOP/s sgemm measured "
                f"now, so ours is {ours['seconds'] / ours['bound_seconds']:.2f} x that bound)"
            )


if __name__ == "__main__":
    main()
