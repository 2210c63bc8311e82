"""A named parcellation on disk (:class:`Parcellation`), its listing record, names,
and the instances shared between look-ups."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lacuna.resources.parcellations.images import ParcellationImage, read_parcellation

NAME_PATTERN = re.compile(r"^[A-Za-z0-9]+(_[A-Za-z0-9]+)?$")

# One image is read at a time: a thread that asks for an image another thread is
# reading waits for it instead of reading it a second time.
_LOADING = threading.Lock()


@dataclass(frozen=True)
class Parcellation:
    """A named parcellation on disk.

    Attributes
    ----------
    name : str
        ``<atlas>_<desc>`` or ``<atlas>``.
    image_path : Path
        NIfTI image (3-D labels or 4-D probabilities).
    labels_path : Path or None
        Labels file, or None (regions are then named ``region_<id>``).
    space : str
        Template space as declared (e.g. ``MNI152NLin2009aAsym``).
    citation : str
        Reference to cite when the parcellation is used.
    """

    name: str
    image_path: Path
    labels_path: Path | None
    space: str
    citation: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.labels_path is not None:
            object.__setattr__(self, "labels_path", Path(self.labels_path))

    def __getstate__(self) -> dict:
        # Do not pickle loaded voxel data (parcellations travel to worker processes).
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def atlas(self) -> str:
        """The atlas part of the name (before the first ``_``)."""
        return self.name.split("_", 1)[0]

    @property
    def desc(self) -> str | None:
        """The description part of the name (after the first ``_``), or None."""
        parts = self.name.split("_", 1)
        return parts[1] if len(parts) > 1 else None

    def load(self) -> ParcellationImage:
        """Read image and labels; cached until either file changes on disk (safe to
        call from several threads)."""
        key = (file_stamp(self.image_path), file_stamp(self.labels_path))
        with _LOADING:
            cached = self._cache.get("image")
            if cached is not None and cached[0] == key:
                return cached[1]
            image = read_parcellation(self.name, self.image_path, self.labels_path)
            self._cache["image"] = (key, image)
            return image


@dataclass(frozen=True)
class ParcellationInfo:
    """One line of :func:`list_parcellations`."""

    name: str
    space: str
    source: str  # "registered", "atlas-dir" or "catalogue"
    cached: bool  # available locally without a download
    citation: str = ""


# Parcellations handed out by this module, so that repeated look-ups of the same files
# share one instance and its loaded data (a BIDS App resolves the same name per subject).
_INTERNED: dict[Parcellation, Parcellation] = {}


def intern(parcellation: Parcellation) -> Parcellation:
    """The shared instance equal to ``parcellation`` (``parcellation`` itself when new)."""
    return _INTERNED.setdefault(parcellation, parcellation)


def clear_parcellation_cache() -> None:
    """Forget parcellations loaded so far (frees their voxel data)."""
    _INTERNED.clear()


def file_stamp(path: Path | None) -> tuple | None:
    """What changes when a file changes: path, size and modification time (None: no file)."""
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return (str(path), None)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def validate_name(name: str) -> str:
    """Check a parcellation name: ``<atlas>`` or ``<atlas>_<desc>``, alphanumeric parts.

    Raises
    ------
    ValueError
        If the name cannot become BIDS ``atlas-``/``seg-`` labels.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid parcellation name {name!r}: use letters and digits, optionally one '_' "
            "separating atlas and description (e.g. 'MyAtlas' or 'MyAtlas_200Regions'), "
            "because the parts become BIDS atlas-/seg- labels."
        )
    return name
