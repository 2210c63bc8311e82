"""Typed analysis results, each knowing how it is written to disk.

* :class:`VoxelMap` — a 3-D map on a voxel grid (NIfTI + JSON sidecar).
* :class:`ParcelData` — one measure per region of a parcellation (a TSV column).
* :class:`ConnectivityMatrix` — region x region values (TSV + sidecar).
* :class:`ScalarMetric` — one number (collected into a JSON file).

File *names* are built in :mod:`lacuna.bids.names`; this module only knows contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from lacuna.core.nifti_files import float_map_bytes, float_map_image
from lacuna.core.spaces import Grid

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class VoxelMap:
    """A voxel-wise map in a template space.

    Attributes
    ----------
    name : str
        Result name, e.g. ``"t"``; also the alphanumeric part of the file's ``desc``.
    data : ndarray, 3-D
        Values on the grid given by ``affine``.
    affine : ndarray (4, 4)
        Voxel-to-mm affine.
    space : str
        Template space of the grid.
    resolution : float
        Voxel size in mm.
    description : str
        What the values mean (goes into the sidecar).
    units : str
        Units of the values ("" when unitless).
    suffix : str
        BIDS suffix: ``"statmap"`` for statistics, ``"probseg"`` for values in [0, 1].
    metadata : dict
        Extra sidecar entries (analysis parameters, connectome name, ...).
    desc : str
        ``desc-`` label of the exported file (letters and digits); default
        ``<analysis><name>``.
    written_to : str, optional
        Path of a NIfTI file already holding exactly this map (then ``data`` may be a
        lazy nibabel array proxy of it, and exporting to that path rewrites nothing).
    dense : bool
        A value in every brain voxel (a statistic, e.g. functional t): a ``.nii.gz``
        file then stores the values as they are and deflates only the runs of one value
        around the brain (:mod:`lacuna.core.map_gzip`: a third of the time, a 10-25 %
        larger file, since deflate barely shrinks such values). Sparse maps (mostly
        zeros) are deflated whole.
    """

    name: str
    data: np.ndarray
    affine: np.ndarray
    space: str
    resolution: float
    description: str = ""
    units: str = ""
    suffix: str = "statmap"
    metadata: dict = field(default_factory=dict)
    desc: str = ""
    written_to: str | None = None
    dense: bool = False

    @property
    def grid(self) -> Grid:
        """The voxel grid of the map."""
        return Grid(tuple(self.data.shape[:3]), np.asarray(self.affine, float))

    def to_nifti(self) -> nib.Nifti1Image:
        """The map as a float32 NIfTI image with millimetre units."""
        return float_map_image(self.data, self.affine)

    def file_bytes(self, name: str) -> bytes | memoryview:
        """The bytes of :meth:`to_nifti` written as ``name`` (``.nii`` or ``.nii.gz``), as
        ``bytes`` or a read-only view (see :func:`~lacuna.core.nifti_files.float_map_bytes`)."""
        return float_map_bytes(self.data, self.affine, name, stored_values=self.dense)

    def sidecar(self) -> dict:
        """JSON sidecar contents."""
        return {"Description": self.description, "Units": self.units, **self.metadata}

    def flatten(self) -> dict:
        """Summary values for one-row tables (maps themselves are not tabulated)."""
        data = np.asarray(self.data)
        finite = data[np.isfinite(data)]
        return {
            "max": float(finite.max()) if finite.size else float("nan"),
            "mean": float(finite.mean()) if finite.size else float("nan"),
        }


@dataclass
class ParcelData:
    """One measure for every region of a parcellation.

    Attributes
    ----------
    parcellation : str
        Parcellation name (``<atlas>_<desc>``).
    measure : str
        Column name of the measure (snake_case, e.g. ``"percent_damaged"``).
    region_ids : list of int
        Region index (label value or 1-based volume number).
    region_names : list of str
        Region names in the same order.
    values : ndarray of float
        One value per region; NaN where undefined (written ``n/a``).
    description, units : str
        Column description for the TSV sidecar.
    table : str
        Alphanumeric name of the table the measure is a column of (the ``desc-`` of the
        exported file); measures of one analysis sharing a table are written together.
    """

    parcellation: str
    measure: str
    region_ids: list[int]
    region_names: list[str]
    values: np.ndarray
    description: str = ""
    units: str = ""
    table: str = ""

    def column_sidecar(self) -> dict:
        """BIDS column description of the measure."""
        entry = {"Description": self.description}
        if self.units:
            entry["Units"] = self.units
        return entry

    def flatten(self) -> dict:
        """Region name -> value."""
        return {name: _plain(value) for name, value in zip(self.region_names, self.values)}


@dataclass
class ConnectivityMatrix:
    """Region x region values of a parcellation (e.g. streamline counts)."""

    parcellation: str
    measure: str
    region_names: list[str]
    matrix: np.ndarray
    description: str = ""
    units: str = ""

    def to_frame(self) -> pd.DataFrame:
        """The matrix as a labelled table."""
        import pandas as pd

        return pd.DataFrame(self.matrix, index=self.region_names, columns=self.region_names)

    def sidecar(self) -> dict:
        """JSON sidecar contents."""
        return {
            "Description": self.description,
            "Units": self.units,
            "Parcellation": self.parcellation,
            "Measure": self.measure,
        }

    def flatten(self) -> dict:
        """Upper-triangle summary: total and mean of the off-diagonal entries."""
        upper = self.matrix[np.triu_indices_from(self.matrix, k=1)]
        return {"total": _plain(upper.sum()), "mean": _plain(upper.mean() if upper.size else np.nan)}


@dataclass
class ScalarMetric:
    """A single value (a count, a volume, a fraction)."""

    name: str
    value: float | int | str
    units: str = ""
    description: str = ""

    def to_dict(self) -> dict:
        """JSON entry for the scalars file."""
        return {"Value": _plain(self.value), "Units": self.units, "Description": self.description}

    def flatten(self) -> dict:
        """The value itself, under an empty key."""
        return {"": _plain(self.value)}


def _plain(value):
    """Turn numpy scalars into Python ones; NaN stays NaN."""
    if isinstance(value, np.generic):
        return value.item()
    return value


Result = VoxelMap | ParcelData | ConnectivityMatrix | ScalarMetric


def write_tsv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as BIDS TSV (tab-separated, ``n/a`` for missing values)."""
    frame.to_csv(path, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
