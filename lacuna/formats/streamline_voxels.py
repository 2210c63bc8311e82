"""Streamlines to voxels: MRtrix3's upsampling and nearest-voxel rule, and exact
segment traversal (the two ``mode`` rules of :mod:`lacuna.formats.tractogram_index`)."""

from __future__ import annotations

import numpy as np

from lacuna.core.spaces import Grid

#: tckmap's automatic upsampling: an upsampled step of about a third of a voxel.
TCKMAP_STEP_FRACTION = np.float32(0.333)
#: Tension of MRtrix3's Hermite upsampler.
HERMITE_TENSION = np.float32(0.1)




def tckmap_upsample_ratio(step_size: float | None, grid: Grid) -> int:
    """``tckmap``'s automatic upsampling ratio for a step size on ``grid`` (1 without one)."""
    if not step_size:
        return 1
    return int(np.ceil(np.float32(step_size) / (float(grid.voxel_sizes.min()) * float(TCKMAP_STEP_FRACTION))))


def hermite_weights(ratio: int) -> np.ndarray:
    """Weights (ratio - 1, 4) of the points MRtrix3's upsampler inserts per segment."""
    t = np.float32(0.5) * HERMITE_TENSION
    rows = []
    for i in range(ratio - 1):
        p = np.float32((i + 1.0) / np.float32(ratio))
        p2 = p * p
        p3 = p * p2
        rows.append(
            [
                (np.float32(0.5) - t) * (np.float32(2.0) * p2 - p3 - p),
                np.float32(1.0) + (np.float32(1.5) + t) * p3 - (np.float32(2.5) + t) * p2,
                (np.float32(2.0) + np.float32(2.0) * t) * p2 + (np.float32(0.5) - t) * p - (np.float32(1.5) + t) * p3,
                (np.float32(0.5) - t) * (p3 - p2),
            ]
        )
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


