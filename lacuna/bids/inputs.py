"""BIDS input: finding lesion masks in a dataset and loading them."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from pathlib import Path

from lacuna.bids.layout import SKIPPED_FOLDERS, inherited_metadata, walk_dataset  # noqa: F401 (SKIPPED_FOLDERS: public here before)
from lacuna.core.entities import parse_entities
from lacuna.core.errors import BidsError, LacunaError
from lacuna.core.spaces import ACCEPTED_SPACES
from lacuna.core.subject import SubjectData

log = logging.getLogger(__name__)


def find_mask_files(
    bids_root: str | Path,
    pattern: str = "*",
    suffix: str = "_mask.nii.gz",
    recursive: bool = True,
    subjects: Iterable[str] | None = None,
    exclude: Iterable[str | Path] = (),
) -> list[Path]:
    """Mask files below ``bids_root``, sorted, without loading them.

    Parameters
    ----------
    bids_root : str or Path
        Dataset root or any folder below it.
    pattern : str
        fnmatch glob matched anywhere in the file name without ``suffix``
        (``"CAS001"`` behaves like ``"*CAS001*"``).
    suffix : str
        File-name ending of the masks.
    recursive : bool
        Search sub-folders.
    subjects : iterable of str, optional
        Subject labels (``sub-`` optional) to keep.
    exclude : iterable of path
        Folders to skip in addition to ``derivatives/``, ``sourcedata/``, ``code/``,
        nested datasets (any folder with its own ``dataset_description.json``, such as
        an earlier output folder) and what the dataset's ``.bidsignore`` lists (e.g. the
        output and work folders when they sit inside the dataset).

    Raises
    ------
    FileNotFoundError
        If ``bids_root`` does not exist.
    """
    root = Path(bids_root)
    if not root.exists():
        raise FileNotFoundError(f"BIDS folder not found: {root}")
    wanted = {s.removeprefix("sub-") for s in subjects} if subjects else None
    glob = f"*{pattern}*" if pattern not in ("", "*") else "*"
    files = walk_dataset(root, exclude) if recursive else (p for p in sorted(root.iterdir()) if p.is_file())
    found = []
    for path in files:
        filename = path.name
        if not filename.endswith(suffix) or filename.startswith("."):
            continue
        if not fnmatch.fnmatchcase(filename[: -len(suffix)], glob):
            continue
        if wanted is not None and parse_entities(filename).get("sub") not in wanted:
            continue
        found.append(path)
    return sorted(found)


def declared_space(path: Path, root: str | Path | None = None) -> str | None:
    """The space a mask's name or sidecars declare: its ``space-`` entity, else the
    ``SpatialReference`` (or ``Space``) of its sidecars, None when neither says.

    The sidecars follow the BIDS inheritance principle: a dataset-level
    ``label-lesion_mask.json`` with ``"SpatialReference"`` applies to every
    ``*_label-lesion_mask.nii.gz`` below it, unless a more specific sidecar says
    otherwise. ``root`` is the dataset root (default: the nearest folder above the mask
    with a ``dataset_description.json``).

    Raises
    ------
    ValueError
        If an applicable sidecar is not valid JSON (the message names it).
    """
    entity = parse_entities(path.name).get("space")
    if entity:
        return entity
    sidecar = inherited_metadata(path, root)
    found = sidecar.get("SpatialReference") or sidecar.get("Space")
    return found if isinstance(found, str) else None


def detect_space(path: Path, space: str | None = None, root: str | Path | None = None) -> str | None:
    """Declared space of a mask: ``space`` when given, else :func:`declared_space`
    (None also when a sidecar is unreadable: the file is then skipped by the caller)."""
    if space:
        return space
    try:
        return declared_space(path, root)
    except (OSError, ValueError):
        return None


def load_bids_dataset(
    bids_root: str | Path,
    pattern: str = "*",
    suffix: str = "_mask.nii.gz",
    recursive: bool = True,
    space: str | None = None,
    resolution: float | None = None,
    subjects: list[str] | None = None,
) -> dict[str, SubjectData]:
    """Load lesion masks from a BIDS dataset using pattern matching (no pybids needed).

    Parameters
    ----------
    bids_root : str or Path
        Dataset root or any folder below it (e.g. one subject's ``anat/``).
    pattern : str
        fnmatch glob matched anywhere in the file name without the suffix:
        ``"CAS001"`` selects subject CAS001, ``"CAS001*ses-01*acuteinfarct"`` one
        subject, session and label, ``"*"`` everything.
    suffix : str
        File-name ending of the masks (``"_mask.nii.gz"``, ``"_mask.nii"``, ``".nii.gz"``).
    recursive : bool
        Search sub-folders.
    space : str, optional
        Space of all masks; else each file's ``space-`` entity, else its JSON sidecar.
        Files whose space is unknown or unsupported are skipped with a warning.
    resolution : float, optional
        Resolution in mm; else the ``res-`` entity, else the sidecar (the image header
        wins when they disagree).
    subjects : list of str, optional
        Subject IDs (without ``sub-``) to load; filtered before loading.

    Returns
    -------
    dict of str to SubjectData
        Keyed by file name without the suffix.

    Raises
    ------
    FileNotFoundError
        If ``bids_root`` does not exist.
    BidsError
        If no file matches.
    """
    paths = find_mask_files(bids_root, pattern, suffix, recursive, subjects)
    if not paths:
        raise BidsError(
            f"no files ending in {suffix!r} matching {pattern!r} under {bids_root}"
            + (f" for subjects {subjects}" if subjects else "")
        )
    dataset: dict[str, SubjectData] = {}
    for path in paths:
        declared = detect_space(path, space)
        if declared is None:
            log.warning("skipping %s: no space declared (space- entity, sidecar or argument)", path)
            continue
        if declared not in ACCEPTED_SPACES:
            log.warning(
                "skipping %s: space %s is not supported (supported: %s)",
                path,
                declared,
                ", ".join(ACCEPTED_SPACES),
            )
            continue
        try:
            subject = SubjectData.from_nifti(path, space=declared, resolution=resolution)
        except LacunaError as exc:
            log.warning("skipping %s", exc)
            continue
        subject.metadata["bids_relpath"] = _relative_to_dataset(path, bids_root)
        dataset[path.name[: -len(suffix)]] = subject
    if not dataset:
        raise BidsError(f"no usable mask among the {len(paths)} matching files under {bids_root}")
    return dataset


def _relative_to_dataset(path: Path, root: str | Path) -> str:
    root = Path(root).resolve()
    while root != root.parent and not (root / "dataset_description.json").is_file():
        root = root.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return path.name
