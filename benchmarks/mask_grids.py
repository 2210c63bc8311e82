"""Benchmark moving a lesion mask from its own grid onto the analysis grids.

A ball lesion (``--radius`` mm, default 20: about 33 cm^3, a large stroke) is drawn on
several grids users really have (SPM 1 mm, SPM12's 2 mm bounding box, 1.5 mm, an
oblique 1 mm grid rotated 7 degrees) and moved onto the MNI152NLin6Asym 1 mm (atlas)
and 2 mm (connectome) grids exactly as an analysis does (``mask_coverage_box``: exact
separable partial volumes for lattice-aligned grids, the sampled estimate otherwise).
Prints the best of ``--repeat`` times per (grid, target) and the peak RSS.

Usage::

    python benchmarks/mask_grids.py
    python benchmarks/mask_grids.py --radius 35 --repeat 5
"""

from __future__ import annotations

import argparse
import resource
import time

import nibabel as nib
import numpy as np

from lacuna import SubjectData
from lacuna.analysis.base import mask_coverage_box
from lacuna.core.provenance import ProvenanceStep
from lacuna.core.spaces import standard_grid

SPACE = "MNI152NLin6Asym"
CENTRE_MM = np.array([-30.0, -20.0, 20.0])


def _affine(linear, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def _rotated(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


GRIDS = {
    "SPM 1 mm (181x217x181)": ((181, 217, 181), _affine(np.diag([-1, 1, 1]), (90, -126, -72))),
    "SPM12 bounding box 2 mm": ((79, 95, 79), _affine(np.diag([-2, 2, 2]), (78, -112, -70))),
    "1.5 mm RAS": ((121, 145, 121), _affine(np.diag([1.5, 1.5, 1.5]), (-90, -126, -72))),
    "oblique 1 mm (7 degrees)": ((182, 218, 182), _affine(_rotated(7), (-80, -136, -72))),
}


def _ball(shape, affine, radius: float) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(xyz - CENTRE_MM, axis=1) <= radius).reshape(shape).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--radius", type=float, default=20.0, help="lesion radius in mm")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    targets = {f"{res} mm": standard_grid(SPACE, res) for res in (1, 2)}
    print(f"lesion: ball of radius {args.radius:g} mm at {tuple(CENTRE_MM)}")
    for name, (shape, affine) in GRIDS.items():
        img = nib.Nifti1Image(_ball(shape, affine, args.radius), affine)
        subject = SubjectData(img, SPACE)
        for target_name, target in targets.items():
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                mask_coverage_box(subject, target, SPACE, ProvenanceStep(name="benchmark", kind="analysis"))
                best = min(best, time.perf_counter() - start)
            print(f"{name:28s} -> {target_name}: {best * 1000:7.1f} ms ({subject.get_volume_mm3() / 1000:.1f} cm^3)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
