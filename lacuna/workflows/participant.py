"""The participant level: analyse each selected mask and write its derivatives."""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import os
import signal
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from lacuna.analysis.base import Analysis, BatchAnalysis, voxel_maps_to_subject
from lacuna.analysis.regional.aggregation import ParcelAggregation
from lacuna.analysis.regional.damage import RegionalDamage
from lacuna.workflows import messages
from lacuna.workflows.config import RunConfig
from lacuna.core.entities import mask_label, parse_entities
from lacuna.workflows.name_check import NameCheck
from lacuna.workflows.warm_up import AnalysesAhead, MaskReader, WarmUp
from lacuna.workflows.mask_selection import (
    MaskSource,
    check_bids_dataset,
    check_writable_folder,
    mask_sources,
    select_masks,
    source_of,
)
from lacuna.core.errors import BidsError, ValidationError
from lacuna.core.provenance import InputFile, ProvenanceStep, forget_resolved_folders
from lacuna.core.subject import SubjectData
from lacuna.core.atomic import remove_stale_temporaries
from lacuna.core.memory import release_free_heap
from lacuna.core.process_pool import process_pool
from lacuna.core.threads import single_threaded_libraries, worker_threads
from lacuna.core.timing import PhaseTimes, Progress
from lacuna.bids.dataset import initialise_derivatives
from lacuna.bids.derivatives import export_bids_derivatives, outputs_complete, write_voxel_maps
from lacuna.bids.inputs import declared_space
from lacuna.bids.citation import write_citation
from lacuna.bids.integrity import clear_crash_record, write_crash_record
from lacuna.bids.names import MaskOutputs

log = logging.getLogger(__name__)

RUN_STEP = "participant"
_MASK_BYTES = 182 * 218 * 182  # a 1 mm mask held in memory (uint8)


@dataclass
class MaskOutcome:
    """What happened to one mask."""

    path: Path
    status: str  # "done", "skipped" or "failed"
    message: str = ""
    seconds: float = 0.0
    details: str = ""  # the traceback of a failure (kept in its crash record)


