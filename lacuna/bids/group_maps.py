"""Participant outputs for group inference: voxel maps stacked once, parcel tables.

* :func:`find_map_sources`: the participant voxel maps group inference uses, by kind
  (the fLNM t map of each functional connectome, ``desc-flnm<Connectome>t``; the sLNM
  disconnection map of each tractogram, ``desc-snm<Tractogram>disconnection``), space
  and resolution;
* :class:`MapStack`: the maps of one source, each read once into float32, kept only at
  the voxels where some map is non-zero (the connectome's mask for fLNM), voxel-major;
* :func:`find_parcel_tables`: the per-parcel tables the GLMs run on (fLNM t tables,
  sLNM fraction of streamlines cut, regional-damage percentages), one row per mask.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lacuna.analysis.group.statistics import TFCEGrid
from lacuna.core.entities import parse_entities
from lacuna.core.errors import BidsError
from lacuna.core.spaces import Grid

_FUNCTIONAL_T = re.compile(r"^flnm[A-Za-z0-9]+t$")
_DISCONNECTION = re.compile(r"^snm[A-Za-z0-9]+disconnection$")
_MAP_SUFFIXES = ("_statmap.nii.gz", "_probseg.nii.gz")

#: Parcel tables analysed: (pattern of the table's desc, measures; None = every measure).
PARCEL_TABLES = (
    (_FUNCTIONAL_T, None),
    (re.compile(r"^snm[A-Za-z0-9]+$"), ("fraction_cut",)),
    (re.compile(r"^regionaldamage$"), ("percent_damaged",)),
)


@dataclass(frozen=True)
class MapSource:
    """One kind of participant map on one grid: ``desc``, space and ``res`` label."""

    desc: str
    space: str
    resolution: str

    @property
    def functional(self) -> bool:
        """fLNM t maps (signed); otherwise sLNM disconnection maps (fractions)."""
        return bool(_FUNCTIONAL_T.match(self.desc))

    @property
    def resolution_mm(self) -> float:
        return float(self.resolution.replace("p", "."))


def find_map_sources(outputs: list[list[Path]]) -> dict[MapSource, dict[int, Path]]:
    """The maps of each source: ``{source: {mask index: path}}``.

    Parameters
    ----------
    outputs : list of list of Path
        The output files of each mask.
    """
    sources: dict[MapSource, dict[int, Path]] = {}
    for index, paths in enumerate(outputs):
        for path in paths:
            if not path.name.endswith(_MAP_SUFFIXES):
                continue
            entities = parse_entities(path.name)
            desc = entities.get("desc", "")
            if _FUNCTIONAL_T.match(desc) or _DISCONNECTION.match(desc):
                source = MapSource(desc, entities.get("space", ""), entities.get("res", ""))
                sources.setdefault(source, {})[index] = path
    return dict(sorted(sources.items(), key=lambda item: (item[0].desc, item[0].space, item[0].resolution)))


@dataclass
class MapStack:
    """The maps of N masks at the voxels where any of them is non-zero.

    ``values`` is ``V x N`` float32 (C order; ``values.T`` is the ``N x V`` maps array
    the statistics take, voxel-major); ``flat_indices`` the C-order index on ``grid``
    of each of the V voxels; ``masks`` the mask index of each column.
    """

    values: np.ndarray
    flat_indices: np.ndarray
    grid: Grid
    masks: list[int]
    _columns: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self):
        self._columns = {mask: column for column, mask in enumerate(self.masks)}

    @classmethod
    def read(cls, paths: dict[int, Path]) -> "MapStack":
        """Read each map once. The voxel set grows as maps add non-zero voxels (maps of
        one connectome share its mask, so for them it never grows after the first)."""
        masks = list(paths)
        first = nib.load(paths[masks[0]])
        grid = Grid.of(first)
        row_of = np.full(int(np.prod(grid.shape)), -1, dtype=np.int64)
        buffer = np.zeros((0, len(masks)), dtype=np.float32)
        found: list[np.ndarray] = []
        count = 0
        for column, mask in enumerate(masks):
            img = first if column == 0 else nib.load(paths[mask])
            if not Grid.of(img).matches(grid):
                raise BidsError(f"{paths[mask]}: grid differs from {paths[masks[0]].name} although both are the same map")
            flat = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged")).ravel(order="C")
            nonzero = np.flatnonzero(flat != 0)  # NaN too: it becomes n/a in the results
            new = nonzero[row_of[nonzero] < 0]
            if new.size:
                if count + new.size > buffer.shape[0]:
                    buffer = _grown(buffer, count + new.size, first_read=column == 0)
                row_of[new] = np.arange(count, count + new.size)
                found.append(new)
                count += new.size
            buffer[row_of[nonzero], column] = flat[nonzero]
        values = buffer[:count] if count < buffer.shape[0] else buffer
        flat_indices = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        return cls(np.ascontiguousarray(values), flat_indices, grid, masks)

    @property
    def maps(self) -> np.ndarray:
        """N x V (the transpose of :attr:`values`)."""
        return self.values.T

    def column_of(self, mask: int) -> int | None:
        """The column of a mask's map (None when the mask has none)."""
        return self._columns.get(mask)

    def volume(self, values: np.ndarray) -> np.ndarray:
        """A float32 volume of the grid: ``values`` at the stack's voxels, 0 elsewhere."""
        volume = np.zeros(int(np.prod(self.grid.shape)), dtype=np.float32)
        volume[self.flat_indices] = values
        return volume.reshape(self.grid.shape)

    def tfce_grid(self) -> TFCEGrid:
        """The stack's voxels and their face neighbours, in the stack's voxel order."""
        return TFCEGrid.from_indices(self.grid.shape, self.flat_indices)


