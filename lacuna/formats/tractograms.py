"""TrackVis tractograms to MRtrix3 ``.tck``, streamed with ``nibabel.streamlines``.

Coordinates stay RAS+ millimetres; every output is written under a temporary name and
renamed when complete.
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
from lacuna.core.spaces import Grid, space_of_standard_grid

log = logging.getLogger(__name__)

#: Path fragments (case-insensitive) of cranial-nerve tracts, left out of merged atlases.
CRANIAL_NERVE_PATTERNS = ("cranial", "cnii", "cniii", "cnv", "cnvii", "cnviii")


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
