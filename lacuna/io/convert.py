"""Converting normative connectome data to the formats Lacuna reads.

* :func:`gsp1000_to_hdf5` — GSP1000 functional NIfTIs to self-contained HDF5 batch files
  (see :mod:`lacuna.io.functional_connectome` for the layout), one subject in memory at
  a time.
* :func:`trk_to_tck` and :func:`merge_trk_to_tck` — TrackVis tractograms to MRtrix3
  ``.tck``, streamed with ``nibabel.streamlines`` (coordinates stay RAS+ millimetres).

Every output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.streamlines import Field, LazyTractogram, TckFile

from lacuna.core.atomic import write_json
from lacuna.core.errors import ProcessingError
from lacuna.core.spaces import (
    SUPPORTED_SPACES,
    Grid,
    identify_standard_grid,
    space_of_standard_grid,
)
from lacuna.io.functional_connectome import ConnectomeWriter

log = logging.getLogger(__name__)

GSP_PATTERN = "sub-*/func/*bld001_rest_*_finalmask.nii.gz"

#: Path fragments (case-insensitive) of cranial-nerve tracts, left out of merged atlases.
CRANIAL_NERVE_PATTERNS = ("cranial", "cnii", "cniii", "cnv", "cnvii", "cnviii")


def _mask_space(mask_path: Path, grid: Grid) -> tuple[str, int]:
    for space in SUPPORTED_SPACES:
        resolution = identify_standard_grid(space, grid)
        if resolution is not None:
            return space, resolution
    raise ValueError(f"{mask_path}: the brain mask is not on a standard grid ({grid.describe()})")


def gsp1000_to_hdf5(
    gsp_dir: str | Path,
    mask_path: str | Path,
    output_dir: str | Path,
    subjects_per_chunk: int = 10,
    *,
    max_subjects: int | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> list[Path]:
    """Convert GSP1000 functional NIfTIs to Lacuna HDF5 batch ("chunk") files.

    Scans ``gsp_dir/sub-*/func/*bld001_rest_*_finalmask.nii.gz``, extracts each
    subject's in-mask timeseries (raw: no demeaning or normalisation) and writes
    self-contained chunk files of ``subjects_per_chunk`` subjects, HDF5-chunked
    (1, n_timepoints, n_voxels). Only one subject is in memory at a time. Existing chunk
    files are kept (a re-run resumes) unless ``overwrite``.

    Parameters
    ----------
    gsp_dir : str or Path
        Folder holding the ``sub-*`` folders.
    mask_path : str or Path
        Binary brain mask on the grid of the functional images (FSL MNI152 2 mm).
    output_dir : str or Path
        Folder for the chunk files.
    subjects_per_chunk : int
        Subjects per chunk file.
    max_subjects : int, optional
        Convert only the first ``max_subjects`` subjects (sorted by path).
    overwrite : bool
        Rewrite existing chunk files.
    dtype : {"float32", "float16"}
        Storage type of the timeseries.

    Returns
    -------
    list of Path
        The chunk files, in order.

    Raises
    ------
    FileNotFoundError
        If ``gsp_dir`` or the mask does not exist.
    ValueError
        If no functional file matches, or files disagree with the mask grid.
    """
    gsp_dir, mask_path, output_dir = Path(gsp_dir), Path(mask_path), Path(output_dir)
    if not gsp_dir.is_dir():
        raise FileNotFoundError(f"GSP1000 folder not found: {gsp_dir}")
    if not mask_path.is_file():
        raise FileNotFoundError(f"brain mask not found: {mask_path}")
    if subjects_per_chunk < 1:
        raise ValueError("subjects_per_chunk must be at least 1")
    files = sorted(gsp_dir.glob(GSP_PATTERN))
    if max_subjects is not None:
        files = files[:max_subjects]
    if not files:
        raise ValueError(f"no functional files matching {GSP_PATTERN} in {gsp_dir}")
    mask_img = nib.load(str(mask_path))
    mask = np.asanyarray(mask_img.dataobj) > 0
    grid = Grid.of(mask_img)
    space, resolution = _mask_space(mask_path, grid)
    indices = np.array(np.nonzero(mask))
    output_dir.mkdir(parents=True, exist_ok=True)
    chunks = [files[i : i + subjects_per_chunk] for i in range(0, len(files), subjects_per_chunk)]
    written = []
    for number, chunk in enumerate(chunks):
        path = output_dir / f"gsp1000_chunk_{number:03d}.h5"
        if path.exists() and not overwrite:
            log.info("keeping existing %s", path.name)
        else:
            _write_chunk(path, chunk, mask, grid, indices, space, resolution, dtype)
            log.info("wrote %s (%d/%d)", path.name, number + 1, len(chunks))
        written.append(path)
    return written


def _subject_timeseries(path: Path, mask: np.ndarray, grid: Grid) -> np.ndarray:
    """In-mask timeseries (n_timepoints, n_voxels) of one subject's 4-D image."""
    img = nib.load(str(path))
    if img.ndim != 4 or not Grid.of(img).matches(grid):
        raise ValueError(
            f"{path}: expected a 4-D image on the brain mask's grid ({grid.describe()}), got "
            f"shape {img.shape} on {Grid.of(img).describe()}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    return np.ascontiguousarray(data[mask].T)


def _write_chunk(path, files, mask, grid, indices, space, resolution, dtype) -> None:
    first = _subject_timeseries(files[0], mask, grid)
    subject_ids = [f.parent.parent.name for f in files]
    attributes = {"source": "GSP1000", "subjects": np.array(subject_ids, dtype="S")}
    with ConnectomeWriter(
        path, len(files), first.shape[0], indices, grid.affine, grid.shape, space, resolution, dtype=dtype, attributes=attributes
    ) as writer:
        writer.write(first)
        for source in files[1:]:
            timeseries = _subject_timeseries(source, mask, grid)
            if timeseries.shape != first.shape:
                raise ValueError(
                    f"{source}: {timeseries.shape[0]} timepoints, but {files[0].name} of the same "
                    f"chunk has {first.shape[0]}; every subject of a chunk needs the same length"
                )
            writer.write(timeseries)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _save_tck(streamlines: Iterator, output_path: Path) -> Path:
    """Stream ``streamlines`` (RAS+ mm arrays) into ``output_path`` atomically."""
    temporary = _temporary(output_path)
    tractogram = LazyTractogram(lambda: streamlines, affine_to_rasmm=np.eye(4))
    try:
        TckFile(tractogram).save(str(temporary))
        os.replace(temporary, output_path)
    finally:
        temporary.unlink(missing_ok=True)
    return output_path


def _check_output(output_path: Path, overwrite: bool) -> None:
    if output_path.suffix != ".tck":
        raise ValueError(f"{output_path}: the output must be a .tck file")
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} exists; pass overwrite=True to replace it")
    output_path.parent.mkdir(parents=True, exist_ok=True)


def _is_trk(path: Path) -> bool:
    return path.name.endswith(".trk") or path.name.endswith(".trk.gz")


def _trk_streamlines(path: Path) -> Iterator[np.ndarray]:
    """Streamlines of a TrackVis file in RAS+ mm, read lazily."""
    return iter(nib.streamlines.load(str(path), lazy_load=True).streamlines)


def trk_to_tck(trk_path: str | Path, output_path: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a TrackVis ``.trk`` tractogram to MRtrix3 ``.tck`` (pure nibabel, streamed).

    A ``.tck`` file does not record its space. When the TrackVis header's reference
    volume (dimensions and voxel-to-RAS affine) is exactly a template grid of one
    supported space, that space is written beside the output as a JSON sidecar
    (``<name>.json`` with ``SpatialReference``), which StructuralNetworkMapping reads;
    otherwise declare the space when using the tractogram.

    Raises
    ------
    ValueError
        If the extensions are not ``.trk``/``.trk.gz`` and ``.tck``.
    FileNotFoundError
        If the input does not exist.
    RuntimeError
        If reading or writing fails.
    """
    trk_path, output_path = Path(trk_path), Path(output_path)
    if not _is_trk(trk_path):
        raise ValueError(f"{trk_path}: the input must be a .trk file")
    if not trk_path.is_file():
        raise FileNotFoundError(f"tractogram not found: {trk_path}")
    _check_output(output_path, overwrite)
    try:
        trk = nib.streamlines.load(str(trk_path), lazy_load=True)
        _save_tck(iter(trk.streamlines), output_path)
    except Exception as exc:
        raise RuntimeError(f"converting {trk_path} to {output_path} failed: {exc}") from exc
    _write_header_space(trk.header, trk_path, output_path)
    return output_path


def _write_header_space(header: dict, trk_path: Path, output_path: Path) -> None:
    """Record the space of a TrackVis header's reference grid beside ``output_path``."""
    try:
        grid = Grid(tuple(int(n) for n in header[Field.DIMENSIONS]), np.asarray(header[Field.VOXEL_TO_RASMM], float))
    except (KeyError, TypeError, ValueError):
        return
    found = space_of_standard_grid(grid)
    if found is None:
        log.info("%s: the header grid is no template grid; the space of %s must be declared", trk_path, output_path.name)
        return
    space, resolution = found
    write_json(output_path.with_suffix(".json"), {"SpatialReference": space})
    log.info("%s: header grid is the %s %d mm template grid; recorded beside %s", trk_path, space, resolution, output_path.name)


def merge_trk_to_tck(
    source_dir: str | Path,
    output_path: str | Path,
    *,
    exclude_patterns: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge every ``.trk``/``.trk.gz`` below ``source_dir`` into one ``.tck``.

    Files whose path (relative to ``source_dir``) contains any of ``exclude_patterns``
    (case-insensitive; default :data:`CRANIAL_NERVE_PATTERNS`) are left out.

    Raises
    ------
    FileNotFoundError
        If ``source_dir`` does not exist.
    ValueError
        If no tract file remains, or the output is not ``.tck``.
    ProcessingError
        If reading or writing fails.
    """
    source_dir, output_path = Path(source_dir), Path(output_path)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"tract folder not found: {source_dir}")
    patterns = [p.lower() for p in (CRANIAL_NERVE_PATTERNS if exclude_patterns is None else exclude_patterns)]
    tracts = sorted(
        path
        for path in source_dir.rglob("*")
        if _is_trk(path) and not any(p in path.relative_to(source_dir).as_posix().lower() for p in patterns)
    )
    if not tracts:
        raise ValueError(f"no .trk files to merge in {source_dir} (after excluding {patterns})")
    _check_output(output_path, overwrite)
    log.info("merging %d tract files into %s", len(tracts), output_path)
    try:
        return _save_tck(chain.from_iterable(_trk_streamlines(p) for p in tracts), output_path)
    except Exception as exc:
        raise ProcessingError(f"merging the tracts of {source_dir} failed: {exc}") from exc