def _grown(buffer: np.ndarray, needed: int, first_read: bool) -> np.ndarray:
    capacity = needed if first_read else max(needed, int(buffer.shape[0] * 1.5))
    grown = np.zeros((capacity, buffer.shape[1]), dtype=np.float32)
    grown[: buffer.shape[0]] = buffer
    return grown


@dataclass(frozen=True)
class ParcelTable:
    """One measure of one participant parcel table, for every mask that has it."""

    parcellation: str
    desc: str
    measure: str
    regions: list[str]
    values: np.ndarray  # masks x regions, float32 (NaN for n/a)
    masks: list[int]
    description: str


def find_parcel_tables(outputs: list[list[Path]]) -> list[ParcelTable]:
    """The parcel tables of :data:`PARCEL_TABLES` assembled over masks (rows in mask
    order; regions in the table's order, as the group tables name them)."""
    collected: dict[tuple[str, str, str], dict] = {}
    for index, paths in enumerate(outputs):
        for path in paths:
            if not path.name.endswith("_parcelstats.tsv"):
                continue
            entities = parse_entities(path.name)
            desc = entities.get("desc", "")
            patterns = [measures for pattern, measures in PARCEL_TABLES if pattern.match(desc)]
            if not patterns:
                continue
            frame = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
            parcellation = "_".join(p for p in (entities.get("atlas"), entities.get("seg")) if p)
            for measure in [c for c in frame.columns if c not in ("index", "name")]:
                if patterns[0] is not None and measure not in patterns[0]:
                    continue
                entry = collected.setdefault(
                    (parcellation, desc, measure),
                    {"regions": _region_names(frame), "rows": [], "masks": [], "description": _description(path, measure)},
                )
                if _region_names(frame) != entry["regions"]:
                    raise BidsError(f"{path}: its regions differ from the other masks' {desc} tables")
                entry["rows"].append(pd.to_numeric(frame[measure], errors="coerce").to_numpy(np.float32))
                entry["masks"].append(index)
    return [
        ParcelTable(parcellation, desc, measure, entry["regions"], np.stack(entry["rows"]), entry["masks"], entry["description"])
        for (parcellation, desc, measure), entry in sorted(collected.items())
    ]


def _region_names(frame: pd.DataFrame) -> list[str]:
    """Region names (duplicated names get their index appended, as the group tables)."""
    names = frame["name"].astype(str).tolist()
    if len(set(names)) == len(names):
        return names
    return [f"{name}_{index}" for name, index in zip(names, frame["index"].tolist())]


def _description(path: Path, measure: str) -> str:
    try:
        sidecar = json.loads(path.with_name(path.name.removesuffix(".tsv") + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return measure
    return str(sidecar.get(measure, {}).get("Description") or measure)


def lesion_volume_mm3(outputs: list[Path]) -> float | None:
    """A mask's lesion volume (mm^3): RegionalDamage's ``lesion_volume_mm3`` when it ran,
    else the non-zero voxels of the output mask times the voxel volume."""
    for path in outputs:
        if path.name.endswith("_scalars.json"):
            try:
                value = json.loads(path.read_text(encoding="utf-8"))["RegionalDamage"]["lesion_volume_mm3"]["Value"]
                return float(value)
            except (OSError, ValueError, KeyError, TypeError):
                pass
    for path in outputs:
        if path.name.endswith(("_mask.nii.gz", "_mask.nii")):
            img = nib.load(path)
            return float(np.count_nonzero(np.asanyarray(img.dataobj))) * Grid.of(img).voxel_volume_mm3
    return None
