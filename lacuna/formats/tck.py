"""Reading ``.tck`` and ``.trk`` tractograms a chunk of whole streamlines at a time.

``.tck`` files are read here directly, in large blocks (``numpy.fromfile`` of the
float data after the header, split at the NaN delimiters): ``nibabel.streamlines``
yields one streamline at a time through Python, minutes for a tractogram of millions,
while a block read is limited by the disk. ``.trk`` files, whose header carries the
voxel-to-RAS geometry, go through ``nibabel.streamlines`` (lazily).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lacuna.core.errors import ProcessingError

#: Vertices per chunk by default.
CHUNK_POINTS = 3_000_000

_TCK_TYPES = {"Float32LE": "<f4", "Float32BE": ">f4", "Float64LE": "<f8", "Float64BE": ">f8"}


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
    except (KeyError, ValueError) as exc:
        raise ProcessingError(f"{path}: the .tck header has no usable 'file: . <offset>' field") from exc
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
