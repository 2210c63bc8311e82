"""A one-time index of a whole-brain tractogram on a voxel grid.

Finding the streamlines that cross a lesion by re-reading a tractogram of millions of
streamlines (what ``tckedit -include`` does) takes minutes per lesion. The index reads
the tractogram once, streaming, and stores for each streamline the voxels it occupies,
the inverse map (voxel -> streamlines through it), the total streamline count per voxel
and the streamline endpoints. A lesion then only touches the streamlines that cross it.

Voxel rules (``mode``)
----------------------
``"mrtrix"`` (default): the definitions of MRtrix3 3.0, so that results agree with
    ``tckedit -include`` and ``tckmap``.

    * *Crossing the lesion* (the inverse map): a streamline crosses a voxel when one of
      its stored vertices falls in it, nearest voxel (``round`` of the vertex's voxel
      coordinate, halves away from zero as ``std::round``), with no upsampling — the
      rule of ``tckedit -include IMAGE``.
    * *Voxels of the count maps* (the per-streamline lists): the streamline is first
      upsampled as ``tckmap`` does (Hermite interpolation, tension 0.1, ``r - 1`` points
      inserted per segment, the ends extrapolated linearly), then every point is mapped
      to its nearest voxel and each voxel counted once per streamline (``tckmap`` without
      ``-precise``). The ratio ``r`` is ``tckmap``'s automatic one,
      ``ceil(step / (0.333 * smallest voxel size))``, from the ``output_step_size`` (else
      ``step_size``) field of the ``.tck`` header; 1 when the header has neither (as
      ``tckmap``; a warning is logged when the vertices are further apart than a third
      of a voxel); ``upsample`` overrides it (``tckmap -upsample``).

``"traversal"``: exact geometry. Each streamline is the polyline through its vertices
    and occupies every voxel any of its straight segments passes through (voxel ``i``
    spans ``[i - 1/2, i + 1/2)`` in voxel coordinates; a segment that only touches an
    edge or corner is not counted). Used for both the lesion test and the count maps.
    It never misses a voxel between two distant vertices, but differs from MRtrix3.

Streamlines are numbered from 0 in file order. Coordinates are RAS+ millimetres (what
``.tck`` stores and what nibabel returns for ``.trk``); the grid's affine maps voxel
indices to them, so LAS grids (FSL's MNI152NLin6Asym) are handled by the affine, never by
flipping arrays. Voxel ids are C-order flat indices of the grid.

Storage
-------
``<data dir>/indexes/<key>/`` with ``meta.json`` and ``.npy`` arrays (memory-mapped when
queried): ``map_indptr`` (int64, n+1) and ``map_voxels`` (int32), the count-map voxels
of each streamline, sorted; ``inverse_indptr`` (int64, voxels+1) and
``inverse_streamlines`` (int32), the streamlines crossing each voxel, sorted;
``total_count`` (int32, one per voxel); ``endpoints`` (float32, n x 2 x 3, mm; NaN for
an empty streamline). The key hashes the tractogram's resolved path, size and
modification time, the grid, the mode and the upsampling ratio, so a changed tractogram
gets a new index (the stale one is removed). Indexes are built in a temporary folder and
renamed when complete, under a lock, so concurrent runs build once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lacuna.assets.registry import file_lock
from lacuna.core.atomic import write_json
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import ProcessingError
from lacuna.core.spaces import Grid

log = logging.getLogger(__name__)

INDEX_VERSION = 1
MODES = ("mrtrix", "traversal")
INDEX_DIRNAME = "indexes"

#: tckmap's automatic upsampling: an upsampled step of about a third of a voxel.
TCKMAP_STEP_FRACTION = np.float32(0.333)
#: Tension of MRtrix3's Hermite upsampler.
HERMITE_TENSION = np.float32(0.1)

#: Upsampled points processed per chunk while building (bounds the build's memory).
CHUNK_POINTS = 3_000_000
#: Inverse-map entries sorted per chunk while building.
CHUNK_ENTRIES = 8_000_000

_TCK_TYPES = {"Float32LE": "<f4", "Float32BE": ">f4", "Float64LE": "<f8", "Float64BE": ">f8"}

Progress = Callable[[int, int | None, float], None]


# --------------------------------------------------------------------------------------
# Reading tractograms
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TractogramInfo:
    """What the header of a tractogram says.

    Attributes
    ----------
    path : Path
    format : str
        ``"tck"`` or ``"trk"``.
    n_streamlines : int or None
        The header's count, when given (0 in a ``.tck`` still being written).
    step_size : float or None
        ``output_step_size`` (else ``step_size``) of a ``.tck`` header.
    """

    path: Path
    format: str
    n_streamlines: int | None
    step_size: float | None


def _tck_fields(path: Path) -> tuple[dict[str, str], int, np.dtype]:
    """Header fields, data offset and data type of a ``.tck`` file."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"mrtrix tracks":
            raise ProcessingError(f"{path} is not an MRtrix3 .tck file (first line is not 'mrtrix tracks')")
        for raw in handle:
            line = raw.decode("latin-1").strip()
            if line == "END":
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        else:
            raise ProcessingError(f"{path}: the .tck header has no END line")
    try:
        dot, offset = fields["file"].split()
        if dot != ".":
            raise ValueError
        offset = int(offset)
    except (KeyError, ValueError):
        raise ProcessingError(f"{path}: the .tck header has no usable 'file: . <offset>' field") from None
    datatype = fields.get("datatype", "Float32LE")
    if datatype not in _TCK_TYPES:
        raise ProcessingError(f"{path}: unsupported .tck datatype {datatype!r} (use one of {', '.join(_TCK_TYPES)})")
    return fields, offset, np.dtype(_TCK_TYPES[datatype])


