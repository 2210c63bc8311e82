"""ParcelAggregation: summarise a voxel map (or the lesion mask) per parcel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lacuna.analysis.base import Analysis, mask_on_grid, record_move
from lacuna.analysis.regional.parcel_operator import parcel_operator
from lacuna.core.entities import alphanumeric
from lacuna.resources.parcellations import Parcellation, ParcellationImage, get_parcellation
from lacuna.core.errors import AnalysisError
from lacuna.core.grid import Grid
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.results import ParcelData, Result, VoxelMap
from lacuna.core.spaces import canonical_space, trilinear_note
from lacuna.resources.transforms import map_to_space
from lacuna.core.subject import SubjectData

METHODS = ("mean", "sum", "max", "percent")


class ParcelAggregation(Analysis):
    """Aggregate a voxel map per parcel with ``mean``, ``sum``, ``max`` or ``percent``.

    Parameters
    ----------
    source : str
        ``"mask"`` for the lesion mask, or ``"<Analysis>.<result>"`` naming a VoxelMap
        already in ``subject.results`` (e.g. ``"FunctionalNetworkMapping.t"``).
    parcellations : sequence of str or Parcellation
        Parcellation names or objects.
    method : {"mean", "sum", "max", "percent"}
        ``percent`` is the percentage of the parcel's voxels whose value is above
        ``threshold``.
    threshold : float
        Threshold for ``percent`` (strictly greater than).
    atlas_dir : str or Path, optional
        Folder of TemplateFlow-style atlas files searched before the catalogue.

    Notes
    -----
    The map is brought onto each parcellation's grid: the mask as coverage fractions
    (so ``mean`` is the lesioned fraction of the parcel), VoxelMaps by trilinear
    interpolation. For a VoxelMap in the parcellation's space the two steps are one
    precomputed sparse operator per (map grid, parcellation), applied to the map
    (:mod:`lacuna.analysis.regional.parcel_operator`; same numbers, no full resampling).
    Non-finite values are ignored. For 4-D probabilistic atlases every
    statistic is weighted by the region's probability (``max`` over voxels with p > 0).
    A parcel with no voxels (or no finite values) gets NaN.
    """

    def __init__(
        self,
        source: str = "mask",
        parcellations: Sequence[str | Parcellation] = ("Schaefer2018_100Parcels7Networks",),
        method: str = "mean",
        threshold: float = 0.0,
        atlas_dir: str | Path | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")
        if source != "mask" and source.count(".") != 1:
            raise ValueError(f"source must be 'mask' or '<Analysis>.<result>', got {source!r}")
        if isinstance(parcellations, (str, Parcellation)):
            parcellations = [parcellations]
        self.source = source
        self.method = method
        self.threshold = float(threshold)
        self.atlas_dir = Path(atlas_dir) if atlas_dir else None
        self.parcellations = [
            p if isinstance(p, Parcellation) else get_parcellation(p, atlas_dir=self.atlas_dir)
            for p in parcellations
        ]

    def parameters(self) -> dict:
        return {
            "source": self.source,
            "method": self.method,
            "threshold": self.threshold,
            "parcellations": [p.name for p in self.parcellations],
        }

    def input_files(self) -> list[InputFile]:
        return [InputFile.from_path(f"parcellation:{p.name}", p.image_path) for p in self.parcellations]

    @property
    def table(self) -> str:
        """Table (file ``desc-``) the aggregates are written to: the source, alphanumeric
        (a voxel map's own ``desc`` when it has one)."""
        return alphanumeric(self.source).lower()

    def compute(self, subject: SubjectData, step: ProvenanceStep) -> dict[str, Result]:
        results: dict[str, Result] = {}
        table = self.table
        if self.source != "mask":
            table = _find_voxel_map(subject, self.source).desc or table
        for parcellation in self.parcellations:
            image = parcellation.load()
            aggregated = self._by_operator(subject, image, parcellation.space, step)
            if aggregated is None:
                values = self._values_on_grid(subject, image, parcellation.space, step)
                aggregated = _aggregate(image, values, self.method, self.threshold)
            key = f"{table}_{self.method}_{image.name}"
            results[key] = ParcelData(
                parcellation=image.name,
                measure=self.method,
                region_ids=list(image.region_ids),
                region_names=list(image.region_names),
                values=aggregated,
                description=self._description(),
                table=table,
            )
        return results

    def _description(self) -> str:
        what = "lesion mask (covered fraction)" if self.source == "mask" else self.source
        if self.method == "percent":
            return f"Percentage of parcel voxels where the {what} is above {self.threshold:g}"
        return f"{self.method.capitalize()} of the {what} over the parcel's voxels"

    def warm_up(self) -> None:
        for parcellation in self.parcellations:
            parcellation.load()

    def warm_up_for(self, grid: Grid, space: str) -> None:
        """:meth:`warm_up`, and build the sparse operators for source maps on ``grid``
        in ``space`` (what the first subject would otherwise wait for)."""
        for parcellation in self.parcellations:
            image = parcellation.load()
            if self.source != "mask" and _operator_applies(grid, space, image, parcellation.space):
                parcel_operator(grid, image)

    def _by_operator(
        self, subject: SubjectData, image: ParcellationImage, space: str, step: ProvenanceStep
    ) -> np.ndarray | None:
        """The statistic through the (cached) sparse operator of the map's grid and the
        parcellation, when the map is in the parcellation's space, on another grid and
        finite everywhere; None otherwise (then the map is resampled)."""
        if self.source == "mask":
            return None
        voxel_map = _find_voxel_map(subject, self.source)
        if not _operator_applies(voxel_map.grid, voxel_map.space, image, space):
            return None
        values = np.asarray(voxel_map.data)
        if not np.isfinite(values).all():
            return None
        note = f"{self.source} onto the {image.name} grid: {trilinear_note(voxel_map.grid, image.grid)}"
        record_move(step, [note], canonical_space(voxel_map.space), canonical_space(space))
        return parcel_operator(voxel_map.grid, image).apply(values, self.method, self.threshold)

    def _values_on_grid(
        self, subject: SubjectData, image: ParcellationImage, space: str, step: ProvenanceStep
    ) -> np.ndarray:
        if self.source == "mask":
            return mask_on_grid(subject, image.grid, space, step)
        voxel_map = _find_voxel_map(subject, self.source)
        if canonical_space(voxel_map.space) == canonical_space(space) and voxel_map.grid.matches(image.grid):
            return np.asarray(voxel_map.data, dtype=np.float64)
        source_img = nib.Nifti1Image(np.asarray(voxel_map.data, np.float32), voxel_map.affine)
        moved, notes = map_to_space(source_img, voxel_map.space, space, grid=image.grid)
        record_move(step, [f"{self.source} onto the {image.name} grid: {n}" for n in notes], canonical_space(voxel_map.space), canonical_space(space))
        return np.asanyarray(moved.dataobj, dtype=np.float64)


def _operator_applies(grid: Grid, space: str, image: ParcellationImage, image_space: str) -> bool:
    """Whether a map on ``grid`` in ``space`` is summarised by a parcel operator: same
    space as the parcellation, another grid."""
    return canonical_space(space) == canonical_space(image_space) and not grid.matches(image.grid)


def _find_voxel_map(subject: SubjectData, source: str) -> VoxelMap:
    analysis, result = source.split(".")
    found = subject.results.get(analysis, {}).get(result)
    if not isinstance(found, VoxelMap):
        available = [
            f"{name}.{key}"
            for name, values in subject.results.items()
            for key, value in values.items()
            if isinstance(value, VoxelMap)
        ]
        raise AnalysisError(
            f"no voxel map {source!r} in the subject's results; run that analysis first "
            f"(available maps: {', '.join(available) or 'none'})"
        )
    return found


def _aggregate(image: ParcellationImage, values: np.ndarray, method: str, threshold: float) -> np.ndarray:
    finite = np.isfinite(values)
    if image.probabilistic:
        out = np.full(len(image.region_ids), np.nan)
        for i in range(len(image.region_ids)):
            weights = image.data[..., i]
            inside = (weights > 0) & finite
            out[i] = _weighted_statistic(values[inside], weights[inside] * image.scale, method, threshold)
        return out
    return _labelled_statistic(image, np.where(finite, values, 0.0), finite, method, threshold)


def _labelled_statistic(
    image: ParcellationImage, values: np.ndarray, finite: np.ndarray, method: str, threshold: float
) -> np.ndarray:
    """Per-label statistic of a discrete parcellation with scipy.ndimage label reductions."""
    from scipy import ndimage  # imported when needed: it takes a quarter of a second

    labels = np.where(finite, image.data, 0)
    ids = np.asarray(image.region_ids)
    counts = np.asarray(ndimage.sum_labels(finite, labels, ids), dtype=np.float64)
    if method == "max":
        stat = np.asarray(ndimage.maximum(values, labels, ids), dtype=np.float64)
    elif method == "percent":
        stat = 100.0 * np.asarray(ndimage.sum_labels(values > threshold, labels, ids), dtype=np.float64)
    else:
        stat = np.asarray(ndimage.sum_labels(values, labels, ids), dtype=np.float64)
    out = np.full(ids.shape, np.nan)
    if method in ("mean", "percent"):
        np.divide(stat, counts, out=out, where=counts > 0)
    else:
        np.copyto(out, stat, where=counts > 0)
    return out


def _weighted_statistic(values: np.ndarray, weights: np.ndarray, method: str, threshold: float) -> float:
    """One probabilistic region's statistic; NaN when it has no (finite) voxels."""
    if values.size == 0:
        return float("nan")
    weights = weights.astype(np.float64)
    if method == "max":
        return float(values.max())
    if method == "sum":
        return float(np.sum(values * weights))
    total_weight = weights.sum()
    if method == "mean":
        return float(np.sum(values * weights) / total_weight)
    return float(100.0 * np.sum(weights * (values > threshold)) / total_weight)
