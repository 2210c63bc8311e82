"""Benchmark structural lesion network mapping: Lacuna's index vs tckedit + tckmap.

Makes a synthetic whole-brain tractogram in MNI152NLin6Asym (default 1,000,000
streamlines, 1 mm steps): endpoints are cortical and subcortical voxels of the
Schaefer 400 + Tian S1 atlas from ../shared when present (else a shell of an
ellipsoidal brain), lengths follow a gamma distribution (mean about 75 mm along the
path), and each streamline is a quadratic curve bent towards the deep white matter,
with a little noise. Then it prints:

* the index build time and its peak RSS (built in a child process, so the peak is the
  build's own), and the index size on disk;
* the one-time assignment of the streamline endpoints to the parcels of ``--atlas``;
* per lesion (small, medium, large spheres in the white matter): Lacuna's query time
  (``streamlines_through`` + ``count_map`` + the fraction map: the per-lesion work of
  :class:`~lacuna.analysis.StructuralNetworkMapping` that replaces tckedit + tckmap;
  best of ``--repeat``) and the whole ``StructuralNetworkMapping.run`` of the lesion
  (resampling, maps, scalars and the parcel matrices of ``--atlas``; no file writing);
* when MRtrix3 is installed, the wall time of ``tckedit -include lesion`` +
  ``tckmap -template lesion`` for the same lesions in the same run (MRtrix3's own
  multithreading, all cores), the ratio to Lacuna's query time, and the agreement of
  the two (streamlines in common, map correlation).

Usage::

    python benchmarks/slnm.py                              # 1M streamlines
    python benchmarks/slnm.py --streamlines 100000 --no-mrtrix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.spaces import standard_grid

SPACE = "MNI152NLin6Asym"
ATLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases" / (
    "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018TianS1_desc-400Parcels17Networks_dseg.nii.gz"
)
LESIONS = {"small": ((-26.0, -12.0, 22.0), 4.0), "medium": ((-26.0, -12.0, 22.0), 10.0), "large": ((-30.0, -20.0, 18.0), 25.0)}
BRAIN_CENTRE = np.array([0.0, -18.0, 12.0])


def endpoint_pool(rng: np.random.Generator) -> np.ndarray:
    """Candidate endpoints (mm): labelled atlas voxels, else an ellipsoidal shell."""
    if ATLAS.is_file():
        img = nib.load(ATLAS)
        ijk = np.argwhere(np.asanyarray(img.dataobj) > 0)
        return (ijk @ img.affine[:3, :3].T + img.affine[:3, 3]).astype(np.float64)
    directions = rng.standard_normal((200_000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    depth = rng.uniform(0.85, 1.0, (200_000, 1))
    return BRAIN_CENTRE + directions * depth * np.array([68.0, 92.0, 70.0])


def write_tractogram(path: Path, n_streamlines: int, step: float, seed: int = 0, chunk: int = 20_000) -> dict:
    """Stream a synthetic tractogram to ``path`` (.tck); returns a summary."""
    rng = np.random.default_rng(seed)
    pool = endpoint_pool(rng)
    header = f"mrtrix tracks\nstep_size: {step:g}\ndatatype: Float32LE\ncount: {0:010d}\nsource: lacuna benchmarks/slnm.py\n"
    offset = len(header) + len("file: . 0000\nEND\n")
    header += f"file: . {offset:04d}\nEND\n"
    n_points = 0
    lengths_mm = []
    with open(path, "wb") as handle:
        handle.write(header.encode())
        done = 0
        while done < n_streamlines:
            k = min(chunk, n_streamlines - done)
            first = pool[rng.integers(0, len(pool), k)] + rng.uniform(-1, 1, (k, 3))
            candidates = pool[rng.integers(0, len(pool), (k, 24))]
            target = rng.gamma(3.0, 22.0, k) + 10.0
            distance = np.linalg.norm(candidates - first[:, None, :], axis=2)
            second = candidates[np.arange(k), np.argmin(np.abs(distance - target[:, None]), axis=1)]
            second = second + rng.uniform(-1, 1, (k, 3))
            middle = 0.5 * (first + second)
            bend = rng.uniform(0.2, 0.6, (k, 1))
            control = middle + bend * (BRAIN_CENTRE - middle) + rng.normal(0, 4, (k, 3))
            arc = np.linalg.norm(control - first, axis=1) + np.linalg.norm(second - control, axis=1)
            counts = np.maximum(2, np.ceil(arc / step).astype(np.int64) + 1)
            line = np.repeat(np.arange(k), counts)
            t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) / (counts - 1)[line]
            t = t[:, None]
            points = (1 - t) ** 2 * first[line] + 2 * (1 - t) * t * control[line] + t**2 * second[line]
            points += rng.normal(0, 0.1 * step, points.shape)
            # NaN row after every streamline.
            out = np.full((points.shape[0] + k, 3), np.nan, dtype=np.float32)
            rows = np.arange(points.shape[0]) + line
            out[rows] = points
            out.tofile(handle)
            seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
            seg[np.cumsum(counts)[:-1] - 1] = 0
            lengths_mm.append(np.bincount(line[1:], weights=seg, minlength=k))
            n_points += points.shape[0]
            done += k
        np.full((1, 3), np.inf, dtype=np.float32).tofile(handle)
    with open(path, "r+b") as handle:
        text = header.replace(f"count: {0:010d}", f"count: {n_streamlines:010d}")
        handle.write(text.encode())
    lengths = np.concatenate(lengths_mm)
    return {
        "streamlines": n_streamlines,
        "points": int(n_points),
        "mean_length_mm": float(lengths.mean()),
        "median_length_mm": float(np.median(lengths)),
        "file_gb": path.stat().st_size / 1e9,
    }


def sphere(centre, radius) -> np.ndarray:
    grid = standard_grid(SPACE, 2)
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return (np.linalg.norm(xyz - np.asarray(centre), axis=1) <= radius).reshape(grid.shape).astype(np.uint8)


def _set_agreement(cut_tck: Path, our_first_points: np.ndarray) -> float:
    """Streamlines in both sets / streamlines in either (matched by their first vertex,
    which tckedit copies bit for bit)."""
    from lacuna.formats.tck import iter_streamline_chunks

    firsts = []
    for points, lengths in iter_streamline_chunks(cut_tck):
        starts = np.cumsum(lengths) - lengths
        firsts.append(points[starts[lengths > 0]])
    theirs = np.concatenate(firsts) if firsts else np.empty((0, 3), np.float32)
    as_keys = lambda a: np.ascontiguousarray(a, dtype=np.float32).view(np.dtype((np.void, 12))).ravel()  # noqa: E731
    a, b = as_keys(theirs), as_keys(our_first_points)
    both = np.intersect1d(a, b).size
    either = np.union1d(a, b).size
    return both / either if either else 1.0


def build_only(tck: str) -> None:
    """Child process: build the index and print its summary as JSON."""
    from lacuna.formats.tractogram_index import TractogramIndex

    start = time.perf_counter()
    index = TractogramIndex.open(tck, standard_grid(SPACE, 2), rebuild=True)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in index.directory.iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "index_gb": size / 1e9, "upsample": index.upsample_ratio, "directory": str(index.directory)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streamlines", type=int, default=1_000_000)
    parser.add_argument("--step", type=float, default=1.0, help="step size in mm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="query repetitions (best is reported)")
    parser.add_argument("--workdir", type=Path, help="folder for the tractogram and index (default: a temporary one)")
    parser.add_argument("--no-mrtrix", action="store_true", help="skip tckedit + tckmap")
    parser.add_argument("--atlas", default="Schaefer2018_400Parcels7Networks", help="parcellation of the full runs ('' for none)")
    parser.add_argument("--build-only", metavar="TCK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_only(args.build_only)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lacuna-slnm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["LACUNA_DATA_DIR"] = str(workdir / "cache")
    tck = workdir / f"synthetic_{args.streamlines}.tck"
    print(f"Synthetic tractogram: {args.streamlines:,} streamlines, step {args.step:g} mm, in {workdir}")
    start = time.perf_counter()
    summary = write_tractogram(tck, args.streamlines, args.step, args.seed)
    print(
        f"  written in {time.perf_counter() - start:.1f} s: {summary['points']:,} points, "
        f"{summary['file_gb']:.2f} GB, mean length {summary['mean_length_mm']:.1f} mm "
        f"(median {summary['median_length_mm']:.1f})"
    )

    child = subprocess.run([sys.executable, __file__, "--build-only", str(tck)], capture_output=True, text=True, env=os.environ)
    if child.returncode:
        sys.exit(child.stderr)
    build = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"Index build: {build['seconds']:.1f} s, peak RSS {build['peak_rss_gb']:.2f} GB, "
        f"{build['index_gb']:.2f} GB on disk (count maps upsampled x{build['upsample']})"
    )

    from lacuna.analysis import StructuralNetworkMapping
    from lacuna.core.subject import SubjectData
    from lacuna.formats.tractogram_index import TractogramIndex

    grid = standard_grid(SPACE, 2)
    index = TractogramIndex.open(tck, grid)
    atlas_dir = ATLAS.parent if ATLAS.parent.is_dir() else None
    parcellations = [args.atlas] if atlas_dir and args.atlas else []
    analysis = StructuralNetworkMapping(tck, space=SPACE, parcellations=parcellations, atlas_dir=atlas_dir)
    if parcellations:
        warm = SubjectData(nib.Nifti1Image(sphere(*LESIONS["small"]), grid.affine), SPACE, metadata={"subject_id": "warm"})
        begin = time.perf_counter()
        analysis.run(warm)
        print(f"Endpoint -> {args.atlas} assignment (one-time per index and parcellation, cached): {time.perf_counter() - begin:.1f} s")
    mrtrix = shutil.which("tckedit") and shutil.which("tckmap") and not args.no_mrtrix
    print(f"{'lesion':8s} {'voxels':>7s} {'cut':>9s} {'query s':>8s} {'run s':>7s}" + ("  tckedit+tckmap s   ratio  same streamlines  map r" if mrtrix else ""))
    for name, (centre, radius) in LESIONS.items():
        mask = sphere(centre, radius)
        voxels = np.flatnonzero(mask.ravel())
        best = np.inf
        for _ in range(args.repeat):
            begin = time.perf_counter()
            cut = index.streamlines_through(voxels)
            count = index.count_map(cut)
            fraction = np.zeros(count.shape, np.float32)
            np.divide(count, index.total_count, out=fraction, where=index.total_count > 0)
            best = min(best, time.perf_counter() - begin)
        subject = SubjectData(nib.Nifti1Image(mask, grid.affine), SPACE, metadata={"subject_id": name})
        begin = time.perf_counter()
        analysis.run(subject)
        run_seconds = time.perf_counter() - begin
        line = f"{name:8s} {voxels.size:7d} {cut.size:9d} {best:8.3f} {run_seconds:7.3f}"
        if mrtrix:
            lesion_path = workdir / f"lesion_{name}.nii.gz"
            nib.save(nib.Nifti1Image(mask, grid.affine), lesion_path)
            begin = time.perf_counter()
            subprocess.run(["tckedit", "-quiet", "-force", "-include", str(lesion_path), str(tck), str(workdir / "cut.tck")], check=True)
            subprocess.run(["tckmap", "-quiet", "-force", "-template", str(lesion_path), str(workdir / "cut.tck"), str(workdir / "cut.nii")], check=True)
            mrtrix_seconds = time.perf_counter() - begin
            reference = nib.load(workdir / "cut.nii").get_fdata().ravel()
            same = _set_agreement(workdir / "cut.tck", np.asarray(index.endpoints[cut, 0], dtype=np.float32))
            r = np.corrcoef(reference, count)[0, 1] if reference.any() else float("nan")
            line += f"  {mrtrix_seconds:17.1f}  {mrtrix_seconds / best:6.0f}x  {same:16.4%}  {r:.5f}"
        print(line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"Peak RSS of this process (tractogram writing + queries): {peak:.2f} GB")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
