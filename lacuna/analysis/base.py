"""The small base every analysis shares.

An analysis is configured once (all parameters in ``__init__``) and run on many
subjects. :meth:`Analysis.run` returns a copy of the subject with the analysis' results
under ``subject.results[analysis.name]`` and one provenance step recording the
parameters, the reference files read (with checksums) and timestamps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from contextlib import nullcontext

import nibabel as nib
import numpy as np

from lacuna.core.errors import AnalysisError, SpaceError
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.results import Result, VoxelMap
from lacuna.core.interpolation import axis_maps, coverage_box, nonzero_box, splatted_coverage_box
from lacuna.core.spaces import HALF_COVERAGE, Grid, canonical_space, coverage_note, standard_grid
from lacuna.resources.transforms import map_to_space, mask_to_space
from lacuna.core.subject import SubjectData

log = logging.getLogger(__name__)


class Analysis(ABC):
    """Base class of all analyses.

    Subclasses implement :meth:`parameters` and :meth:`compute`; they may override
    :meth:`run_batch` when many subjects can share work.
    """

    @property
    def name(self) -> str:
        """Key of the analysis in ``subject.results`` (the class name)."""
        return type(self).__name__

    @property
    def desc(self) -> str:
        """Alphanumeric label used in output file names."""
        return self.name.lower()

    @abstractmethod
    def parameters(self) -> dict:
        """JSON-serialisable parameters (recorded in provenance and sidecars)."""

    def input_files(self) -> list[InputFile]:
        """Reference files the analysis reads (hashed into provenance)."""
        return []

    @abstractmethod
    def compute(self, subject: SubjectData, step: ProvenanceStep) -> dict[str, Result]:
        """Compute results for one subject; may add notes to ``step``."""

    def warm_up(self) -> None:
        """Read ahead what every subject needs (atlases, operators), so that the first
        subject does not wait for it. Optional; safe on a background thread. The
        default does nothing."""

    def step_factory(self):
        """A maker of provenance steps for many subjects: parameters and input files
        (hashes) are gathered once, each step gets its own copies."""
        parameters, inputs = self.parameters(), self.input_files()
        return lambda: ProvenanceStep(name=self.name, kind="analysis", parameters=dict(parameters), inputs=list(inputs))

    def run(self, subject: SubjectData) -> SubjectData:
        """Run the analysis on one subject.

        Parameters
        ----------
        subject : SubjectData
            The lesion to analyse (not modified).

        Returns
        -------
        SubjectData
            A copy with results under ``results[self.name]`` and a provenance step.
        """
        step = self._new_step()
        results = self.compute(subject, step)
        return subject.with_results(self.name, results, step.finish())

    def _new_step(self) -> ProvenanceStep:
        """A provenance step; parameters and input files (checksums) are gathered once
        per analysis object and set of parameters, not once per subject."""
        key = json.dumps(self.parameters(), sort_keys=True, default=str)
        cached = self.__dict__.get("_step_maker")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_step_maker"] = (key, self.step_factory())
        return cached[1]()

    def run_batch(self, subjects: list[SubjectData]) -> list[SubjectData]:
        """Run on many subjects (override for shared work); order is preserved."""
        return [self.run(subject) for subject in subjects]

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.parameters().items())
        return f"{self.name}({params})"


class BatchAnalysis(Analysis):
    """An analysis that maps many lesions together (e.g. one connectome pass for all).

    Subclasses implement :meth:`iter_batch`, yielding each subject (with results) or its
    error as soon as it is ready, and :meth:`lesions_per_pass` for memory planning.
    """

    #: Whether :meth:`iter_batch` runs ``finish`` on worker threads of its own, lesions
    #: in parallel (callers then hand it their per-lesion work rather than doing it
    #: themselves after each yield).
    finishes_on_workers = False

    @abstractmethod
    def iter_batch(self, subjects: list[SubjectData], finish=None):
        """Yield ``(index, SubjectData | Exception)`` for every subject; with ``finish``,
        ``(index, finish(subject))`` instead (an exception ``finish`` raises is yielded
        as the subject's error)."""

    @abstractmethod
    def lesions_per_pass(self, extra_bytes: int = 0) -> int:
        """Lesions one pass can take within the memory budget, counting ``extra_bytes``
        more per lesion held by the caller."""

    def buffers_kept(self):
        """A context within which the analysis may keep its working memory from one
        :meth:`iter_batch` call to the next (a cohort mapped group by group); a no-op
        here."""
        return nullcontext()

    def reserve_pass(self, n_lesions: int) -> None:
        """Start making the working memory of a pass over ``n_lesions`` lesions in the
        background, for the next :meth:`iter_batch` within :meth:`buffers_kept` to take;
        a no-op here."""

    def run(self, subject: SubjectData) -> SubjectData:
        return self.run_batch([subject])[0]

    def run_batch(self, subjects: list[SubjectData]) -> list[SubjectData]:
        """Map many lesions; raises the first per-lesion error. Results hold full maps:
        for large cohorts use :meth:`iter_batch` and export each subject as it comes."""
        results: list[SubjectData | None] = [None] * len(subjects)
        for index, outcome in self.iter_batch(subjects):
            if isinstance(outcome, Exception):
                raise outcome
            results[index] = outcome
        return results

    def compute(self, subject: SubjectData, step: ProvenanceStep) -> dict[str, Result]:
        return self.run(subject).results[self.name]


def mask_on_grid(
    subject: SubjectData, target: Grid, target_space: str, step: ProvenanceStep
) -> np.ndarray:
    """The subject's mask as coverage fractions (0..1) on ``target``.

    On the subject's own grid this is the mask itself; on another grid of the same space
    it is the fraction of each target voxel covered by the lesion; in the other MNI
    space the mask goes through the TemplateFlow transform (see
    :func:`lacuna.resources.transforms.mask_to_space`). Every move is noted in ``step`` (with the
    transform file among its inputs).

    Raises
    ------
    AnalysisError
        If the target space is not supported.
    """
    try:
        target_space = canonical_space(target_space)
    except SpaceError as exc:
        raise AnalysisError(str(exc)) from exc
    if target_space == subject.space and target.matches(subject.grid):
        return subject.mask.astype(np.float32)
    moved, notes = mask_to_space(subject.mask_img, subject.space, target_space, grid=target)
    record_move(step, notes, subject.space, target_space)
    coverage = np.asanyarray(moved.dataobj)
    note_volumes(subject, coverage, target, step)
    return coverage


def mask_coverage_box(
    subject: SubjectData, target: Grid, target_space: str, step: ProvenanceStep
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """:func:`mask_on_grid` on the part of ``target`` that can hold the lesion only:
    ``(slices of target, coverage fractions there)``. Between axis-aligned grids of one
    space the cost follows the lesion's size, not the target grid's; the numbers are
    those of :func:`mask_on_grid`."""
    same_space = canonical_space(target_space) == subject.space
    if same_space and target.matches(subject.grid):
        mask = subject.mask
        box = nonzero_box(mask)
        if box is None:
            return (slice(0, 0),) * 3, np.zeros((0, 0, 0), dtype=np.float32)
        return box, mask[box].astype(np.float32)
    if same_space:
        maps = axis_maps(subject.grid, target)
        if maps is not None:
            box, values = coverage_box(subject.mask, subject.grid, target, maps)
        else:
            box, values = splatted_coverage_box(subject.mask, subject.grid, target)
        record_move(step, [coverage_note(subject.grid, target)], subject.space, subject.space)
        if box is None:
            note_volumes(subject, np.zeros(0, dtype=np.float32), target, step)
            return (slice(0, 0),) * 3, np.zeros((0, 0, 0), dtype=np.float32)
        note_volumes(subject, values, target, step)
        return box, values
    return (slice(None),) * 3, mask_on_grid(subject, target, target_space, step)


def note_volumes(subject: SubjectData, coverage: np.ndarray, target: Grid, step: ProvenanceStep) -> None:
    """Record in ``step`` (and the log) the lesion volume before and after a move onto
    ``target`` and the fraction of the lesion outside ``target``'s field of view.

    ``coverage`` holds the covered fraction of the target voxels (all, or those of a box
    around the lesion): its sum is the lesion volume inside the target grid.
    """
    before = subject.get_volume_mm3()
    inside = float(coverage.sum(dtype=np.float64)) * target.voxel_volume_mm3
    after = int(np.count_nonzero(coverage >= HALF_COVERAGE)) * target.voxel_volume_mm3
    outside = min(1.0, max(0.0, 1.0 - inside / before)) if before else 0.0
    note = (
        f"lesion volume {before:g} mm^3 on the mask grid, {after:g} mm^3 after the move onto "
        f"{target.describe()}; {100 * outside:.1f}% of the lesion outside that grid's field of view"
    )
    if note in step.notes:
        return
    step.notes.append(note)
    who = subject.metadata.get("source_path") or repr(subject)
    log.log(logging.WARNING if outside >= 0.005 else logging.DEBUG, "%s: %s", who, note)


def record_move(step: ProvenanceStep, notes: list[str], source: str, target: str) -> None:
    """Note a move between grids/spaces in ``step``; a transform file becomes an input."""
    for note in notes:
        if note not in step.notes:
            step.notes.append(note)
    if source != target:
        from lacuna.resources.templates import transform_path

        transform = InputFile.from_path(f"transform:{source}->{target}", transform_path(source, target))
        if transform not in step.inputs:
            step.inputs.append(transform)


def voxel_maps_to_space(
    results: dict[str, Result], space: str, resolution: float, step: ProvenanceStep, grid: Grid | None = None
) -> dict[str, Result]:
    """``results`` with every VoxelMap brought onto ``grid`` of ``space`` (default: the
    standard grid of ``space`` at ``resolution``), trilinear; other results unchanged."""
    space = canonical_space(space)
    grid = grid or standard_grid(space, resolution)
    moved = {}
    for key, result in results.items():
        if isinstance(result, VoxelMap) and (canonical_space(result.space) != space or not result.grid.matches(grid)):
            img = nib.Nifti1Image(np.asarray(result.data, dtype=np.float32), result.affine)
            out, notes = map_to_space(img, result.space, space, grid=grid)
            record_move(step, [f"{result.name} map: {note}" for note in notes], canonical_space(result.space), space)
            result = dataclasses.replace(
                result, data=np.asanyarray(out.dataobj), affine=out.affine, space=space, resolution=float(resolution), written_to=None
            )
        moved[key] = result
    return moved


def voxel_maps_to_subject(results: dict[str, Result], subject: SubjectData, step: ProvenanceStep) -> dict[str, Result]:
    """``results`` with every VoxelMap on the subject's own grid (any grid of its space)."""
    return voxel_maps_to_space(results, subject.space, subject.resolution, step, grid=subject.grid)