def _float_field(fields: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        if key in fields:
            try:
                value = float(fields[key])
            except ValueError:
                return None
            return value if np.isfinite(value) and value > 0 else None
    return None


def read_tractogram_info(path: str | Path) -> TractogramInfo:
    """Format, streamline count and step size of a ``.tck`` or ``.trk`` file."""
    path = Path(path)
    if path.suffix == ".tck":
        fields, _, _ = _tck_fields(path)
        count = fields.get("count")
        n = int(count) if count and count.strip().isdigit() else None
        return TractogramInfo(path, "tck", n, _float_field(fields, "output_step_size", "step_size"))
    if path.suffix == ".trk" or path.name.endswith(".trk.gz"):
        import nibabel as nib

        header = nib.streamlines.load(str(path), lazy_load=True).header
        n = header.get("nb_streamlines")
        return TractogramInfo(path, "trk", int(n) if n else None, None)
    raise ProcessingError(f"{path}: a tractogram must be a .tck or .trk file")


def iter_streamline_chunks(path: str | Path, max_points: int = CHUNK_POINTS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive whole streamlines, a chunk at a time.

    Yields ``(points, lengths)``: float32 RAS+ mm vertices (m, 3) of the chunk's
    streamlines end to end, and the number of vertices of each (int64). A ``.tck`` is
    read directly in blocks of about ``max_points`` vertices (a block grows when one
    streamline is longer); a ``.trk`` lazily through ``nibabel.streamlines``.
    """
    path = Path(path)
    if path.suffix == ".tck":
        yield from _tck_chunks(path, max_points)
    else:
        yield from _nibabel_chunks(path, max_points)


def _tck_chunks(path: Path, max_points: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    _, offset, dtype = _tck_fields(path)
    n_values = (path.stat().st_size - offset) // dtype.itemsize
    n_rows = n_values // 3
    if n_rows == 0:
        return
    row_bytes = 3 * dtype.itemsize
    start, window = 0, max(int(max_points), 16)
    with open(path, "rb") as handle:  # explicit reads: pages of a memmap would stay in the RSS
        while start < n_rows:
            stop = min(start + window, n_rows)
            handle.seek(offset + start * row_bytes)
            block = np.fromfile(handle, dtype=dtype, count=3 * (stop - start)).reshape(-1, 3).astype(np.float32)
            ends = np.flatnonzero(np.isinf(block).any(axis=1))
            finished = stop == n_rows or ends.size > 0
            if ends.size:
                block = block[: ends[0]]
            delimiters = np.flatnonzero(np.isnan(block).any(axis=1))
            if not finished:
                if delimiters.size == 0:
                    window *= 2  # one streamline longer than the window
                    continue
                block = block[: delimiters[-1] + 1]
            elif block.shape[0] and (delimiters.size == 0 or delimiters[-1] != block.shape[0] - 1):
                # The data end without a delimiter: the last streamline ends there.
                block = np.concatenate([block, np.full((1, 3), np.nan, np.float32)])
                delimiters = np.append(delimiters, block.shape[0] - 1)
            if delimiters.size:
                lengths = np.diff(np.concatenate([[-1], delimiters])) - 1
                keep = np.ones(block.shape[0], bool)
                keep[delimiters] = False
                yield np.ascontiguousarray(block[keep]), lengths.astype(np.int64)
            if finished:
                return
            start += block.shape[0]
            window = max(int(max_points), 16)


def _nibabel_chunks(path: Path, max_points: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import nibabel as nib

    streamlines = nib.streamlines.load(str(path), lazy_load=True).streamlines
    pending: list[np.ndarray] = []
    n_points = 0
    for streamline in streamlines:
        points = np.asarray(streamline, dtype=np.float32).reshape(-1, 3)
        pending.append(points)
        n_points += points.shape[0]
        if n_points >= max_points:
            yield _joined(pending)
            pending, n_points = [], 0
    if pending:
        yield _joined(pending)


def _joined(pending: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([p.shape[0] for p in pending], dtype=np.int64)
    return np.concatenate(pending) if pending else np.empty((0, 3), np.float32), lengths


# --------------------------------------------------------------------------------------
# Streamlines to voxels
# --------------------------------------------------------------------------------------


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


class _GridMapper:
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


# --------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------


def _grid_record(grid: Grid) -> dict:
    return {"shape": list(grid.shape), "affine": np.round(np.asarray(grid.affine, float), 4).tolist()}


def index_key(tractogram: Path, grid: Grid, mode: str, upsample_ratio: int) -> str:
    """Hash naming the index of a tractogram (as it is now) on a grid."""
    stat = tractogram.stat()
    record = {
        "version": INDEX_VERSION,
        "path": str(tractogram),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "grid": _grid_record(grid),
        "mode": mode,
        "upsample": upsample_ratio,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def index_root() -> Path:
    """Folder of all tractogram indexes in the data directory."""
    return get_data_dir() / INDEX_DIRNAME


class TractogramIndex:
    """An opened (memory-mapped) tractogram index; see the module docs.

    Use :meth:`open`, which builds the index first when needed.

    Attributes
    ----------
    directory : Path
    meta : dict
        ``meta.json``: tractogram, grid, mode, upsampling ratio, counts, build time.
    n_streamlines : int
    grid : Grid
    mode : str
    upsample_ratio : int
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        self.n_streamlines = int(self.meta["n_streamlines"])
        self.grid = Grid(tuple(self.meta["grid"]["shape"]), np.array(self.meta["grid"]["affine"], float))
        self.mode = self.meta["mode"]
        self.upsample_ratio = int(self.meta["upsample"])
        self.n_voxels = int(np.prod(self.grid.shape))
        load = lambda name: np.load(self.directory / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.map_indptr = load("map_indptr")
        self.map_voxels = load("map_voxels")
        self.inverse_indptr = load("inverse_indptr")
        self.inverse_streamlines = load("inverse_streamlines")
        self.total_count = np.array(load("total_count"))
        self.endpoints = load("endpoints")

    @classmethod
    def open(
        cls,
        tractogram: str | Path,
        grid: Grid,
        mode: str = "mrtrix",
        upsample: int | None = None,
        progress: Progress | None = None,
        rebuild: bool = False,
    ) -> "TractogramIndex":
        """The index of ``tractogram`` on ``grid``, built (streaming) when missing or stale.

        Parameters
        ----------
        tractogram : str or Path
            ``.tck`` or ``.trk`` file (RAS+ mm coordinates).
        grid : Grid
            Analysis grid.
        mode : {"mrtrix", "traversal"}
            Voxel rule (module docs).
        upsample : int, optional
            Upsampling ratio of the count maps (``"mrtrix"`` mode); default ``tckmap``'s.
        progress : callable, optional
            ``progress(streamlines_done, streamlines_expected_or_None, seconds)`` during
            a build; by default progress is logged every 10 s.
        rebuild : bool
            Build again even if an index exists.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if upsample is not None and int(upsample) < 1:
            raise ValueError("upsample must be at least 1")
        path = Path(tractogram).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"tractogram not found: {path}")
        info = read_tractogram_info(path)
        if mode == "traversal":
            ratio = 1
        else:
            ratio = int(upsample) if upsample is not None else tckmap_upsample_ratio(info.step_size, grid)
        key = index_key(path, grid, mode, ratio)
        directory = index_root() / key
        with file_lock(index_root() / f".{key}.lock"):
            if rebuild and directory.exists():
                shutil.rmtree(directory)
            if not (directory / "meta.json").is_file():
                _build(info, grid, mode, ratio, upsample is None, directory, progress or _log_progress(path))
                _remove_stale(directory)
        return cls(directory)

    # -- queries ------------------------------------------------------------------------

    def streamlines_through(self, voxel_ids: np.ndarray) -> np.ndarray:
        """Sorted ids (int64) of the streamlines crossing any of the voxels (flat ids)."""
        voxel_ids = np.unique(np.asarray(voxel_ids, dtype=np.int64))
        if voxel_ids.size == 0:
            return np.empty(0, np.int64)
        found = self.inverse_streamlines[_ranges(self.inverse_indptr[voxel_ids], self.inverse_indptr[voxel_ids + 1])]
        if found.size == 0:
            return np.empty(0, np.int64)
        marked = np.zeros(self.n_streamlines, dtype=bool)
        marked[found] = True
        return np.flatnonzero(marked)

    def count_map(self, streamline_ids: np.ndarray) -> np.ndarray:
        """Streamlines of ``streamline_ids`` per voxel (flat int32), each counted once
        per voxel of its count-map voxels."""
        ids = np.asarray(streamline_ids, dtype=np.int64)
        if 2 * ids.size > self.n_streamlines:  # cheaper through the complement
            others = np.ones(self.n_streamlines, dtype=bool)
            others[ids] = False
            return (self.total_count - self._count(np.flatnonzero(others))).astype(np.int32)
        return self._count(ids)

    def _count(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(self.n_voxels, np.int32)
        voxels = self.map_voxels[_ranges(self.map_indptr[ids], self.map_indptr[ids + 1])]
        return np.bincount(voxels, minlength=self.n_voxels).astype(np.int32)

    def voxels_of(self, streamline: int) -> np.ndarray:
        """Count-map voxels (flat ids) of one streamline."""
        return np.asarray(self.map_voxels[self.map_indptr[streamline] : self.map_indptr[streamline + 1]])

    # -- derived arrays cached beside the index -----------------------------------------

    def cached(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """An array derived from the index (e.g. endpoint parcels), computed once and
        stored as ``<name>.npy`` in the index folder."""
        path = self.directory / f"{name}.npy"
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        array = compute()
        temporary = path.with_name(f".{name}.tmp-{os.getpid()}.npy")
        np.save(temporary, array)
        os.replace(temporary, path)
        return array


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, end)`` for every pair (int64)."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(ends, np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _log_progress(path: Path) -> Progress:
    state = {"last": 0.0}

    def report(done: int, expected: int | None, seconds: float) -> None:
        if seconds - state["last"] < 10:
            return
        state["last"] = seconds
        if expected:
            eta = seconds / max(done, 1) * max(expected - done, 0)
            log.info("indexing %s: %d/%d streamlines, %.0f s, ETA %.0f s", path.name, done, expected, seconds, eta)
        else:
            log.info("indexing %s: %d streamlines, %.0f s", path.name, done, seconds)

    return report


class _Appender:
    """Appends arrays of one dtype to a raw file."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.handle = open(path, "wb")

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        array.tofile(self.handle)
        self.count += array.size

    def close(self) -> None:
        self.handle.close()

    def to_npy(self, target: Path, shape: tuple | None = None) -> None:
        """Write the raw data as ``target`` (.npy), streaming, then delete the raw file."""
        self.close()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape or (self.count,),
        }
        with open(target, "wb") as out, open(self.path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 16 << 20)
        self.path.unlink()


def _build(info: TractogramInfo, grid: Grid, mode: str, ratio: int, automatic: bool, directory: Path, progress: Progress) -> None:
    root = directory.parent
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        _build_into(info, grid, mode, ratio, automatic, temporary, progress)
        os.replace(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _build_into(info: TractogramInfo, grid: Grid, mode: str, ratio: int, automatic: bool, folder: Path, progress: Progress) -> None:
    start = time.perf_counter()
    mapper = _GridMapper(grid)
    n_vox = mapper.n_voxels
    separate_query = mode == "mrtrix"
    map_voxels = _Appender(folder / "map_voxels.raw", np.int32)
    map_lengths = _Appender(folder / "map_lengths.raw", np.int64)
    endpoints = _Appender(folder / "endpoints.raw", np.float32)
    query_voxels = _Appender(folder / "query_voxels.raw", np.int32) if separate_query else map_voxels
    query_lengths = _Appender(folder / "query_lengths.raw", np.int64) if separate_query else map_lengths
    total = np.zeros(n_vox, dtype=np.int64)
    query_total = np.zeros(n_vox, dtype=np.int64) if separate_query else total
    n_lines = 0
    n_vertices = 0
    sum_steps, n_steps = 0.0, 0
    for points, lengths in iter_streamline_chunks(info.path, max(CHUNK_POINTS // max(ratio, 1), 1000)):
        k = lengths.size
        line = np.repeat(np.arange(k), lengths)
        if mode == "mrtrix":
            up_points, up_lengths = upsample(points, lengths, ratio)
            ids, owners = mapper.nearest(up_points, np.repeat(np.arange(k), up_lengths))
            voxels, counts = unique_per_streamline(ids, owners, k, n_vox)
            q_ids, q_owners = mapper.nearest(points, line)
            q_voxels, q_counts = unique_per_streamline(q_ids, q_owners, k, n_vox)
            query_voxels.write(q_voxels)
            query_lengths.write(q_counts)
            query_total += np.bincount(q_voxels, minlength=n_vox)
            if n_steps < 100_000 and points.shape[0] > 1:
                same = line[1:] == line[:-1]
                steps = np.linalg.norm(np.diff(points.astype(np.float64), axis=0)[same], axis=1)
                sum_steps += float(steps.sum())
                n_steps += steps.size
        else:
            ids, owners = mapper.traversed(points, lengths)
            voxels, counts = unique_per_streamline(ids, owners, k, n_vox)
        map_voxels.write(voxels)
        map_lengths.write(counts)
        total += np.bincount(voxels, minlength=n_vox)
        ends = np.full((k, 2, 3), np.nan, dtype=np.float32)
        has = lengths > 0
        first = np.cumsum(lengths) - lengths
        ends[has, 0] = points[first[has]]
        ends[has, 1] = points[first[has] + lengths[has] - 1]
        endpoints.write(ends)
        n_lines += k
        n_vertices += points.shape[0]
        progress(n_lines, info.n_streamlines, time.perf_counter() - start)
    if n_lines == 0:
        raise ProcessingError(f"{info.path} holds no streamlines")
    if n_lines >= np.iinfo(np.int32).max:
        raise ProcessingError(f"{info.path}: more than 2^31 streamlines are not supported")
    if mode == "mrtrix" and automatic and ratio == 1 and n_steps:
        mean_step = sum_steps / n_steps
        if mean_step > float(TCKMAP_STEP_FRACTION) * float(grid.voxel_sizes.min()) * 1.01:
            log.warning(
                "%s: the header gives no step size, so count maps use the vertices as they are "
                "(as tckmap does), but vertices are %.2f mm apart on %.3g mm voxels; voxels between "
                "vertices are missed. Pass upsample=%d (tckmap -upsample) for a denser map.",
                info.path.name, mean_step, float(grid.voxel_sizes.min()),
                tckmap_upsample_ratio(mean_step, grid),
            )
    # Per-streamline count-map voxels (CSR).
    map_lengths.close()
    lengths_all = np.fromfile(map_lengths.path, dtype=np.int64)
    np.save(folder / "map_indptr.npy", np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64))
    if separate_query:
        query_lengths.close()
        query_lengths_all = np.fromfile(query_lengths.path, dtype=np.int64)
        query_lengths.path.unlink()
    else:
        query_lengths_all = lengths_all
    map_lengths.path.unlink()
    query_voxels.close()
    # Inverse map: a counting sort of the query entries by voxel, chunk by chunk.
    inverse_indptr = np.concatenate([[0], np.cumsum(query_total)]).astype(np.int64)
    np.save(folder / "inverse_indptr.npy", inverse_indptr)
    n_entries = int(inverse_indptr[-1])
    inverse = np.lib.format.open_memmap(folder / "inverse_streamlines.npy", mode="w+", dtype=np.int32, shape=(n_entries,))
    if n_entries:
        _fill_inverse(query_voxels.path, query_lengths_all, inverse_indptr, inverse)
    inverse.flush()
    del inverse
    if separate_query:
        query_voxels.path.unlink()
    map_voxels.to_npy(folder / "map_voxels.npy")
    endpoints.to_npy(folder / "endpoints.npy", (n_lines, 2, 3))
    np.save(folder / "total_count.npy", total.astype(np.int32))
    seconds = time.perf_counter() - start
    write_json(
        folder / "meta.json",
        {
            "version": INDEX_VERSION,
            "tractogram": str(info.path),
            "tractogram_size": info.path.stat().st_size,
            "tractogram_mtime_ns": info.path.stat().st_mtime_ns,
            "format": info.format,
            "header_step_size": info.step_size,
            "grid": _grid_record(grid),
            "mode": mode,
            "upsample": ratio,
            "upsample_automatic": automatic,
            "n_streamlines": n_lines,
            "n_vertices": n_vertices,
            "n_map_entries": int(lengths_all.sum()),
            "n_inverse_entries": n_entries,
            "build_seconds": round(seconds, 2),
        },
    )
    log.info("indexed %d streamlines of %s in %.1f s", n_lines, info.path.name, seconds)


def _fill_inverse(entries: Path, lengths: np.ndarray, indptr: np.ndarray, out: np.ndarray) -> None:
    """``out[indptr[v]:indptr[v+1]]`` = streamlines crossing voxel ``v``, in order, from
    the raw int32 voxel lists of the streamlines in ``entries`` (read chunk by chunk)."""
    filled = np.zeros(indptr.size - 1, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    with open(entries, "rb") as handle:
        _fill_chunks(handle, lengths, bounds, indptr, filled, out)


def _fill_chunks(handle, lengths: np.ndarray, bounds: np.ndarray, indptr: np.ndarray, filled: np.ndarray, out: np.ndarray) -> None:
    """Counting sort of the entries, a chunk of streamlines at a time (stable by voxel,
    so each voxel's list stays in streamline order)."""
    first_line = 0
    while first_line < lengths.size:
        # Streamlines whose entries fit in one chunk (at least one streamline).
        last_line = int(np.searchsorted(bounds, bounds[first_line] + CHUNK_ENTRIES, side="right")) - 1
        last_line = min(max(last_line, first_line + 1), lengths.size)
        lo, hi = int(bounds[first_line]), int(bounds[last_line])
        handle.seek(4 * lo)
        voxels = np.fromfile(handle, dtype=np.int32, count=hi - lo).astype(np.int64)
        lines = np.repeat(np.arange(first_line, last_line, dtype=np.int32), lengths[first_line:last_line])
        order = np.argsort(voxels, kind="stable")
        voxels, lines = voxels[order], lines[order]
        n = voxels.size
        if n:
            starts = np.concatenate([[True], voxels[1:] != voxels[:-1]])
            group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
            rank = np.arange(n) - group_start
            out[indptr[voxels] + filled[voxels] + rank] = lines
            filled += np.bincount(voxels, minlength=filled.size)
        first_line = last_line


def _remove_stale(directory: Path) -> None:
    """Delete indexes of an earlier state (size or modification time) of the same
    tractogram on the same grid and mode."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for other in directory.parent.iterdir():
        if other == directory or not (other / "meta.json").is_file():
            continue
        try:
            old = json.loads((other / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        same_target = all(old.get(k) == meta.get(k) for k in ("tractogram", "grid", "mode"))
        changed = any(old.get(k) != meta.get(k) for k in ("tractogram_size", "tractogram_mtime_ns"))
        if same_target and changed:
            log.info("removing the stale index %s of %s", other.name, meta["tractogram"])
            shutil.rmtree(other, ignore_errors=True)