def upsample(points: np.ndarray, lengths: np.ndarray, ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """Streamlines upsampled as MRtrix3 does (``Resampling::Upsampler``).

    Between vertices ``p[j]`` and ``p[j+1]``, ``ratio - 1`` points of the Hermite curve
    through ``p[j-1] .. p[j+2]`` are inserted (``p[-1] = 2 p[0] - p[1]`` and likewise
    at the far end). Streamlines of fewer than two vertices are unchanged.

    Returns
    -------
    (points, lengths) of the upsampled streamlines, in order.
    """
    lengths = np.asarray(lengths, np.int64)
    if ratio <= 1 or points.shape[0] < 2:
        return points, lengths
    ends = np.cumsum(lengths)
    starts = ends - lengths
    long = lengths >= 2
    # Every pair of consecutive vertices (i, i + 1); "inside" pairs are segments.
    inside = np.ones(points.shape[0] - 1, dtype=bool)
    inside[ends[ends < points.shape[0]] - 1] = False
    b, c = points[:-1], points[1:]
    a = np.concatenate([points[:1], points[:-2]])
    d = np.concatenate([points[2:], points[-1:]])
    first, last = starts[long], ends[long] - 2  # first and last segment of each streamline
    a[first] = b[first] + (b[first] - c[first])
    d[last] = c[last] + (c[last] - b[last])
    weights = hermite_weights(ratio)
    rows = np.empty((b.shape[0], ratio, 3), dtype=np.float32)
    rows[:, 0] = b
    for k, (w0, w1, w2, w3) in enumerate(weights, start=1):
        rows[:, k] = w0 * a + w1 * b + w2 * c + w3 * d
    keep = np.zeros((b.shape[0], ratio), dtype=bool)
    keep[:, 0] = True
    keep[inside, 1:] = True
    out = np.concatenate([rows[keep], points[-1:]])
    return out, np.where(long, (lengths - 1) * ratio + 1, lengths)


def mrtrix_round(values: np.ndarray) -> np.ndarray:
    """Round halves away from zero, as C++ ``std::round`` (numpy rounds them to even)."""
    rounded = np.floor(values + 0.5)
    rounded[(rounded - values == 0.5) & (values < 0)] -= 1  # -k.5 goes down, not up
    return rounded.astype(np.int64)


class GridMapper:
    """Points (mm) to voxel coordinates and flat voxel ids on a grid."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.shape = np.array(grid.shape, dtype=np.int64)
        self.n_voxels = int(np.prod(grid.shape))
        inverse = np.linalg.inv(grid.affine)
        self.rotation = inverse[:3, :3]
        self.translation = inverse[:3, 3]
        self.diagonal = bool(np.all(self.rotation == np.diag(np.diag(self.rotation))))

    def coordinates(self, points: np.ndarray) -> np.ndarray:
        if self.diagonal:
            coords = points.astype(np.float64)
            coords *= np.diag(self.rotation)
            coords += self.translation
            return coords
        return points.astype(np.float64) @ self.rotation.T + self.translation

    def flat(self, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids of integer voxel indices, and which were inside the grid."""
        inside = (ijk[:, 0] >= 0) & (ijk[:, 0] < self.shape[0])
        inside &= (ijk[:, 1] >= 0) & (ijk[:, 1] < self.shape[1])
        inside &= (ijk[:, 2] >= 0) & (ijk[:, 2] < self.shape[2])
        ijk = ijk[inside]
        return (ijk[:, 0] * self.shape[1] + ijk[:, 1]) * self.shape[2] + ijk[:, 2], inside

    def nearest(self, points: np.ndarray, line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest-voxel ids of points (and their streamline numbers), inside the grid.

        ``floor(v + 1/2)`` equals ``std::round(v)`` except at negative halves, of which
        only -1/2 (voxel -1, outside, not 0) matters inside the grid. Axis by axis, on
        contiguous columns (the cost of the whole build is mostly here)."""
        ids = np.zeros(points.shape[0], dtype=np.float64)
        inside = np.ones(points.shape[0], dtype=bool)
        for axis in range(3):
            if self.diagonal:
                v = points[:, axis].astype(np.float64)
                v *= self.rotation[axis, axis]
            else:
                v = points.astype(np.float64) @ self.rotation[axis]
            v += self.translation[axis]
            cell = np.floor(v + 0.5)
            cell[v == -0.5] = -1
            inside &= (cell >= 0) & (cell < self.shape[axis])
            ids *= self.shape[axis]
            ids += cell
        return ids[inside].astype(np.int64), line[inside]

    def traversed(self, points: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxels every straight segment passes through (and their streamline numbers)."""
        coords = self.coordinates(points)
        line_of_point = np.repeat(np.arange(lengths.size), lengths)
        cells = np.floor(coords + 0.5).astype(np.int64)
        # Every vertex's own voxel.
        pieces_cells = [cells]
        pieces_lines = [line_of_point]
        if coords.shape[0] > 1:
            same = line_of_point[1:] == line_of_point[:-1]
            g = np.flatnonzero(same)  # segments g -> g + 1
            p, q = coords[g], coords[g + 1]
            cp, cq = cells[g], cells[g + 1]
            crossings = np.abs(cq - cp)  # planes crossed per axis
            per_segment = crossings.sum(axis=1)
            moving = per_segment > 0
            if moving.any():
                g, p, q, cp, cq, crossings = g[moving], p[moving], q[moving], cp[moving], cq[moving], crossings[moving]
                t_values, segment_ids = [], []
                for axis in range(3):
                    n = crossings[:, axis]
                    seg = np.repeat(np.arange(g.size), n)
                    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
                    low = np.minimum(cp[seg, axis], cq[seg, axis])
                    plane = low + k + 0.5
                    delta = q[seg, axis] - p[seg, axis]
                    t_values.append((plane - p[seg, axis]) / delta)
                    segment_ids.append(seg)
                t = np.concatenate(t_values)
                seg = np.concatenate(segment_ids)
                order = np.lexsort((t, seg))
                t, seg = t[order], seg[order]
                # Interval after each crossing: up to the next crossing of the segment, or 1.
                next_t = np.ones_like(t)
                same_seg = seg[1:] == seg[:-1]
                next_t[:-1][same_seg] = t[1:][same_seg]
                keep = next_t - t > 1e-9
                mid = 0.5 * (t[keep] + next_t[keep])
                seg = seg[keep]
                where = p[seg] + mid[:, None] * (q[seg] - p[seg])
                pieces_cells.append(np.floor(where + 0.5).astype(np.int64))
                pieces_lines.append(line_of_point[g[seg]])
        ids, inside = self.flat(np.concatenate(pieces_cells))
        return ids, np.concatenate(pieces_lines)[inside]


def unique_per_streamline(ids: np.ndarray, line: np.ndarray, n_lines: int, n_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique voxel ids per streamline: (int32 voxels, int64 count per streamline)."""
    keys = line.astype(np.int64) * n_voxels + ids
    if keys.size > 1:
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # cheap first pass
        keys.sort()
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return (keys % n_voxels).astype(np.int32), np.bincount(keys // n_voxels, minlength=n_lines).astype(np.int64)
