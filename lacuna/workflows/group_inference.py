"""Group inference: the group result of lesion network mapping, from participant outputs.

For every participant map source (the fLNM t maps of each functional connectome, the
sLNM disconnection maps of each tractogram; see :mod:`lacuna.bids.group_maps`):

* **Sensitivity** (always): percent of masks whose map exceeds the threshold;
* **Specificity** (``--cases-column``): the GLM of the maps on the case indicator with
  covariates (t, -log10 p, permutation FWE, optional TFCE) and the Liebermeister test;
* **Association** (``--score-column``): the same GLM on a continuous score;
* the same GLMs on the per-parcel tables (fLNM t per parcel, sLNM fraction of
  streamlines cut, regional-damage percentages), FWE over parcels.

Definitions, option names and sidecar keys: ``../shared/spec/group-level.md``. The
statistics are :mod:`lacuna.analysis.group.statistics`; the participants table and the
design of each analysis are :mod:`lacuna.bids.group_design`; this module reads the maps,
runs the analyses and writes ``group/`` outputs with their sidecars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lacuna.analysis.group import statistics as stats
from lacuna.core.atomic import atomic_path, write_json
from lacuna.core.results import write_tsv
from lacuna.core.errors import ValidationError
from lacuna.bids.group_design import Contrast, MaskIdentity, build_contrasts, load_participants
from lacuna.bids.group_options import LESION_VOLUME, InferenceOptions
from lacuna.bids.group_maps import (
    MapSource,
    MapStack,
    ParcelTable,
    find_map_sources,
    find_parcel_tables,
    lesion_volume_mm3,
)
from lacuna.bids.names import group_overlap, group_table, measure_label, sidecar_of

log = logging.getLogger(__name__)

#: The ``desc-`` label of each statistic (appended to source and analysis).
STATISTIC_LABELS = {
    "PercentPositive": "PercentPositive",
    "PercentNegative": "PercentNegative",
    "PercentSigned": "PercentSigned",
    "t": "T",
    "logp": "Logp",
    "logp_fwe": "LogpFwe",
    "tfce": "Tfce",
    "logp_tfce_fwe": "LogpTfceFwe",
}

_DESCRIPTIONS = {
    "PercentPositive": "Percent of masks whose map is above the threshold",
    "PercentNegative": "Percent of masks whose map is below minus the threshold",
    "PercentSigned": "PercentPositive minus PercentNegative",
    "t": "t statistic of the tested variable (OLS with an intercept and the covariates)",
    "logp": "-log10 of the two-sided parametric p of t",
    "logp_fwe": "-log10 of the family-wise error p of |t| (maximum |t| under Freedman-Lane permutation)",
    "tfce": "Threshold-free cluster enhancement of t (E=0.5, H=2, faces connectivity, two-sided)",
    "logp_tfce_fwe": "-log10 of the family-wise error p of |TFCE| (maximum |TFCE| under the same permutations)",
}


@dataclass
class AnalysisRecord:
    """One analysis of one source, as recorded in ``summary.json``."""

    analysis: str
    source: str
    n: int
    outputs: list[str] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"Analysis": self.analysis, "Source": self.source, "N": self.n, **self.details, "Excluded": self.excluded, "Outputs": self.outputs}


@dataclass
class InferenceSummary:
    """What group inference wrote, for ``summary.json``."""

    options: InferenceOptions
    analyses: list[AnalysisRecord] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.options.to_dict(), "analyses": [record.to_dict() for record in self.analyses]}


def prepare_inference(options: InferenceOptions):
    """Check the options and the participants table before any work starts; returns
    the table (None when no analysis needs one).

    Raises
    ------
    UsageError
        For contradicting options or a column the table does not have.
    InputNotFoundError
        If the analyses need a participants table and there is none.
    """
    options.check()
    return load_participants(options) if options.needs_table else None


def run_inference(target: Path, completed: list, options: InferenceOptions, table) -> InferenceSummary:
    """Write every group-inference output under ``target / group``.

    Parameters
    ----------
    target : Path
        Where ``group/`` is being written.
    completed : list of CompletedMask
        The completed masks (``identity``, ``provenance_path``, ``outputs``).
    table : pandas.DataFrame or None
        The participants table from :func:`prepare_inference`.
    """
    summary = InferenceSummary(options)
    outputs = [list(mask.outputs) for mask in completed]
    masks = [_identity(mask, LESION_VOLUME in options.covariates) for mask in completed]
    contrasts = build_contrasts(masks, table, options)
    writer = _Writer(target, options, summary)
    for source, paths in find_map_sources(outputs).items():
        log.info("group inference on %s maps (%s, res-%s): reading %d maps", source.desc, source.space, source.resolution, len(paths))
        stack = MapStack.read(paths)
        _sensitivity(stack, source, masks, writer)
        for contrast in contrasts:
            _voxel_glm(stack, source, masks, contrast, writer)
        del stack
    for parcel_table in find_parcel_tables(outputs):
        for contrast in contrasts:
            _parcel_glm(parcel_table, masks, contrast, writer)
    return summary


def _identity(mask, with_volume: bool) -> MaskIdentity:
    return MaskIdentity(
        participant_id=mask.identity["participant_id"],
        session_id=mask.identity.get("session_id"),
        name=mask.provenance_path.name.removesuffix("_provenance.json"),
        lesion_volume=lesion_volume_mm3(mask.outputs) if with_volume else None,
    )


def _no_map(source: MapSource) -> str:
    grid = f"{source.space} res-{source.resolution}" if source.resolution else source.space
    return f"no {source.desc} map on the {grid} grid"


def _not_computed(record: AnalysisRecord, problem: str, writer: "_Writer") -> None:
    log.warning("%s of %s not computed: %s", record.analysis, record.source, problem)
    record.details["NotComputed"] = problem
    writer.summary.analyses.append(record)


def _sensitivity(stack: MapStack, source: MapSource, masks: list[MaskIdentity], writer: "_Writer") -> None:
    threshold = writer.options.threshold(source.functional)
    result = stats.sensitivity(stack.maps, threshold, signed=source.functional)
    record = AnalysisRecord("Sensitivity", source.desc, result.n_maps, details={"Threshold": threshold})
    record.excluded = [m.exclusion(_no_map(source)) for i, m in enumerate(masks) if stack.column_of(i) is None]
    maps = {"PercentPositive": result.percent_positive}
    if source.functional:
        maps.update(PercentNegative=result.percent_negative, PercentSigned=result.percent_signed)
    for statistic, values in maps.items():
        writer.voxel_map(stack, source, record, statistic, values, units="%")
    writer.summary.analyses.append(record)


def _voxel_glm(stack: MapStack, source: MapSource, masks: list[MaskIdentity], contrast: Contrast, writer: "_Writer") -> None:
    used, excluded = contrast.restricted(lambda index: stack.column_of(index) is not None, _no_map(source), masks)
    record = AnalysisRecord(contrast.analysis, source.desc, used.n, excluded=excluded, details=writer.details(used))
    rows = np.array([stack.column_of(index) for index in used.masks], dtype=np.int64)
    if contrast.analysis == "Specificity" and used.n_cases and used.n_controls:
        _liebermeister(stack, source, used, rows, excluded, writer)
    if used.problem():
        return _not_computed(record, used.problem(), writer)
    grid = stack.tfce_grid() if writer.options.tfce else None
    log.info("%s of %s maps: %d masks, %d permutations", contrast.analysis, source.desc, used.n, writer.options.n_permutations)
    try:
        result = stats.permutation_glm(
            stack.maps, used.tested, used.covariates, n_permutations=writer.options.n_permutations,
            random_seed=writer.options.random_seed, tfce_grid=grid, rows=rows,
        )
    except ValidationError as exc:  # e.g. the tested variable explained by the covariates
        return _not_computed(record, str(exc), writer)
    for statistic in ("t", "logp", "logp_fwe", "tfce", "logp_tfce_fwe"):
        values = getattr(result, statistic)
        if values is not None:
            writer.voxel_map(stack, source, record, statistic, values)
    writer.summary.analyses.append(record)


def _liebermeister(stack: MapStack, source: MapSource, used: Contrast, rows, excluded, writer: "_Writer") -> None:
    threshold = writer.options.threshold(source.functional)
    result = stats.liebermeister(stack.maps, used.tested > 0.5, threshold, absolute=source.functional, rows=rows)
    details = {"NCases": result.n_cases, "NControls": result.n_controls, "Threshold": threshold}
    record = AnalysisRecord("Liebermeister", source.desc, used.n, excluded=excluded, details=details)
    writer.voxel_map(stack, source, record, "logp", result.logp)
    writer.summary.analyses.append(record)


def _parcel_glm(table: ParcelTable, masks: list[MaskIdentity], contrast: Contrast, writer: "_Writer") -> None:
    column_of = {mask: row for row, mask in enumerate(table.masks)}
    source = f"{table.desc}{measure_label(table.measure)}"
    used, excluded = contrast.restricted(lambda index: index in column_of, f"no {table.desc} parcel table", masks)
    record = AnalysisRecord(contrast.analysis, source, used.n, excluded=excluded, details=writer.details(used))
    record.details["Parcellation"] = table.parcellation
    if used.problem():
        return _not_computed(record, used.problem(), writer)
    rows = np.array([column_of[index] for index in used.masks], dtype=np.int64)
    try:
        result = stats.permutation_glm(
            np.ascontiguousarray(table.values), used.tested, used.covariates,
            n_permutations=writer.options.n_permutations, random_seed=writer.options.random_seed, rows=rows,
        )
    except ValidationError as exc:
        return _not_computed(record, str(exc), writer)
    frame = pd.DataFrame({"region": table.regions, "t": result.t, "logp": result.logp})
    if result.logp_fwe is not None:
        frame["logp_fwe"] = result.logp_fwe
    writer.parcel_table(table, record, frame)
    writer.summary.analyses.append(record)


class _Writer:
    """Writes the outputs and their sidecars, and records them."""

    def __init__(self, target: Path, options: InferenceOptions, summary: InferenceSummary):
        self.target = target
        self.options = options
        self.summary = summary

    def details(self, contrast: Contrast) -> dict:
        """The sidecar keys of a GLM on ``contrast``."""
        details = {"Covariates": list(self.options.covariates), "NPermutations": self.options.n_permutations, "RandomSeed": self.options.random_seed}
        if contrast.analysis == "Specificity":
            details.update(NCases=contrast.n_cases, NControls=contrast.n_controls)
        else:
            details["Score"] = self.options.score_column
        return details

    @staticmethod
    def _sidecar(record: AnalysisRecord, statistic: str) -> dict:
        return {
            "Description": f"{record.analysis}: {_DESCRIPTIONS[statistic]}",
            "Analysis": record.analysis,
            "Statistic": statistic,
            "Source": record.source,
            "N": record.n,
            **record.details,
            "Excluded": record.excluded,
        }

    def voxel_map(self, stack: MapStack, source: MapSource, record: AnalysisRecord, statistic: str, values, units: str = "") -> None:
        desc = f"{source.desc}{record.analysis}{STATISTIC_LABELS[statistic]}"
        path = self.target / group_overlap(source.space, source.resolution or None, desc, "statmap")
        img = nib.Nifti1Image(stack.volume(np.asarray(values, dtype=np.float32)), stack.grid.affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as temporary:
            nib.save(img, temporary)
        sidecar = {
            **self._sidecar(record, statistic),
            "Units": units,
            "SpatialReference": source.space,
        }
        if source.resolution:
            sidecar["Resolution"] = {source.resolution: f"{source.resolution_mm:g} mm, the grid of the participant {source.desc} maps"}
        write_json(sidecar_of(path), sidecar)
        self._record(record, path)

    def parcel_table(self, table: ParcelTable, record: AnalysisRecord, frame: pd.DataFrame) -> None:
        path = self.target / group_table(table.parcellation, f"{record.source}{record.analysis}")
        with atomic_path(path) as temporary:
            write_tsv(frame, temporary)
        sidecar = {
            **self._sidecar(record, "t"),
            "Statistic": [c for c in frame.columns if c != "region"],
            "Description": f"{record.analysis} per parcel of {table.parcellation}: {table.description}",
            "region": {"Description": "Parcel name"},
            **{column: {"Description": _DESCRIPTIONS[column].replace("voxels", "parcels")} for column in frame.columns if column != "region"},
        }
        if "logp_fwe" in frame:
            sidecar["logp_fwe"]["Description"] = "-log10 of the family-wise error p of |t| over parcels (maximum |t| under Freedman-Lane permutation)"
        write_json(sidecar_of(path), sidecar)
        self._record(record, path)

    def _record(self, record: AnalysisRecord, path: Path) -> None:
        self.summary.written.append(path)
        record.outputs.append(path.relative_to(self.target).as_posix())
