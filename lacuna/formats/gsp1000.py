"""GSP1000 functional NIfTIs to Lacuna's HDF5 connectome layout.

:func:`gsp1000_to_hdf5` writes self-contained batch files (layout in
:mod:`lacuna.formats.functional_connectome`), one subject in memory at a time; every
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.core.spaces import SUPPORTED_SPACES, Grid, identify_standard_grid
from lacuna.formats.functional_connectome import ConnectomeWriter

log = logging.getLogger(__name__)

#: The functional images of the GSP1000 release, relative to its root.
GSP_PATTERN = "sub-*/func/*bld001_rest_*_finalmask.nii.gz"


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
