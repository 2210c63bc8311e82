"""The connectome registry: normative connectomes registered once, used by name.

Registrations persist in ``<data dir>/connectomes.json`` (see
:mod:`lacuna.resources.registry`), with space and resolution stored explicitly, never
guessed from a path. Paths inside the data directory are stored relative to it, so a
cache mounted elsewhere (``-v /host/cache:/cache`` with ``LACUNA_DATA_DIR=/cache``)
still resolves.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lacuna.core.errors import ReferenceDataError
from lacuna.core.provenance import utc_now
from lacuna.core.spaces import canonical_space
from lacuna.resources.registry import JsonRegistry

log = logging.getLogger(__name__)

FUNCTIONAL = "functional"
STRUCTURAL = "structural"
_NAME = re.compile(r"^[A-Za-z0-9]+$")


class ConnectomeError(ReferenceDataError):
    """A connectome cannot be registered, found or read."""


_REGISTRY = JsonRegistry("connectomes.json", "connectomes", ConnectomeError)


@dataclass(frozen=True)
class RegisteredConnectome:
    """A registered connectome.

    Attributes
    ----------
    name : str
        Registry name (letters and digits; used in output file names).
    kind : str
        ``"functional"`` (HDF5 timeseries) or ``"structural"`` (tractogram).
    path : Path
        HDF5 file or folder of batch files, or tractogram file.
    space : str
        Template space.
    resolution : float or None
        Voxel size in mm (functional connectomes).
    n_subjects : int or None
        Number of subjects, when known.
    description, citation : str
        Free text.
    """

    name: str
    kind: str
    path: Path
    space: str
    resolution: float | None = None
    n_subjects: int | None = None
    description: str = ""
    citation: str = ""


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid connectome name {name!r}: use letters and digits only (e.g. GSP1000), "
            "because the name becomes part of BIDS file names"
        )
    return name


def _register(connectome: RegisteredConnectome, overwrite: bool) -> RegisteredConnectome:
    with _REGISTRY.editing() as entries:
        if connectome.name in entries and not overwrite:
            raise ConnectomeError(
                f"a connectome named {connectome.name} is already registered "
                f"({entries[connectome.name].get('path')}); pass overwrite=True (--force) to replace it"
            )
        entry = asdict(connectome)
        entry["path"] = JsonRegistry.store_path(connectome.path)
        entry["registered"] = utc_now()
        entries[connectome.name] = entry
    log.info("registered %s connectome %s (%s)", connectome.kind, connectome.name, connectome.path)
    return connectome


def register_functional_connectome(
    name: str,
    path: str | Path,
    space: str,
    resolution: float,
    n_subjects: int | None = None,
    description: str = "",
    citation: str = "",
    overwrite: bool = False,
) -> RegisteredConnectome:
    """Register an HDF5 functional connectome (file or folder of batch files).

    The files are opened and checked; their ``space``/``resolution`` attributes must
    agree with the arguments, and ``n_subjects`` (when given) with the data.

    Raises
    ------
    ValueError
        If the name is invalid.
    ConnectomeError
        If the files disagree with the declared metadata, or the name is taken.
    """
    from lacuna.formats.functional_connectome import FunctionalConnectome  # h5py: only when needed

    _validate_name(name)
    path = Path(path).expanduser().resolve()
    space = canonical_space(space)
    opened = FunctionalConnectome.open(path, name=name)
    if canonical_space(opened.space) != space or float(opened.resolution) != float(resolution):
        raise ConnectomeError(
            f"{path} holds {opened.space} at {opened.resolution:g} mm, not the declared "
            f"{space} at {float(resolution):g} mm; fix the declaration"
        )
    if n_subjects is not None and n_subjects != opened.n_subjects:
        raise ConnectomeError(f"{path} holds {opened.n_subjects} subjects, not the declared {n_subjects}")
    connectome = RegisteredConnectome(
        name, FUNCTIONAL, path, space, float(resolution), opened.n_subjects, description, citation
    )
    return _register(connectome, overwrite)


def register_structural_connectome(
    name: str,
    tractogram_path: str | Path,
    space: str,
    n_subjects: int | None = None,
    description: str = "",
    citation: str = "",
    overwrite: bool = False,
) -> RegisteredConnectome:
    """Register a whole-brain tractogram (``.tck``/``.trk``) for structural mapping.

    Raises
    ------
    ValueError
        If the name is invalid or the file is not a tractogram.
    FileNotFoundError
        If the file does not exist.
    ConnectomeError
        If the name is taken.
    """
    _validate_name(name)
    path = Path(tractogram_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"tractogram not found: {path}")
    if path.suffix not in (".tck", ".trk"):
        raise ValueError(f"{path}: a tractogram must be a .tck or .trk file")
    space = canonical_space(space)
    connectome = RegisteredConnectome(name, STRUCTURAL, path, space, None, n_subjects, description, citation)
    return _register(connectome, overwrite)


def list_connectomes(kind: str | None = None) -> list[RegisteredConnectome]:
    """Registered connectomes (optionally of one kind), by name."""
    found = [_from_entry(name, entry) for name, entry in sorted(_REGISTRY.read().items())]
    return [c for c in found if kind is None or c.kind == kind]


def get_registered_connectome(name: str) -> RegisteredConnectome:
    """The registered connectome called ``name``.

    Raises
    ------
    ConnectomeError
        If none is registered under that name (the message lists those that are).
    """
    entries = _REGISTRY.read()
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise ConnectomeError(
            f"no connectome named {name!r} is registered (registered: {known}); fetch one "
            "with `lacuna fetch`, or register your own with `lacuna connectomes register`"
        )
    return _from_entry(name, entries[name])


def unregister_connectome(name: str) -> None:
    """Remove a registration (the files are left alone)."""
    with _REGISTRY.editing() as entries:
        if name not in entries:
            raise ConnectomeError(f"no connectome named {name!r} is registered")
        del entries[name]


def _from_entry(name: str, entry: dict) -> RegisteredConnectome:
    try:
        return RegisteredConnectome(
            name=name,
            kind=entry["kind"],
            path=JsonRegistry.resolve_path(entry["path"]),
            space=entry["space"],
            resolution=entry.get("resolution"),
            n_subjects=entry.get("n_subjects"),
            description=entry.get("description", ""),
            citation=entry.get("citation", ""),
        )
    except (KeyError, TypeError) as exc:
        raise ConnectomeError(
            f"the connectome registry {_REGISTRY.path} has a malformed entry {name!r}; "
            "unregister it and register again"
        ) from exc


def resolve_connectome(name_or_path: str | Path, kind: str) -> tuple[str, Path]:
    """Name and path of a registered connectome, or of a path given directly.

    Raises
    ------
    ConnectomeError
        If a registered name is of the wrong kind, or it is neither a registered name
        nor an existing path.
    """
    text = str(name_or_path)
    if text in _REGISTRY.read():
        registered = get_registered_connectome(text)
        if registered.kind != kind:
            raise ConnectomeError(f"{text} is a {registered.kind} connectome, not a {kind} one")
        return registered.name, registered.path
    path = Path(text).expanduser()
    if path.exists():
        return re.sub(r"[^A-Za-z0-9]", "", path.stem if path.is_file() else path.name) or "connectome", path.resolve()
    known = ", ".join(c.name for c in list_connectomes(kind)) or "none"
    raise ConnectomeError(
        f"{text!r} is neither a registered {kind} connectome (registered: {known}) nor an "
        "existing path; check the name or path, or register it with `lacuna connectomes register`"
    )


def get_connectome_path(name_or_path: str | Path) -> Path:
    """Resolve a registered connectome name or a path to its location.

    Parameters
    ----------
    name_or_path : str or Path
        A registered name (e.g. ``"GSP1000"``) or a path to an ``.h5`` file, a folder of
        batch files, or a tractogram.

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        If the connectome cannot be resolved.
    """
    text = str(name_or_path)
    entries = _REGISTRY.read()
    if text in entries:
        path = _from_entry(text, entries[text]).path
        if not path.exists():
            raise FileNotFoundError(
                f"connectome {text} is registered at {path}, which does not exist (is the data "
                "directory mounted?)"
            )
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    raise FileNotFoundError(f"{text!r} is neither a registered connectome nor an existing path")
