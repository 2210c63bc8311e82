"""Parcellations the user registered, persisted in ``<data dir>/parcellations.json``."""

from __future__ import annotations

import logging
from pathlib import Path

from lacuna.core.entities import parse_entities
from lacuna.core.errors import ParcellationError
from lacuna.core.provenance import utc_now
from lacuna.core.spaces import EQUIVALENT_SPACES, SUPPORTED_SPACES, canonical_space
from lacuna.resources.parcellations.catalogue import CATALOGUE
from lacuna.resources.parcellations.parcellation import Parcellation, intern, validate_name
from lacuna.resources.registry import JsonRegistry

log = logging.getLogger(__name__)

#: File, in the data directory, that holds the user's registered parcellations.
REGISTRY_FILENAME = "parcellations.json"

_REGISTRY_VERSION = 1


_REGISTRY = JsonRegistry(REGISTRY_FILENAME, "parcellations", ParcellationError, version=_REGISTRY_VERSION)


def registry_path() -> Path:
    """The JSON file holding registered parcellations."""
    return _REGISTRY.path


def registered_parcellations() -> dict[str, Parcellation]:
    """Parcellations registered by the user, by name (read from disk on every call)."""
    path = registry_path()
    entries = _REGISTRY.read()
    return {name: _from_entry(path, name, entry) for name, entry in sorted(entries.items())}


def _from_entry(path: Path, name: str, entry: dict) -> Parcellation:
    try:
        labels = entry.get("labels_path")
        return intern(
            Parcellation(
                name=name,
                image_path=JsonRegistry.resolve_path(entry["image_path"]),
                labels_path=JsonRegistry.resolve_path(labels) if labels else None,
                space=entry["space"],
                citation=entry.get("citation", ""),
            )
        )
    except (AttributeError, KeyError, TypeError) as exc:
        raise ParcellationError(
            f"the parcellation registry {path} has a malformed entry {name!r}; remove it "
            f"with unregister_parcellation({name!r}) or repair the JSON, then register again."
        ) from exc


def register_parcellation(
    name: str,
    image_path: str | Path,
    labels_path: str | Path | None = None,
    space: str | None = None,
    citation: str = "",
    overwrite: bool = False,
) -> Parcellation:
    """Register a parcellation from local files under ``name``, persistently.

    Parameters
    ----------
    name : str
        ``<atlas>`` or ``<atlas>_<desc>``; letters and digits only in each part.
    image_path : str or Path
        3-D label image or 4-D probability image.
    labels_path : str or Path, optional
        Labels file; regions are named ``region_<id>`` without one.
    space : str, optional
        Template space of the image (a supported space or an equivalent one). Taken from
        a ``tpl-``/``space-`` entity of the image file name when omitted.
    citation : str
        Reference to cite.
    overwrite : bool
        Replace an existing registration, or shadow a catalogue parcellation, of the
        same name.

    Returns
    -------
    Parcellation
        The registered parcellation (with absolute paths).

    Raises
    ------
    ValueError
        If the name is invalid or the space is missing.
    SpaceError
        If the space is not supported.
    ParcellationError
        If the files are not a valid parcellation, or the name is taken.
    """
    validate_name(name)
    image_path = Path(image_path).expanduser().resolve()
    labels_path = Path(labels_path).expanduser().resolve() if labels_path else None
    space = space or _space_from_file_name(image_path)
    canonical_space(space)
    if labels_path is not None and not labels_path.is_file():
        raise ParcellationError(f"labels file {labels_path} does not exist; check the path.")
    parcellation = Parcellation(name, image_path, labels_path, space, citation)
    parcellation.load()  # validates image and labels
    with _REGISTRY.editing() as entries:
        if not overwrite:
            _refuse_shadowing(name, entries)
        entries[name] = {
            "image_path": JsonRegistry.store_path(image_path),
            "labels_path": JsonRegistry.store_path(labels_path) if labels_path else None,
            "space": space,
            "citation": citation,
            "registered": utc_now(),
        }
    log.info("registered parcellation %s (%s)", name, image_path)
    return parcellation


def _space_from_file_name(image_path: Path) -> str:
    entities = parse_entities(image_path.name)
    space = entities.get("tpl") or entities.get("space")
    if not space:
        options = ", ".join((*SUPPORTED_SPACES, *EQUIVALENT_SPACES))
        raise ValueError(
            f"the space of {image_path} is unknown: pass space= (one of {options}) or name "
            "the file with a tpl-<space> entity."
        )
    return space


def _refuse_shadowing(name: str, entries: dict[str, dict]) -> None:
    if name in entries:
        raise ParcellationError(
            f"a parcellation named {name} is already registered "
            f"({entries[name].get('image_path')}); pass overwrite=True to replace it, or "
            "choose another name."
        )
    if name in CATALOGUE:
        raise ParcellationError(
            f"{name} is a standard parcellation of the catalogue; registering your own "
            "files under that name would replace it everywhere. Choose another name, or "
            "pass overwrite=True if that is what you want."
        )


def unregister_parcellation(name: str) -> None:
    """Remove a registered parcellation (its files are left alone).

    Raises
    ------
    ParcellationError
        If no parcellation of that name is registered.
    """
    with _REGISTRY.editing() as entries:
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise ParcellationError(
                f"no parcellation named {name!r} is registered (registered: {known})."
            )
        del entries[name]
    log.info("unregistered parcellation %s", name)