@dataclass
class ParticipantSummary:
    """Outcomes of a participant-level run."""

    outcomes: list[MaskOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[MaskOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def text(self) -> str:
        """Human-readable summary printed at the end of the run."""
        lines = [
            messages.PARTICIPANT_SUMMARY.format(
                total=len(self.outcomes),
                done=self.count("done"),
                skipped=self.count("skipped"),
                failed=self.count("failed"),
            )
        ]
        lines += [f"  FAILED {o.path.name}: {o.message}" for o in self.failed]
        return "\n".join(lines)


def build_analyses(config: RunConfig) -> list[Analysis]:
    """The per-mask analyses (parcellations resolved and fetched once)."""
    analyses: list[Analysis] = []
    for name in config.analyses:
        if name == "RegionalDamage":
            analyses.append(RegionalDamage(parcellations=list(config.atlases), atlas_dir=config.atlas_dir))
        elif name == "FunctionalNetworkMapping":
            if not config.functional_connectomes:
                raise ValidationError(messages.NO_FUNCTIONAL_CONNECTOME)
        else:
            raise ValueError(f"unknown analysis {name!r}")
    return analyses


def build_batch_analyses(config: RunConfig) -> list[BatchAnalysis]:
    """Analyses that map all lesions of a group together (one connectome pass, or one
    tractogram index, each). Each family is imported only when asked for: functional
    mapping loads compiled kernels (half a second), which other runs do not need."""
    batch: list[BatchAnalysis] = []
    if config.functional_connectomes:
        from lacuna.analysis.functional.network_mapping import FunctionalNetworkMapping

        batch += [
            FunctionalNetworkMapping(
                connectome, method=config.flnm_method, memory_budget_gb=config.mem_gb, return_in_input_space=False
            )
            for connectome in config.functional_connectomes
        ]
    if config.tractograms:
        from lacuna.analysis.structural.network_mapping import StructuralNetworkMapping

        batch += [
            StructuralNetworkMapping(
                connectome,
                parcellations=list(config.atlases),
                atlas_dir=config.atlas_dir,
                memory_budget_gb=config.mem_gb,
                return_in_input_space=False,
            )
            for connectome in config.tractograms
        ]
    return batch


def follow_up_analyses(config: RunConfig, analysis: BatchAnalysis) -> list[Analysis]:
    """Per-mask analyses run on a batch analysis' results before they are written:
    parcel-level means of functional t and z maps, per atlas."""
    if analysis.name == "FunctionalNetworkMapping":
        return [
            ParcelAggregation(
                f"{analysis.name}.{analysis.connectome.name}_{stat}",
                parcellations=list(config.atlases),
                method="mean",
                atlas_dir=config.atlas_dir,
            )
            for stat in ("t", "z")
        ]
    return []


def run_fingerprint(config: RunConfig, analyses: list[Analysis]) -> dict:
    """What decides whether existing outputs are still valid for this run."""
    return {
        "mask_space": config.mask_space,
        "mask_transform": InputFile.from_path("mask_transform", config.mask_transform).sha256 if config.mask_transform else None,
        "output_space": config.output_space,
        "analyses": [
            {
                "name": analysis.name,
                "parameters": analysis.parameters(),
                "inputs": {f.role: f.sha256 or f"{f.size_bytes}:{f.modified}" for f in analysis.input_files()},
            }
            for analysis in analyses
        ],
    }


def prepare_mask(path: Path, config: RunConfig, analyses: list[Analysis], fingerprint: dict) -> SubjectData | MaskOutcome:
    """Load a mask and run the per-mask analyses; an outcome when skipped or failed."""
    start = time.perf_counter()
    try:
        source = source_of(path, mask_sources(config))
        subject = SubjectData.from_nifti(path, space=_declared_space(path, config, source), transform=config.mask_transform)
        if not subject.subject_id:
            raise BidsError(f"{path}: no sub- entity in the file name")
        subject.metadata["bids_relpath"] = path.relative_to(source.root).as_posix()
        subject.metadata["bids_dataset"] = source.link
        remove_stale_temporaries(config.output_dir / MaskOutputs.for_subject(subject).folder)
        if not config.overwrite and outputs_complete(config.output_dir, subject, RUN_STEP, fingerprint):
            return MaskOutcome(path, "skipped", messages.SKIPPED_COMPLETE, time.perf_counter() - start)
        for analysis in analyses:
            subject = analysis.run(subject)
        return subject
    except Exception as exc:  # isolate every failure to its mask
        return _failure(path, exc, start)


def _declared_space(path: Path, config: RunConfig, source: MaskSource) -> str | None:
    """``--mask-space``, else what the file name or its sidecars declare (the BIDS
    inheritance principle, e.g. a dataset-level ``label-lesion_mask.json``); None leaves
    it to the grid."""
    return config.mask_space or declared_space(path, source.root)


def finish_mask(
    subject: SubjectData, config: RunConfig, fingerprint: dict, start: float, analyses: AnalysesAhead | None = None
) -> MaskOutcome:
    """Run (or take the results of) the per-mask ``analyses`` left until now (see
    :func:`_run_with_batch`), record the run in provenance and export every output of
    the mask."""
    path = Path(subject.metadata["source_path"])
    try:
        if analyses is not None:
            subject = analyses.run(subject)
        step = ProvenanceStep(name=RUN_STEP, kind="run", parameters=fingerprint)
        subject.provenance.append(step.finish())
        export_bids_derivatives(subject, config.output_dir, overwrite=True)
        return MaskOutcome(path, "done", "", time.perf_counter() - start)
    except Exception as exc:
        return _failure(path, exc, start)


def process_mask(path: Path, config: RunConfig, analyses: list[Analysis], fingerprint: dict) -> MaskOutcome:
    """Load, analyse and export one mask; every error is caught and reported."""
    start = time.perf_counter()
    prepared = prepare_mask(path, config, analyses, fingerprint)
    if isinstance(prepared, MaskOutcome):
        return prepared
    return finish_mask(prepared, config, fingerprint, start)


def _failure(path: Path, exc: Exception, start: float) -> MaskOutcome:
    details = "".join(traceback.format_exception(exc))
    log.debug("failure on %s:\n%s", path, details)
    message = str(exc) if str(path) in str(exc) else f"{path.name}: {exc}"
    return MaskOutcome(path, "failed", f"{type(exc).__name__}: {message}", time.perf_counter() - start, details)


# Worker state for parallel runs: analyses are built once per process.
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WORKER: dict = {}


def _die_with_parent() -> None:
    """Make this worker exit when the main process dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            return
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _init_worker(config: RunConfig, log_level: int, fingerprint: dict) -> None:
    _die_with_parent()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _WORKER.update(config=config, analyses=build_analyses(config), fingerprint=fingerprint)
    _WORKER["library_threads"] = single_threaded_libraries()  # held for the worker's life


def _worker_process(path: Path) -> MaskOutcome:
    return process_mask(path, _WORKER["config"], _WORKER["analyses"], _WORKER["fingerprint"])


def _worker_prepare(path: Path) -> SubjectData | MaskOutcome:
    return prepare_mask(path, _WORKER["config"], _WORKER["analyses"], _WORKER["fingerprint"])


def run_participant(config: RunConfig) -> ParticipantSummary:
    """Run the participant level.

    Raises
    ------
    BidsError
        If the dataset is unusable or no mask is selected.
    """
    times = PhaseTimes()
    forget_resolved_folders()  # links may have changed since an earlier run in this process
    skipped_folders = {p for p in (config.output_dir, config.work_dir) if p}
    name_check = NameCheck(config.bids_dir, skipped_folders, enabled=not config.skip_bids_validation)
    with WarmUp() as warm_up, name_check:
        with times.phase("dataset, atlases and connectomes"):
            check_bids_dataset(config.bids_dir, config.output_dir)
            sources = mask_sources(config)
            masks = select_masks(config, sources)
            log.info("selected %d mask(s)", len(masks))
            for folder in (config.output_dir, config.work_dir):
                if folder:
                    check_writable_folder(folder)
            analyses = build_analyses(config)  # resolves (and downloads) atlases once, up front
            warm_up.analyses(analyses)
            batch = build_batch_analyses(config)
            warm_up.follow_ups(batch, [follow_up_analyses(config, analysis) for analysis in batch])
            fingerprint = run_fingerprint(config, analyses + batch)
            initialise_derivatives(
                config.output_dir, source_dir=config.bids_dir, linked={s.link: s.root for s in sources[1:]}
            )
            write_citation(config.output_dir, analyses + batch)
        summary = ParticipantSummary()
        masks, duplicates = _split_duplicate_outputs(masks)
        summary.outcomes.extend(duplicates)
        # Lacuna parallelises the work itself; the libraries' own thread pools would
        # only compete with its threads (and OpenBLAS's spin for a while after each call).
        with single_threaded_libraries(), _mask_pool(config, len(masks), fingerprint) as pool:
            if batch:  # the file names are checked during the first pass (see NameCheck)
                _run_with_batch(config, masks, analyses, batch, fingerprint, pool, summary, times, name_check.start)
            else:
                name_check.start()
                _run_per_mask(config, masks, analyses, fingerprint, pool, summary, times)
    summary.outcomes.sort(key=lambda o: str(o.path))
    _record_outcomes(config, sources, summary.outcomes)
    log.debug("where the time went (phases on background threads overlap the others):")
    times.log(log)
    return summary


@contextmanager
def _mask_pool(config: RunConfig, n_masks: int, fingerprint: dict):
    """Worker processes for per-mask work (None when running in this process)."""
    if config.nprocs <= 1 or n_masks <= 1:
        yield None
        return
    initargs = (config, logging.getLogger().getEffectiveLevel(), fingerprint)
    with process_pool(min(config.nprocs, n_masks), _init_worker, initargs) as pool:
        yield pool


def _run_per_mask(config, masks, analyses, fingerprint, pool, summary, times) -> None:
    """Masks analysed and exported one by one (in parallel with workers)."""
    if pool is None:
        outcomes = (process_mask(path, config, analyses, fingerprint) for path in masks)
    else:
        outcomes = (future.result() for future in as_completed([pool.submit(_worker_process, p) for p in masks]))
    log_outcome = _OutcomeLog(len(masks))
    with times.phase("masks (analyses and outputs)"):
        for outcome in outcomes:
            log_outcome(outcome)
            summary.outcomes.append(outcome)


def _run_with_batch(config, masks, analyses, batch, fingerprint, pool, summary, times, before_pass=lambda: None) -> None:
    """Masks in memory-sized groups: one connectome pass per group and batch analysis
    for all its lesions, the per-mask analyses on a background thread during it. When
    the memory budget allows two groups of masks, the next group's are read on a background
    thread once this group's pass is done (during the pass, when memory peaks, they
    would add to it). Each mask is finished (maps compressed, tables and provenance
    written) as soon as its last batch analysis has its maps: on that analysis' worker
    threads where it has some (functional mapping: statistics, maps and files of a
    lesion on one thread, lesions in parallel), else on background threads while the
    next lesions are computed; nothing holds the maps of more than a few masks.
    ``before_pass`` is called before each group's pass: Python work started there (the
    file-name report) runs while the pass leaves the GIL free, instead of holding up
    the start."""
    # The per-mask analyses (regional damage) are not needed by a pass: in this process
    # they run on a background thread during the pass (worker processes run them as
    # they read), so that the first pass starts as soon as the masks are read.
    deferred = AnalysesAhead(analyses if pool is None else [])
    per_pass = min(analysis.lesions_per_pass(extra_bytes=_MASK_BYTES) for analysis in batch)
    # Reading the next group ahead holds two groups of masks: only when the memory
    # budget allows it without smaller groups (more passes over a connectome larger
    # than the page cache would cost far more than reading masks in between).
    read_ahead = per_pass == min(analysis.lesions_per_pass(extra_bytes=2 * _MASK_BYTES) for analysis in batch)
    follow_ups = [follow_up_analyses(config, analysis) for analysis in batch]
    log_outcome = _OutcomeLog(len(masks), in_groups=True)

    def record(outcome: MaskOutcome) -> None:
        log_outcome(outcome)
        summary.outcomes.append(outcome)

    def prepare_group(group: list[Path]) -> tuple[float, list[SubjectData | MaskOutcome]]:
        start = time.perf_counter()
        if pool is None:
            prepared = [prepare_mask(path, config, [], fingerprint) for path in group]
        else:
            prepared = list(pool.map(_worker_prepare, group))
        times.add("reading masks (background thread)", time.perf_counter() - start)
        return start, prepared

    groups = _balanced_groups(masks, per_pass) if masks else []
    finisher = _BackgroundFinisher(config, fingerprint, times, deferred)
    with ExitStack() as buffers, deferred, finisher, MaskReader(groups, prepare_group, read_ahead) as reader:
        for analysis in batch:  # their memory, from one group's pass to the next
            buffers.enter_context(analysis.buffers_kept())
            if groups:  # made in the background while the masks are read
                analysis.reserve_pass(len(groups[0]))
        with times.phase("loading compiled kernels"):  # while the first masks are read
            for analysis in batch:
                analysis.warm_up()
        for _ in groups:
            with times.phase("waiting for masks"):
                start, prepared = reader.take()
            subjects = []
            for item in prepared:
                if isinstance(item, MaskOutcome):
                    record(item)
                else:
                    subjects.append(item)
            # The last masks of the previous group are written meanwhile (a few tens of
            # milliseconds): their maps are freed before the pass maps its subjects.
            for outcome in finisher.drain():
                record(outcome)
            log_outcome.group_done()
            release_free_heap()  # before the pass maps its subjects (see its docs)
            before_pass()
            deferred.start(subjects)
            for position, analysis in enumerate(batch):
                last = position == len(batch) - 1
                finish = finisher.finish_now(start) if last else None
                kept = []
                for subject in _map_batch(config, analysis, follow_ups[position], subjects, record, times, finish):
                    reader.read_next()  # the pass is done
                    if isinstance(subject, MaskOutcome):  # finished on the analysis' threads
                        record(subject)
                    elif last:
                        for outcome in finisher.submit(subject, start):
                            record(outcome)
                    else:
                        with times.phase("writing maps"):
                            kept.append(write_voxel_maps(subject, config.output_dir, analysis.name))
                subjects = kept
        for outcome in finisher.drain():
            record(outcome)
    for analysis in batch:
        timings = getattr(analysis, "last_timing", None)
        if timings:
            times.add("connectome pass", sum(timing.seconds for timing in timings))


def _balanced_groups(masks: list[Path], most: int) -> list[list[Path]]:
    """``masks`` cut into the fewest groups of at most ``most``, of near-equal sizes."""
    n_groups = max(1, -(-len(masks) // max(1, most)))
    size = -(-len(masks) // n_groups)
    return [masks[first : first + size] for first in range(0, len(masks), size)]


def _map_batch(config, analysis, follow_ups, subjects, record, times, finish=None) -> Iterator[SubjectData | MaskOutcome]:
    """Map a group's lesions with one batch analysis; yield each subject with its
    results (and the follow-up parcel tables) as soon as it is ready, and ``record`` the
    failure of each lesion that cannot be mapped. With ``finish`` (subject -> outcome)
    and an analysis that finishes lesions on its own worker threads, the follow-ups and
    ``finish`` run there, in parallel, and the outcomes are yielded."""
    start = time.perf_counter()

    def completed(subject: SubjectData) -> SubjectData | MaskOutcome:
        try:
            with times.phase("parcel aggregation"):
                for follow_up in follow_ups:
                    subject = follow_up.run(subject)
            if config.output_space == "input":
                with times.phase("maps to the input space"):
                    subject = _maps_to_input_space(subject, analysis.name)
        except Exception as exc:
            return _failure(Path(subject.metadata["source_path"]), exc, start)
        return subject

    def finished(subject: SubjectData) -> MaskOutcome:
        subject = completed(subject)
        return subject if isinstance(subject, MaskOutcome) else finish(subject)

    on_workers = finish is not None and analysis.finishes_on_workers
    outcomes = analysis.iter_batch(subjects, finished) if on_workers else analysis.iter_batch(subjects)
    while True:
        with times.phase(f"{analysis.name} (pass, statistics, maps)"):
            item = next(outcomes, None)
        if item is None:
            return
        index, outcome = item
        if isinstance(outcome, Exception):
            record(_failure(Path(subjects[index].metadata["source_path"]), outcome, start))
            continue
        if not on_workers:
            outcome = completed(outcome)
            if isinstance(outcome, MaskOutcome):
                record(outcome)
                continue
        yield outcome


class _BackgroundFinisher:
    """Finishes masks (:func:`finish_mask`, with the per-mask ``analyses`` left to it)
    on background threads, a few at a time.

    Compression (ISA-L or zlib) and hashing release the GIL, so masks are written on
    all cores while the main thread goes on; :meth:`submit` waits only when more than
    two masks per thread are pending, which bounds the maps held in memory.
    """

    def __init__(self, config: RunConfig, fingerprint: dict, times: PhaseTimes, analyses: AnalysesAhead | None = None):
        self._config, self._fingerprint, self._times, self._analyses = config, fingerprint, times, analyses
        threads = worker_threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lacuna-writer")
        self._limit = 2 * threads
        self._pending: deque = deque()

    def __enter__(self) -> "_BackgroundFinisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True)

    def _finish(self, subject: SubjectData, start: float) -> MaskOutcome:
        began = time.perf_counter()
        outcome = finish_mask(subject, self._config, self._fingerprint, start, self._analyses)
        self._times.add("writing outputs (background threads)", time.perf_counter() - began)
        return outcome

    def finish_now(self, start: float):
        """:func:`finish_mask` on the calling thread (for analyses that finish lesions on
        worker threads of their own), timed with the background writing."""
        return functools.partial(self._finish, start=start)

    def submit(self, subject: SubjectData, start: float) -> list[MaskOutcome]:
        """Queue a mask; returns the outcomes of the masks finished meanwhile."""
        self._pending.append(self._pool.submit(self._finish, subject, start))
        finished = []
        while self._pending and (self._pending[0].done() or len(self._pending) > self._limit):
            with self._times.phase("waiting for writes"):
                finished.append(self._pending.popleft().result())
        return finished

    def drain(self) -> list[MaskOutcome]:
        """Wait for every queued mask; their outcomes."""
        with self._times.phase("waiting for writes"):
            finished = [future.result() for future in self._pending]
        self._pending.clear()
        return finished


class _OutcomeLog:
    """Logs ``[done/total] mask: status (seconds), ETA`` for each mask."""

    def __init__(self, total: int, in_groups: bool = False):
        self._progress = Progress(total, settle_each=not in_groups)

    def group_done(self) -> None:
        """The masks of a group are all logged: later ETAs use the rate so far."""
        self._progress.settle()

    def __call__(self, outcome: MaskOutcome) -> None:
        self._progress.done += 1
        _log_outcome(self._progress.done, self._progress.total, outcome, self._progress.eta_text())


def _maps_to_input_space(subject: SubjectData, analysis_name: str) -> SubjectData:
    """Bring one analysis' voxel maps onto the mask's own space and grid (parcel-level
    results, computed before, are unaffected)."""
    step = next(s for s in reversed(subject.provenance) if s.name == analysis_name)
    moved = voxel_maps_to_subject(subject.results[analysis_name], subject, step)
    new = copy.copy(subject)
    new.results = {**subject.results, analysis_name: moved}
    return new


def _output_key(path: Path) -> tuple:
    entities = parse_entities(path.name)
    label = mask_label(entities) or "lesion"
    mask_desc = entities.get("desc") if entities.get("label") else None  # kept in output names
    return tuple(entities.get(k) for k in ("sub", "ses", "acq", "run")) + (label, mask_desc)


def _record_outcomes(config: RunConfig, sources: list[MaskSource], outcomes: list[MaskOutcome]) -> None:
    """A crash record in ``logs/`` for each failed mask; the record of each mask that now
    succeeded (or was complete) is removed."""
    for outcome in outcomes:
        try:
            if outcome.status == "failed":
                relative = outcome.path.relative_to(source_of(outcome.path, sources).root).as_posix()
                write_crash_record(config.output_dir, outcome.path, relative, outcome.message, outcome.details)
            else:
                clear_crash_record(config.output_dir, outcome.path)
        except OSError as exc:
            log.warning("cannot record the outcome of %s in %s/logs: %s", outcome.path.name, config.output_dir, exc)


def _split_duplicate_outputs(masks: list[Path]) -> tuple[list[Path], list[MaskOutcome]]:
    """Masks with distinct outputs, and failures for those that would collide."""
    first_seen: dict[tuple, Path] = {}
    kept, failed = [], []
    for path in masks:
        other = first_seen.setdefault(_output_key(path), path)
        if other is path:
            kept.append(path)
        else:
            failed.append(MaskOutcome(path, "failed", messages.DUPLICATE_OUTPUT.format(path=path, other=other.name)))
    return kept, failed


def _log_outcome(index: int, total: int, outcome: MaskOutcome, eta: str = "") -> None:
    line = f"[{index}/{total}] {outcome.path.name}: {outcome.status} ({outcome.seconds:.1f} s)"
    if eta:
        line += f", {eta}"
    if outcome.status == "failed":
        log.error("%s — %s", line, outcome.message)
    elif outcome.status == "skipped":
        log.info("%s — %s", line, outcome.message)
    else:
        log.info(line)
