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

The files are read by :mod:`lacuna.formats.tck`; the voxel rules are in
:mod:`lacuna.formats.streamline_voxels`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lacuna.core.atomic import write_json
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import ProcessingError
from lacuna.core.locks import file_lock
from lacuna.core.spaces import Grid
from lacuna.core.timing import ProgressLog
from lacuna.formats.streamline_voxels import TCKMAP_STEP_FRACTION, GridMapper, tckmap_upsample_ratio, unique_per_streamline, upsample
from lacuna.formats.tck import CHUNK_POINTS, TractogramInfo, iter_streamline_chunks, read_tractogram_info

log = logging.getLogger(__name__)

INDEX_VERSION = 1
MODES = ("mrtrix", "traversal")
INDEX_DIRNAME = "indexes"

#: Inverse-map entries sorted per chunk while building.
CHUNK_ENTRIES = 8_000_000

Progress = Callable[[int, int | None, float], None]


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
                _build(info, grid, mode, ratio, upsample is None, directory, progress or ProgressLog(log, f"indexing {path.name}", "streamlines"))
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
    mapper = GridMapper(grid)
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
