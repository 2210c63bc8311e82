"""Resolving a parcellation by name: registered, then an atlas folder, then the catalogue."""

from __future__ import annotations

import difflib
from pathlib import Path

from lacuna.core.errors import ParcellationError, SpaceError
from lacuna.core.spaces import canonical_space
from lacuna.resources.parcellations.catalogue import CATALOGUE
from lacuna.resources.parcellations.downloads import cached_catalogue, fetch_parcellation
from lacuna.resources.parcellations.folders import scan_atlas_dir
from lacuna.resources.parcellations.parcellation import Parcellation, ParcellationInfo
from lacuna.resources.parcellations.registrations import registered_parcellations


def get_parcellation(name: str, atlas_dir: str | Path | None = None) -> Parcellation:
    """The parcellation called ``name``: registered, in ``atlas_dir``, or catalogue.

    Catalogue parcellations are downloaded on first use (see :func:`fetch_parcellation`).

    Raises
    ------
    ParcellationError
        If no source has the name (the message lists the available ones), its files are
        missing, or the download fails.
    SpaceError
        If an atlas-folder file declares an unsupported space.
    """
    registered = registered_parcellations()
    if name in registered:
        return _checked_registered(registered[name])
    in_dir = scan_atlas_dir(atlas_dir) if atlas_dir is not None else {}
    if name in in_dir:
        return _checked_space(in_dir[name])
    if name in CATALOGUE:
        return fetch_parcellation(CATALOGUE[name])
    available = sorted(set(registered) | set(in_dir) | set(CATALOGUE))
    close = difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ParcellationError(
        f"unknown parcellation {name!r}.{hint} Available: {', '.join(available)}. To use "
        "your own, register it with lacuna.resources.parcellations.register_parcellation(name, "
        "image, labels, space=...) or put TemplateFlow-style files "
        "(tpl-<space>_atlas-<atlas>_desc-<desc>_dseg.nii.gz plus a .tsv/.txt labels file) "
        "in an atlas folder."
    )


def _checked_registered(parcellation: Parcellation) -> Parcellation:
    for path in (parcellation.image_path, parcellation.labels_path):
        if path is not None and not path.is_file():
            raise ParcellationError(
                f"registered parcellation {parcellation.name} points to {path}, which no "
                "longer exists. Restore the file, register it again with overwrite=True, "
                f"or remove it with unregister_parcellation({parcellation.name!r})."
            )
    return parcellation


def _checked_space(parcellation: Parcellation) -> Parcellation:
    try:
        canonical_space(parcellation.space)
    except SpaceError as exc:
        raise SpaceError(
            f"{parcellation.image_path}: {exc}. Use a file in a supported space, or correct "
            "its tpl-<space> entity if it is wrong."
        ) from exc
    return parcellation


def list_parcellations(atlas_dir: str | Path | None = None) -> list[ParcellationInfo]:
    """Every parcellation :func:`get_parcellation` can resolve, one per name.

    Registered ones come first, then those of ``atlas_dir``, then the catalogue; a name
    given by an earlier source hides the later ones, as in :func:`get_parcellation`.
    """
    infos: dict[str, ParcellationInfo] = {}
    for parcellation in registered_parcellations().values():
        infos[parcellation.name] = ParcellationInfo(
            parcellation.name, parcellation.space, "registered", True, parcellation.citation
        )
    if atlas_dir is not None:
        for parcellation in scan_atlas_dir(atlas_dir).values():
            infos.setdefault(
                parcellation.name,
                ParcellationInfo(parcellation.name, parcellation.space, "atlas-dir", True),
            )
    for entry in CATALOGUE.values():
        cached = cached_catalogue(entry) is not None
        infos.setdefault(
            entry.name,
            ParcellationInfo(entry.name, entry.space, "catalogue", cached, entry.citation),
        )
    return list(infos.values())
