"""What belongs to a BIDS dataset: which files to look at, and their inherited metadata.

A small indexer of our own rather than pybids or ancpbids: Lacuna needs three rules of
the specification (the input's ``.bidsignore``, nested datasets are not part of the
dataset, the inheritance principle for JSON sidecars) on folders of a few thousand
masks, and a walk of the folder tree with these rules costs milliseconds without
indexing every file of the dataset or adding a dependency.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lacuna.core.entities import parse_entities

#: Folders never searched for input masks: outputs and other non-raw data.
SKIPPED_FOLDERS = frozenset({"derivatives", "sourcedata", "code", ".git", ".datalad"})
DESCRIPTION = "dataset_description.json"


@dataclass(frozen=True)
class BidsIgnore:
    """The patterns of a dataset's ``.bidsignore`` (gitignore syntax, without ``!``)."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, root: str | Path) -> "BidsIgnore":
        """The ``.bidsignore`` at ``root`` (no patterns when there is none)."""
        try:
            text = (Path(root) / ".bidsignore").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return cls()
        lines = (line.strip() for line in text.splitlines())
        return cls(tuple(line for line in lines if line and not line.startswith(("#", "!"))))

    def ignores(self, relative: str, is_dir: bool = False) -> bool:
        """Whether the path (relative to the root, ``/``-separated) is ignored."""
        name = relative.rsplit("/", 1)[-1]
        for pattern in self.patterns:
            if pattern.endswith("/") and not is_dir:
                continue
            body = pattern.rstrip("/")
            if "/" in body:  # anchored at the dataset root
                if fnmatch.fnmatchcase(relative, body.lstrip("/").replace("**/", "*")):
                    return True
            elif fnmatch.fnmatchcase(name, body):
                return True
        return False


def is_nested_dataset(folder: Path) -> bool:
    """Whether ``folder`` is a dataset of its own (a derivatives or output folder of an
    earlier run kept inside the dataset, whatever its name)."""
    return (folder / DESCRIPTION).is_file()


def walk_dataset(root: str | Path, exclude: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Files of the dataset at ``root``, in sorted order.

    Skips hidden files, :data:`SKIPPED_FOLDERS`, nested datasets, what the dataset's
    ``.bidsignore`` lists, and the folders in ``exclude`` (the output and work folders).
    """
    root = Path(root)
    excluded = {Path(p).resolve() for p in exclude}
    ignore = BidsIgnore.of(root)
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        prefix = here.relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIPPED_FOLDERS
            and not d.startswith(".")
            and not ignore.ignores(prefix + d, is_dir=True)
            and (here / d).resolve() not in excluded
            and not is_nested_dataset(here / d)
        )
        for filename in sorted(filenames):
            if not filename.startswith(".") and not ignore.ignores(prefix + filename):
                yield here / filename


def dataset_root(path: Path, stop: Path | None = None) -> Path | None:
    """The nearest folder at or above ``path`` with a ``dataset_description.json``."""
    for folder in (path, *path.parents):
        if (folder / DESCRIPTION).is_file():
            return folder
        if stop is not None and folder == stop:
            return None
    return None


def applicable_sidecars(path: Path, root: Path) -> list[Path]:
    """JSON files that apply to ``path`` by the inheritance principle, least specific first.

    A JSON file applies when it lies in the file's folder or a folder above it (up to
    ``root``), has the same suffix, and each of its entities is one of the file's with
    the same value. Deeper files come later; in one folder, files with more entities.
    """
    target = parse_entities(path.name)
    suffix = target.pop("suffix", None)
    folders = [path.parent, *path.parent.parents]
    folders = folders[: folders.index(root) + 1] if root in folders else [path.parent]
    found: list[tuple[int, int, Path]] = []
    for depth, folder in enumerate(reversed(folders)):
        for candidate in folder.glob(f"*{suffix}.json") if suffix else ():
            entities = parse_entities(candidate.name)
            if entities.pop("suffix", None) != suffix:
                continue
            if all(target.get(key) == value for key, value in entities.items()):
                found.append((depth, len(entities), candidate))
    return [candidate for _, _, candidate in sorted(found)]


def inherited_metadata(path: str | Path, root: str | Path | None = None) -> dict:
    """The metadata of a data file: its applicable JSON sidecars merged, the most
    specific last (BIDS inheritance principle).

    Parameters
    ----------
    path : str or Path
        Data file, e.g. a lesion mask.
    root : str or Path, optional
        Dataset root; else the nearest folder above ``path`` with a
        ``dataset_description.json`` (else only the file's own folder is read).

    Raises
    ------
    ValueError
        If an applicable sidecar is not valid JSON (the message names it).
    """
    path = Path(path).resolve()
    root = Path(root).resolve() if root is not None else (dataset_root(path.parent) or path.parent)
    merged: dict = {}
    for sidecar in applicable_sidecars(path, root):
        try:
            document = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{sidecar}: not a valid JSON sidecar ({exc})") from exc
        if isinstance(document, dict):
            merged.update(document)
    return merged


def _doi_uri(value: str) -> str:
    """A DOI as BIDS writes it in ``SourceDatasets``: ``doi:<prefix>/<suffix>``."""
    value = value.strip()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "doi:"):
        if value.lower().startswith(prefix):
            value = value[len(prefix):]
            break
    return f"doi:{value}"


def source_dataset_entry(folder: str | Path) -> dict:
    """The ``SourceDatasets`` entry of an input dataset: its URL, and the ``DOI``
    (from ``DatasetDOI``) and ``License`` its ``dataset_description.json`` declares."""
    folder = Path(folder).resolve()
    entry: dict = {"URL": folder.as_uri()}
    try:
        description = json.loads((folder / DESCRIPTION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return entry
    if not isinstance(description, dict):
        return entry
    doi = description.get("DatasetDOI")
    if isinstance(doi, str) and doi.strip():
        entry["DOI"] = _doi_uri(doi)
    license_ = description.get("License")
    if isinstance(license_, str) and license_.strip():
        entry["License"] = license_.strip()
    return entry
