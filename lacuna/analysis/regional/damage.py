"""RegionalDamage: how much of each parcel a lesion destroys."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lacuna.analysis.base import Analysis, mask_coverage_box
from lacuna.resources.parcellations import Parcellation, ParcellationImage, get_parcellation
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.results import ParcelData, Result, ScalarMetric
from lacuna.core.spaces import HALF_COVERAGE
from lacuna.core.subject import SubjectData

DEFAULT_PARCELLATIONS = ("Schaefer2018_100Parcels7Networks",)


class RegionalDamage(Analysis):
    """Lesioned voxels, volume and percentage of every parcel of each parcellation.

    The lesion is brought onto each parcellation's own grid (half-coverage rule when
    the grids differ), so voxel counts are in parcellation voxels. For a 3-D (discrete)
    parcellation a parcel's damage is the number of lesioned voxels carrying its label.
    For a 4-D probabilistic atlas (one volume per region, e.g. HCP1065 tracts) the overlap
    is probability weighted: lesioned "voxels" are ``sum(p_region * lesion)`` and the
    parcel size is ``sum(p_region)``.

    Parameters
    ----------
    parcellations : sequence of str or Parcellation, optional
        Parcellation names (see ``lacuna atlases list``) or objects.
        Default: ``("Schaefer2018_100Parcels7Networks",)``.
    atlas_dir : str or Path, optional
        Folder of TemplateFlow-style atlas files searched before the catalogue.

    Results
    -------
    Per parcellation ``P``: ParcelData ``lesioned_voxels_P``, ``lesioned_volume_mm3_P``,
    ``percent_damaged_P`` (NaN for a parcel with no voxels), and the scalar
    ``fraction_outside_P`` (fraction of the lesion, on that grid, outside every parcel;
    NaN when the lesion vanishes on a coarser grid). Also ``lesion_volume_mm3`` and
    ``lesion_voxels`` of the mask on its own grid.
    """

    def __init__(
        self,
        parcellations: Sequence[str | Parcellation] = DEFAULT_PARCELLATIONS,
        atlas_dir: str | Path | None = None,
    ):
        if isinstance(parcellations, (str, Parcellation)):
            parcellations = [parcellations]
        if not parcellations:
            raise ValueError("RegionalDamage needs at least one parcellation")
        self.atlas_dir = Path(atlas_dir) if atlas_dir else None
        self.parcellations = [
            p if isinstance(p, Parcellation) else get_parcellation(p, atlas_dir=self.atlas_dir)
            for p in parcellations
        ]
        self._parcel_sizes: dict[str, np.ndarray] = {}

    def parameters(self) -> dict:
        return {"parcellations": [p.name for p in self.parcellations]}

    def input_files(self) -> list[InputFile]:
        files = []
        for parcellation in self.parcellations:
            files.append(InputFile.from_path(f"parcellation:{parcellation.name}", parcellation.image_path))
            if parcellation.labels_path:
                files.append(InputFile.from_path(f"labels:{parcellation.name}", parcellation.labels_path))
        return files

    def compute(self, subject: SubjectData, step: ProvenanceStep) -> dict[str, Result]:
        results: dict[str, Result] = {
            "lesion_volume_mm3": ScalarMetric(
                "lesion_volume_mm3", subject.get_volume_mm3(), "mm^3", "Lesion volume on the mask's grid"
            ),
            "lesion_voxels": ScalarMetric(
                "lesion_voxels", subject.n_voxels, "voxels", "Lesioned voxels on the mask's grid"
            ),
        }
        for parcellation in self.parcellations:
            image = parcellation.load()
            box, coverage = mask_coverage_box(subject, image.grid, parcellation.space, step)
            lesion = coverage >= HALF_COVERAGE
            if image.probabilistic:
                hits, outside = _probabilistic_overlap(image.data[box], image.scale, lesion)
            else:
                hits, outside = _discrete_overlap(image.data[box], image.region_ids, lesion)
            sizes = self._sizes(image)
            results.update(_parcel_results(image, hits, sizes))
            results[f"fraction_outside_{image.name}"] = ScalarMetric(
                f"fraction_outside_{image.name}",
                outside,
                "",
                f"Fraction of the lesion (on the {image.name} grid) outside every parcel",
            )
        return results

    def warm_up(self) -> None:
        for parcellation in self.parcellations:
            self._sizes(parcellation.load())

    def _sizes(self, image: ParcellationImage) -> np.ndarray:
        """Parcel sizes in voxels (probability-weighted for 4-D atlases), counted once
        (a thread asking while the read-ahead thread counts waits for its count)."""
        with _COUNTING:
            if image.name not in self._parcel_sizes:
                if image.voxel_counts is not None:
                    sizes = np.asarray(image.voxel_counts, dtype=np.float64)
                elif image.probabilistic:
                    sizes = np.array(
                        [image.data[..., i].sum(dtype=np.float64) for i in range(image.data.shape[3])]
                    ) * image.scale
                else:
                    # order "K": the labels in their own memory order, not a copy
                    counts = np.bincount(image.data.ravel(order="K"), minlength=max(image.region_ids) + 1)
                    sizes = counts[np.asarray(image.region_ids)].astype(np.float64)
                self._parcel_sizes[image.name] = sizes
            return self._parcel_sizes[image.name]


_COUNTING = threading.Lock()  # held while parcel sizes are counted


def _discrete_overlap(labels: np.ndarray, region_ids: list[int], lesion: np.ndarray) -> tuple[np.ndarray, float]:
    """Lesioned voxels per region and the fraction of the lesion on label 0 (``labels``
    and ``lesion`` cover the same voxels)."""
    labels_hit = labels[lesion]
    counts = np.bincount(labels_hit, minlength=max(region_ids) + 1)
    hits = counts[np.asarray(region_ids)].astype(np.float64)
    n_lesion = labels_hit.size
    outside = float(np.count_nonzero(labels_hit == 0) / n_lesion) if n_lesion else float("nan")
    return hits, outside


def _probabilistic_overlap(maps: np.ndarray, scale: float, lesion: np.ndarray) -> tuple[np.ndarray, float]:
    """Probability-weighted lesioned voxels per region and the fraction outside all
    (``maps`` and ``lesion`` cover the same voxels)."""
    values = maps[lesion]  # (n_lesion_voxels, n_regions), stored dtype
    hits = values.sum(axis=0, dtype=np.float64) * scale
    n_lesion = values.shape[0]
    outside = float(np.count_nonzero(values.max(axis=1) == 0) / n_lesion) if n_lesion else float("nan")
    return hits, outside


def _parcel_results(image: ParcellationImage, hits: np.ndarray, sizes: np.ndarray) -> dict[str, ParcelData]:
    voxel_volume = image.grid.voxel_volume_mm3
    percent = np.full(hits.shape, np.nan)
    np.divide(hits * 100.0, sizes, out=percent, where=sizes > 0)
    weighted = " (probability-weighted)" if image.probabilistic else ""
    measures = {
        "lesioned_voxels": (hits, "voxels", f"Lesioned voxels of the parcel on the parcellation grid{weighted}"),
        "lesioned_volume_mm3": (hits * voxel_volume, "mm^3", f"Lesioned volume of the parcel{weighted}"),
        "percent_damaged": (percent, "%", f"Percentage of the parcel that is lesioned{weighted}; n/a for an empty parcel"),
    }
    return {
        f"{measure}_{image.name}": ParcelData(
            parcellation=image.name,
            measure=measure,
            region_ids=list(image.region_ids),
            region_names=list(image.region_names),
            values=values,
            description=description,
            units=units,
            table="regionaldamage",
        )
        for measure, (values, units, description) in measures.items()
    }
