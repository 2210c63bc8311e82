"""FunctionalNetworkMapping: functional lesion network mapping (fLNM).

For each lesion, the seed timeseries (the lesion's mean signal) is correlated with every
brain voxel in each subject of a normative resting-state connectome; the Fisher-z maps
are summarised across subjects (see :mod:`lacuna.analysis.functional.engine` for how a
whole cohort of lesions is mapped in one pass).

Seeds
-----
``boes``
    The mean raw timeseries over the lesion's voxels inside the connectome mask.
``pini``
    The mean raw timeseries over the lesion voxels most representative of the lesion
    signal: those whose absolute loading on the first principal component of the lesion
    voxels' timeseries is at least the ``pini_percentile``-th percentile. The principal
    component is the leading eigenvector of the lesion voxels' correlation matrices summed
    over all connectome subjects (each subject standardised separately), so the
    selection is the same whatever the batch split. It costs one extra pass.

Lesions on another grid of the connectome's space are resampled onto its grid with the
half-coverage rule (a connectome voxel belongs to the lesion when at least half of it is
covered). Only lesion voxels inside the connectome mask are used; their fraction is
recorded; a lesion with none inside is an error for that lesion alone.

Outputs (per lesion, on the connectome grid; 0 outside the brain mask, 1 for p maps)
-----------------------------------------------------------------------------------
``z`` mean Fisher z; ``r`` = tanh(mean z); ``t`` one-sample t = mean z / (sd z / sqrt n);
``p`` two-sided p with n-1 degrees of freedom; ``pfdr`` Benjamini-Hochberg adjusted p over
the brain mask; ``tthresholded`` (when ``t_threshold`` is set) 1 where |t| > threshold.
Scalars: subjects used, lesion voxels used, fraction of the lesion inside the mask,
peak t, voxels significant at ``fdr_alpha``.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lacuna.analysis.functional import kernels as kernels
from lacuna.analysis.base import BatchAnalysis, mask_coverage_box, voxel_maps_to_subject
from lacuna.analysis.compiled_primitives import avx2_blas_on_avx512_cpu
from lacuna.core import map_gzip
from lacuna.core.memory import available_memory_bytes, default_memory_budget
from lacuna.core.nifti_files import float_map_header
from lacuna.analysis.functional.engine import (
    GROUPS_IN_FLIGHT,
    MAX_GROUP,
    R_MAX,
    FisherZSums,
    PassTiming,
    SeedDefinition,
    SumsReservation,
    pini_selection,
    stream_fisher_z,
    summarise,
    worker_threads,
)
from lacuna.resources.connectomes import FUNCTIONAL, resolve_connectome
from lacuna.core.errors import AnalysisError
from lacuna.core.provenance import InputFile, ProvenanceStep
from lacuna.core.results import Result, ScalarMetric, VoxelMap
from lacuna.core.spaces import HALF_COVERAGE
from lacuna.core.subject import SubjectData
from lacuna.core.timing import ProgressLog
from lacuna.formats.functional_connectome import FunctionalConnectome

log = logging.getLogger(__name__)

METHODS = ("boes", "pini")
_BYTES_PER_LESION_VOXEL = 8 + 8 + 4 + 4  # float64 sums, float32 shift, missing-subject counts


#: Running sums of one pass, without ``memory_budget_gb``, when the connectome fits in
#: the page cache: another pass then re-reads it from memory, a small part of the work
#: (measured below), so a cohort is mapped in passes of this size and the peak memory
#: does not grow with the number of lesions. A connectome larger than the page cache is
#: read once, for as many lesions as the memory budget takes. 600 MiB hold about 110
#: lesions of a 235,000-voxel brain: 100 lesions in one pass of 2.2-2.5 s instead of two
#: of 1.4 s each (measured: 30 subjects of 113 MB), at 0.23 GiB more peak memory.
CACHED_PASS_BYTES = 600 * 1024**2

#: Most memory for the connectome subjects in flight (the two groups being mapped). A
#: group of two subjects is within 7 % of the speed of a group of eight (measured: 50
#: lesions, 30 subjects of 113 MB from the page cache, 1.42 s and 1.33 s) and maps 0.7 GB
#: less, so larger groups are not worth their memory.
SUBJECTS_IN_FLIGHT_BYTES = 512 * 1024**2


@dataclass
class PreparedLesion:
    """A lesion placed on the connectome grid."""

    index: int
    subject: SubjectData
    columns: np.ndarray  # timeseries columns of the lesion voxels inside the mask
    fraction_inside: float
    step: ProvenanceStep


class FunctionalNetworkMapping(BatchAnalysis):
    """Functional lesion network mapping against a normative connectome.

    Parameters
    ----------
    connectome : str, Path or FunctionalConnectome
        Registered name (e.g. ``"GSP1000"``), path to an HDF5 file or folder of batch
        files, or an opened connectome.
    method : {"boes", "pini"}
        Seed definition (module docs).
    pini_percentile : float
        Percentile of absolute PC1 loadings below which lesion voxels are dropped (pini).
    compute_p_map : bool
        Compute ``p`` and ``pfdr`` maps.
    fdr_alpha : float
        Level for the count of FDR-significant voxels.
    t_threshold : float, optional
        Also output a binary map of |t| > ``t_threshold``.
    memory_budget_gb : float, optional
        Memory for the lesion chunk of one pass; default half the available memory, and
        at most :data:`CACHED_PASS_BYTES` of running sums per pass when the connectome
        fits in the page cache.
    return_in_input_space : bool
        Bring the maps back onto the lesion's own space and grid (trilinear, through the
        TemplateFlow transform across spaces); otherwise they stay on the connectome grid.
    """

    def __init__(
        self,
        connectome: str | Path | FunctionalConnectome,
        method: str = "boes",
        pini_percentile: float = 20,
        compute_p_map: bool = True,
        fdr_alpha: float = 0.05,
        t_threshold: float | None = None,
        memory_budget_gb: float | None = None,
        return_in_input_space: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown seed method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= pini_percentile < 100:
            raise ValueError("pini_percentile must be in [0, 100)")
        if not 0 < fdr_alpha < 1:
            raise ValueError("fdr_alpha must be in (0, 1)")
        if isinstance(connectome, FunctionalConnectome):
            self.connectome = connectome
        else:
            name, path = resolve_connectome(connectome, FUNCTIONAL)
            self.connectome = FunctionalConnectome.open(path, name=name)
        self.method = method
        self.pini_percentile = float(pini_percentile)
        self.compute_p_map = compute_p_map
        self.fdr_alpha = float(fdr_alpha)
        self.t_threshold = None if t_threshold is None else float(t_threshold)
        self.memory_budget = int(memory_budget_gb * 1024**3) if memory_budget_gb else default_memory_budget()
        self._budget_is_default = not memory_budget_gb
        self.return_in_input_space = return_in_input_space
        self.last_timing: list[PassTiming] = []
        self._keep_sums = False
        self._spare_sums: FisherZSums | SumsReservation | None = None
        self._layout_announced = False
        if avx2_blas_on_avx512_cpu():
            log.info(
                "OpenBLAS uses its AVX2 kernels on this AVX-512 CPU; setting OPENBLAS_CORETYPE=SkylakeX "
                "before starting makes functional mapping of many lesions faster"
            )

    def warm_up(self) -> None:
        """Load the compiled kernels for this connectome's stored types (from numba's
        cache, a few tenths of a second; compiled the first time, several seconds), so
        that a pass does not stall on them midway, and tell the map writer where the
        maps hold their fill value (outside the connectome's brain mask)."""
        kernels.prepare({f.dtype for f in self.connectome.files})
        if not self._layout_announced:  # iter_batch warms up again for each group
            outside = np.ones(int(np.prod(self.connectome.mask_shape)), dtype=bool)
            outside[self.connectome.flat_indices_fortran] = False
            map_gzip.expect_constant(outside)  # maps repeat their fill value there: written from a template
            self._layout_announced = True

    @property
    def connectome_label(self) -> str:
        """Connectome name as a BIDS label (letters and digits)."""
        return re.sub(r"[^A-Za-z0-9]", "", self.connectome.name) or "connectome"

    def parameters(self) -> dict:
        return {
            "connectome": self.connectome.name,
            "connectome_space": self.connectome.space,
            "connectome_resolution": self.connectome.resolution,
            "connectome_subjects": self.connectome.n_subjects,
            "method": self.method,
            "pini_percentile": self.pini_percentile,
            "compute_p_map": self.compute_p_map,
            "fdr_alpha": self.fdr_alpha,
            "t_threshold": self.t_threshold,
            "fisher_z_clip": R_MAX,
            "return_in_input_space": self.return_in_input_space,
        }

    def input_files(self) -> list[InputFile]:
        return [InputFile.from_path(f"connectome:{self.connectome.name}", f.path) for f in self.connectome.files]

    #: Statistics, maps and ``finish`` run on worker threads, a few lesions at a time.
    finishes_on_workers = True

    def iter_batch(self, subjects: list[SubjectData], finish=None) -> Iterator[tuple[int, object]]:
        """Yield ``(index, subject with results)`` or ``(index, error)`` per lesion.

        Lesions that cannot be mapped (other space, nothing inside the brain mask) come
        first as errors; the others follow chunk by chunk, each chunk one pass over the
        connectome (two for ``pini``). With ``finish``, each lesion's subject is handed
        to it on the worker thread that made its maps, and ``(index, finish(subject))``
        is yielded (in order): the caller's per-lesion work (tables, files) then runs
        on all cores, with no hand-over to threads of its own.
        """
        self.warm_up()  # returns at once when done before
        lookup = self.connectome.voxel_lookup()
        new_step = self.step_factory()
        prepared: list[PreparedLesion] = []
        for index, subject in enumerate(subjects):
            try:
                prepared.append(self._prepare(index, subject, lookup, new_step()))
            except Exception as exc:  # reported per lesion
                yield index, exc
        for chunk in self._chunks(prepared):
            yield from self._map_chunk(chunk, finish)

    def _prepare(self, index: int, subject: SubjectData, lookup: np.ndarray, step: ProvenanceStep) -> PreparedLesion:
        box, coverage = mask_coverage_box(subject, self.connectome.grid, self.connectome.space, step)
        lesion = coverage >= HALF_COVERAGE
        n_lesion = int(lesion.sum())
        if n_lesion == 0:
            raise AnalysisError(
                f"{_who(subject)}: the lesion covers no voxel of the {self.connectome.name} grid "
                "by half or more (it is smaller than one connectome voxel)"
            )
        columns = lookup[box][lesion]
        columns = np.sort(columns[columns >= 0])
        if columns.size == 0:
            raise AnalysisError(
                f"{_who(subject)}: no lesion voxel lies inside the {self.connectome.name} brain "
                "mask; functional mapping needs at least one"
            )
        fraction = columns.size / n_lesion
        if fraction < 1:
            step.notes.append(f"{fraction:.1%} of the lesion lies inside the connectome brain mask; only that part is used")
        return PreparedLesion(index, subject, columns, fraction, step)

    def _lesion_bytes(self, n_lesion_voxels: int = 0) -> int:
        cost = _BYTES_PER_LESION_VOXEL * self.connectome.n_voxels
        if self.method == "pini":
            cost = max(cost, 8 * n_lesion_voxels**2)
        return cost

    def _subjects_memory(self) -> int:
        """Memory for connectome subjects in flight (:data:`GROUPS_IN_FLIGHT` groups)."""
        subject_bytes = max(f.n_timepoints * self.connectome.n_voxels * f.dtype.itemsize for f in self.connectome.files)
        in_flight = GROUPS_IN_FLIGHT * subject_bytes
        return int(np.clip(min(self.memory_budget // 8, SUBJECTS_IN_FLIGHT_BYTES), in_flight, MAX_GROUP * in_flight))

    def _lesions_budget(self) -> int:
        """Bytes for the lesions of one pass: the budget, less the subjects in flight."""
        return max(self.memory_budget - self._subjects_memory(), 0)

    def _chunk_budget(self) -> int:
        """:meth:`_lesions_budget`, at most :data:`CACHED_PASS_BYTES` by default for a
        connectome that the page cache holds."""
        if self._budget_is_default and self._connectome_fits_in_page_cache():
            return min(self._lesions_budget(), CACHED_PASS_BYTES)
        return self._lesions_budget()

    def _connectome_fits_in_page_cache(self) -> bool:
        stored = sum(f.n_subjects * f.n_timepoints * f.dtype.itemsize for f in self.connectome.files) * self.connectome.n_voxels
        return stored + self.memory_budget <= available_memory_bytes()

    def lesions_per_pass(self, extra_bytes: int = 0) -> int:
        """How many lesions one pass can map within the memory budget, counting
        ``extra_bytes`` more per lesion (e.g. the caller's copy of each mask, held only
        while the budget, not the page-cache cap, binds)."""
        within_budget = self._lesions_budget() // (self._lesion_bytes() + extra_bytes)
        return max(1, min(within_budget, self._chunk_budget() // self._lesion_bytes()))

    def _chunks(self, prepared: list[PreparedLesion]) -> Iterator[list[PreparedLesion]]:
        """Lesion chunks whose running sums (and pini matrices) fit the memory budget."""
        budget = self._chunk_budget()
        chunk: list[PreparedLesion] = []
        used = 0
        for lesion in prepared:
            cost = self._lesion_bytes(lesion.columns.size)
            if chunk and used + cost > budget:
                yield chunk
                chunk, used = [], 0
            chunk.append(lesion)
            used += cost
        if chunk:
            yield chunk

    def _map_chunk(self, chunk: list[PreparedLesion], finish=None) -> Iterator[tuple[int, object]]:
        columns = [lesion.columns for lesion in chunk]
        if self.method == "pini":
            log.info("%s: PINI voxel selection for %d lesion(s)", self.connectome.name, len(chunk))
            columns = pini_selection(self.connectome, columns, self.pini_percentile, self._progress("PINI selection"))
        log.info("%s: mapping %d lesion(s) over %d subjects", self.connectome.name, len(chunk), self.connectome.n_subjects)
        # The writer's kernels load, and its streams of this grid's maps are planned, while
        # the pass leaves the GIL free (not by the first lesions after it).
        map_gzip.prepare_in_background(then=self._plan_map_streams)
        spare, self._spare_sums = self._spare_sums, None
        sums, timing = stream_fisher_z(
            self.connectome, SeedDefinition.means(columns), self._progress("fLNM"), self._subjects_memory(), spare
        )
        del spare
        self.last_timing.append(timing)

        def lesion_outcome(row: int):
            lesion, used = chunk[row], columns[row]
            statistics = self._statistics(sums, row)
            results = self._results(lesion, used, statistics, int(sums.excluded_seeds[row]))
            if self.return_in_input_space:
                results = voxel_maps_to_subject(results, lesion.subject, lesion.step)
            lesion.step.notes.append(f"seed from {used.size} of {lesion.columns.size} lesion voxels in the mask ({self.method})")
            subject = lesion.subject.with_results(self.name, results, lesion.step.finish())
            if finish is None:
                return subject
            try:
                return finish(subject)
            except Exception as exc:  # reported per lesion
                return exc

        # Statistics, maps (and ``finish``) run on all cores, a few lesions ahead.
        with ThreadPoolExecutor(max_workers=worker_threads()) as pool:
            outcomes = _ordered_map(pool, lesion_outcome, range(len(chunk)), ahead=2 * worker_threads())
            for lesion, outcome in zip(chunk, outcomes):
                yield lesion.index, outcome
        if self._keep_sums:  # every lesion's statistics are done: the next pass may take the memory
            self._spare_sums = sums

    def _plan_map_streams(self) -> None:
        """The header of this connectome's maps, and their gzip streams planned for
        each value they hold outside its brain mask (:func:`~lacuna.core.map_gzip.plan`)."""
        header = float_map_header(self.connectome.mask_shape, self.connectome.mask_affine)
        for fill in (_FILL, _P_FILL):
            map_gzip.plan(header, int(np.prod(self.connectome.mask_shape)), fill)

    @contextmanager
    def buffers_kept(self):
        """Within the block, the memory of a pass's running sums is kept for the next
        pass (of this analysis) once the pass's statistics are done, instead of being
        freed and faulted in anew; it is released when the block ends."""
        self._keep_sums = True
        try:
            yield
        finally:
            self._keep_sums = False
            self._spare_sums = None

    def reserve_pass(self, n_lesions: int) -> None:
        """The running sums of the next pass made on a thread of their own
        (:class:`~lacuna.analysis.functional.engine.SumsReservation`), unless the sums
        of a pass before it are kept for it."""
        if self._keep_sums and self._spare_sums is None:
            self._spare_sums = SumsReservation(n_lesions, self.connectome.n_voxels)

    def _statistics(self, sums, row: int):
        n = sums.n if sums.missing is None else sums.n[row]
        return summarise(sums.shift[row], sums.sum_dz[row], sums.sum_dz2[row], n, self.compute_p_map)

    def _volume(self, values: np.ndarray, fill: float) -> np.ndarray:
        """Per-voxel ``values`` as a float32 volume of the connectome's mask grid, ``fill``
        outside the mask (compiled: it runs on the worker threads without the GIL). The
        volume is in Fortran order, NIfTI's order on disk, so writing it copies nothing."""
        volume = np.empty(self.connectome.mask_shape, dtype=np.float32, order="F")
        kernels.scatter(values, self.connectome.flat_indices_fortran, np.float32(fill), volume.reshape(-1, order="F"))
        return volume

    def _results(self, lesion: PreparedLesion, used: np.ndarray, statistics, excluded: int) -> dict[str, Result]:
        label = self.connectome_label
        maps = {"z": (statistics.z, "Mean Fisher z across connectome subjects", "")}
        maps["r"] = (statistics.r, "tanh of the mean Fisher z (average correlation)", "")
        maps["t"] = (statistics.t, "One-sample t of Fisher z across connectome subjects", "")
        if statistics.p is not None:
            maps["p"] = (statistics.p, "Two-sided p of t (n-1 degrees of freedom)", "")
            maps["pfdr"] = (statistics.p_fdr, "Benjamini-Hochberg FDR-adjusted p over the brain mask", "")
        if self.t_threshold is not None:
            maps["tthresholded"] = (
                (np.abs(statistics.t) > self.t_threshold).astype(np.float32),
                f"1 where |t| > {self.t_threshold:g}",
                "",
            )
        metadata = {
            "Connectome": self.connectome.name,
            "Method": self.method,
            "NumberOfSubjects": self.connectome.n_subjects,
            "FisherZClip": R_MAX,
        }
        results: dict[str, Result] = {}
        for stat, (values, description, units) in maps.items():
            fill = _P_FILL if stat in ("p", "pfdr") else _FILL
            results[f"{self.connectome.name}_{stat}"] = VoxelMap(
                name=stat,
                data=self._volume(values, fill),
                affine=self.connectome.mask_affine,
                space=self.connectome.space,
                resolution=self.connectome.resolution,
                description=description,
                units=units,
                metadata=metadata,
                desc=f"flnm{label}{stat}",
                dense=stat != "tthresholded",
            )
        t_values = statistics.t
        peak = float(t_values[np.argmax(np.abs(t_values))])
        scalars = {
            "n_subjects": (self.connectome.n_subjects - excluded, "subjects", "Connectome subjects with a valid seed"),
            "lesion_voxels_used": (int(used.size), "voxels", "Lesion voxels forming the seed"),
            "lesion_fraction_in_mask": (lesion.fraction_inside, "", "Fraction of the lesion inside the connectome mask"),
            "peak_t": (peak, "", "t value of largest magnitude"),
        }
        if statistics.p_fdr is not None:
            significant = int(np.sum(statistics.p_fdr < self.fdr_alpha))
            scalars["n_voxels_fdr_significant"] = (significant, "voxels", f"Voxels with FDR p < {self.fdr_alpha:g}")
        for key, (value, units, description) in scalars.items():
            results[f"{self.connectome.name}_{key}"] = ScalarMetric(key, value, units, description)
        return results

    def _progress(self, what: str) -> ProgressLog:
        return ProgressLog(log, f"{self.connectome.name} {what}", "subjects")


#: Values of the maps outside the connectome's brain mask: 1 in p maps, 0 in the others.
_P_FILL, _FILL = 1.0, 0.0


def _ordered_map(pool: ThreadPoolExecutor, function, items, ahead: int) -> Iterator:
    """``function`` over ``items`` on ``pool``, results in order, with at most
    ``ahead`` results waiting (``pool.map`` would compute them all at once)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _who(subject: SubjectData) -> str:
    return subject.metadata.get("source_path") or repr(subject)
