"""Parcellations in an atlas folder of TemplateFlow-style files (:func:`scan_atlas_dir`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lacuna.core.entities import parse_entities, strip_extension
from lacuna.core.errors import ParcellationError
from lacuna.resources.parcellations.parcellation import NAME_PATTERN, Parcellation, intern

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("dseg", "probseg")
LABEL_EXTENSIONS = (".tsv", ".txt")


def scan_atlas_dir(path: str | Path) -> dict[str, Parcellation]:
    """Parcellations in a folder of TemplateFlow-style files, by name.

    Files ``tpl-<space>[_res-<NN>]_atlas-<atlas>[_desc-<desc>]_<dseg|probseg>.nii[.gz]``
    become parcellation ``<atlas>_<desc>`` (or ``<atlas>``) in space ``<space>``; their
    labels file has the same stem (with or without the ``res-`` entity) and ends ``.tsv``
    or ``.txt``. When two files give the same name, the first in sorted order is used.

    Raises
    ------
    ParcellationError
        If ``path`` is not a directory.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ParcellationError(
            f"atlas folder {folder} does not exist or is not a directory; check the path."
        )
    found: dict[str, Parcellation] = {}
    for image in sorted(folder.iterdir()):
        parcellation = _atlas_file_parcellation(image)
        if parcellation is None:
            continue
        if parcellation.name in found:
            log.warning(
                "%s: parcellation %s is already given by %s; ignoring this file",
                image,
                parcellation.name,
                found[parcellation.name].image_path.name,
            )
            continue
        found[parcellation.name] = parcellation
    return found


def _atlas_file_parcellation(image: Path) -> Parcellation | None:
    """The parcellation a TemplateFlow-style file name describes, or None."""
    if not image.name.startswith("tpl-") or not image.name.endswith((".nii", ".nii.gz")):
        return None
    entities = parse_entities(image.name)
    if entities.get("suffix") not in IMAGE_SUFFIXES or "atlas" not in entities:
        return None
    name = entities["atlas"] + (f"_{entities['desc']}" if "desc" in entities else "")
    if not NAME_PATTERN.match(name):
        log.warning("%s: atlas/desc labels must be alphanumeric; ignoring this file", image)
        return None
    return intern(
        Parcellation(
            name=name,
            image_path=image.resolve(),
            labels_path=_find_labels(image),
            space=entities["tpl"],
        )
    )


def _find_labels(image: Path) -> Path | None:
    stem = strip_extension(image.name)
    stems = [stem, re.sub(r"_res-[A-Za-z0-9]+", "", stem)]
    for candidate_stem in dict.fromkeys(stems):
        for ext in LABEL_EXTENSIONS:
            candidate = image.with_name(candidate_stem + ext)
            if candidate.is_file():
                return candidate.resolve()
    return None
