"""BIDS file-name entities: parsing ``key-value`` pairs out of a file name."""

from __future__ import annotations

import json
import re
from pathlib import Path

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def strip_extension(name: str) -> str:
    """File name without a NIfTI/JSON/TSV extension."""
    for ext in (*_NIFTI_EXTENSIONS, ".json", ".tsv"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def parse_entities(filename: str | Path) -> dict[str, str]:
    """Entities of a BIDS file name, in order, plus its suffix under ``"suffix"``.

    ``sub-01_ses-02_space-MNI152NLin6Asym_label-lesion_mask.nii.gz`` gives
    ``{"sub": "01", "ses": "02", "space": "MNI152NLin6Asym", "label": "lesion",
    "suffix": "mask"}``.
    """
    parts = strip_extension(Path(filename).name).split("_")
    entities: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("-")
        if sep and key and value:
            entities[key] = value
        elif part:
            entities["suffix"] = part
    return entities


def mask_label(entities: dict[str, str]) -> str | None:
    """The label of a lesion mask from its entities: ``label-``, else ``desc-`` (as
    ATLAS v2.0 and older datasets name masks ``desc-lesion_mask``), else None."""
    return entities.get("label") or entities.get("desc")


def alphanumeric(text: str) -> str:
    """``text`` with everything but letters and digits removed (for BIDS labels)."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def sidecar_path(image_path: str | Path) -> Path:
    """The JSON sidecar that belongs to an image."""
    image_path = Path(image_path)
    return image_path.with_name(strip_extension(image_path.name) + ".json")


def read_sidecar(image_path: str | Path) -> dict:
    """Contents of an image's JSON sidecar, or ``{}`` when there is none."""
    path = sidecar_path(image_path)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


_RES_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+)")


def parse_resolution(value) -> float | None:
    """Resolution in mm from a ``res-`` label (``2``, ``02``) or a sidecar value.

    Sidecar values may be numbers, strings such as ``"2 mm isotropic"``, or lists of
    voxel sizes. Returns None when nothing numeric is found.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)) and value:
        return parse_resolution(value[0])
    if isinstance(value, dict) and len(value) == 1:
        return parse_resolution(next(iter(value.values())))
    match = _RES_NUMBER.match(str(value))
    return float(match.group(1)) if match else None
