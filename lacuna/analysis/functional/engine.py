"""The streaming engine of functional lesion network mapping.

One pass over the connectome serves a whole chunk of lesions. A background thread maps
(or reads) the connectome subjects and forms every lesion's seed for each of them: the
weighted mean of its voxels' centred timeseries, normalised (T x L). Subjects are then
taken in groups of :func:`group_size`; the brain is cut into voxel blocks spread over
threads, and each block is mapped for the whole group by one compiled call
(:func:`~lacuna.analysis.functional.kernels.map_group`), which works through the block
in parts small enough to stay in the L2 cache. For each part and each subject of the
group:

1. the voxel timeseries are widened to float32 and centred, and their norms taken, in
   one pass over the stored values;
2. one float32 BLAS product gives all lesions' products with the voxels (for a few
   lesions, step 1 forms them directly instead);
3. each product is scaled to Pearson r, clipped to +-:data:`R_MAX` and turned into
   Fisher z, and ``z - shift`` and its square are added to the part's float32 partial
   sums, in one pass.

After the group, the partial sums are folded into float64 running sums. Grouping lets a
part's sums stay in cache across the group's subjects instead of travelling to and from
memory once per subject. The blocks of the next group are queued before those of the
current one finish (each waits only for its own block of the previous group), so the
threads never wait for each other between groups.

Nothing of size (subjects x voxels) is ever held; memory is the running sums and shift
(20 bytes per lesion and voxel), the subjects in flight and small per-thread buffers. A
voxel whose timeseries is constant or holds a non-finite value in a subject, and a seed
that is constant in a subject, are left out of that subject's contribution: the affected
(lesion, voxel) pairs then have fewer subjects, which the statistics account for
(:attr:`FisherZSums.n`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lacuna.analysis.functional import kernels as kernels
from lacuna.analysis.compiled_primitives import blas_sgemm, single_threaded_blas
from lacuna.analysis.functional.t_statistics import benjamini_hochberg, two_sided_p
from lacuna.core.memory import zeros_on_small_pages
from lacuna.core.threads import worker_threads  # noqa: F401 (documented here before)
from lacuna.formats.functional_connectome import FunctionalConnectome

log = logging.getLogger(__name__)

#: Correlations are clipped to +-R_MAX = 1 - 2**-20 (exact in float32 and float64) before
#: arctanh, so r = +-1 gives |z| = 7.28 and never infinity. The same constant is used on
#: every code path.
R_MAX = 1.0 - 2.0**-20

#: Most subjects summed in float32 (per block, in cache) before folding into float64.
MAX_GROUP = 8

#: Up to this many lesions per pass, correlations are formed in one pass over the stored
#: values; beyond, by centring and one float32 matrix product.
DIRECT_MAX_LESIONS = kernels.DIRECT_MAX_LESIONS

#: Bytes of a part's working set (centred timeseries, products, shift and partial sums):
#: about a core's L2 cache on current x86 servers (1-2 MiB; measured best of 0.25-2 MiB).
PART_BYTES = 1 << 20

#: Parts per thread, and most voxels per part, for a single seed (measured best of
#: 18k-64k voxels per part on a 1 MiB L2 cache).
SINGLE_SEED_PARTS = 4
SINGLE_SEED_MAX_PART = 65536

_LIMIT = np.float32(R_MAX)


def part_width(n_lesions: int, n_timepoints: int, n_voxels: int, threads: int) -> int:
    """Voxels per part of a block, a multiple of 16 (one AVX-512 register of float32).

    A single seed is mapped in long parts (about :data:`SINGLE_SEED_PARTS` per thread):
    each timepoint is then read as a long run of memory, which the hardware prefetcher
    follows. A few seeds take :data:`~lacuna.analysis.functional.kernels.DIRECT_PART`
    voxels at a time; more take :data:`PART_BYTES` of working set for the matrix
    product.
    """
    if n_lesions == 1:
        per_part = -(-n_voxels // (SINGLE_SEED_PARTS * threads))
        return int(np.clip(-(-per_part // 16) * 16, 16, SINGLE_SEED_MAX_PART))
    if n_lesions <= DIRECT_MAX_LESIONS:
        return kernels.DIRECT_PART
    per_voxel = 4 * (n_timepoints + 4 * n_lesions + 4)
    return int(np.clip(PART_BYTES // per_voxel // 16 * 16, 16, 1024))


def block_width(n_voxels: int, part: int, threads: int) -> int:
    """Voxels per block (a whole number of parts): about eight blocks per thread, so
    that the threads finish a group together."""
    parts = -(-n_voxels // part)
    return part * max(1, -(-parts // (8 * threads)))


#: Groups of subjects held at a time: one being finished while the next one is mapped.
GROUPS_IN_FLIGHT = 2

#: Subjects the reader prepares ahead of the groups held: the groups being mapped keep
#: the threads busy while it reads, so one is enough (measured: 50 lesions, 30 subjects
#: from the page cache, 1.42 s with one, 1.47 s with two, each ahead mapping 113 MB more).
READ_AHEAD = 1


def group_size(subject_bytes: int, memory_bytes: int) -> int:
    """Subjects per group: up to :data:`MAX_GROUP`, with :data:`GROUPS_IN_FLIGHT` groups
    taking at most ``memory_bytes``."""
    return int(np.clip(memory_bytes // max(GROUPS_IN_FLIGHT * subject_bytes, 1), 1, MAX_GROUP))


@dataclass
class FisherZSums:
    """Running sums of Fisher z over connectome subjects, per lesion and voxel.

    To keep full precision when the spread of z is small compared with its mean (large
    t), the sums are of deviations from a per-pair shift: the z of the first subject.

    Attributes
    ----------
    shift : ndarray (L, V) float32
        z of the first subject (0 where it was invalid).
    sum_dz, sum_dz2 : ndarray (L, V) float64
        Sums of (z - shift) and (z - shift)^2 over the subjects each pair was valid in.
    n_subjects : int
        Subjects folded in.
    missing : ndarray (L, V) int32 or None
        Subjects left out per pair (zero variance / non-finite); None when none were.
    excluded_seeds : ndarray (L,) int
        Subjects in which each seed was constant or non-finite.
    """

    shift: np.ndarray
    sum_dz: np.ndarray
    sum_dz2: np.ndarray
    n_subjects: int = 0
    missing: np.ndarray | None = None
    excluded_seeds: np.ndarray = field(default=None)

    @classmethod
    def zeros(cls, n_lesions: int, n_voxels: int, reuse: "FisherZSums | SumsReservation | None" = None) -> "FisherZSums":
        """Empty sums, their memory faulted in now (see
        :func:`~lacuna.core.memory.zeros_on_small_pages`). With ``reuse`` (the sums of
        an earlier pass, of as many voxels and at least as many lesions, no longer
        read), its memory is zeroed and taken over instead: faulting in fresh pages
        costs seven times as long as zeroing mapped ones (30 ms for 94 MB here), and
        freeing them costs as much again. A :class:`SumsReservation` of such a shape
        is taken as it is (its sums are zero already)."""
        shape = (n_lesions, n_voxels)
        fresh = isinstance(reuse, SumsReservation)
        if fresh:
            reuse = reuse.take()
        if reuse is not None and reuse.shift.shape[1] == n_voxels and reuse.shift.shape[0] >= n_lesions:
            arrays = [array[:n_lesions] for array in (reuse.shift, reuse.sum_dz, reuse.sum_dz2)]
            if not fresh:  # an earlier pass's sums are in them
                for array in arrays:
                    array.fill(0)
            return cls(*arrays, excluded_seeds=np.zeros(n_lesions, dtype=np.int64))
        return cls(
            zeros_on_small_pages(shape, np.float32),
            zeros_on_small_pages(shape, np.float64),
            zeros_on_small_pages(shape, np.float64),
            excluded_seeds=np.zeros(n_lesions, dtype=np.int64),
        )

    @property
    def n(self) -> np.ndarray | int:
        """Subjects contributing to each (lesion, voxel) pair."""
        return self.n_subjects if self.missing is None else self.n_subjects - self.missing

    def count_left_out(self, invalid_seeds: np.ndarray, invalid_voxels: np.ndarray) -> None:
        """Count one subject as missing for the pairs of ``invalid_seeds`` (L bool) and
        of ``invalid_voxels`` (V bool), which added nothing to the sums."""
        if not (invalid_seeds.any() or invalid_voxels.any()):
            return
        if self.missing is None:
            self.missing = np.zeros(self.shift.shape, dtype=np.int32)
        self.missing[invalid_seeds] += 1
        self.missing[np.ix_(np.flatnonzero(~invalid_seeds), np.flatnonzero(invalid_voxels))] += 1
        self.excluded_seeds += invalid_seeds


class SumsReservation:
    """The running sums of a coming pass, made by :meth:`FisherZSums.zeros` on a thread
    of their own as soon as their shape is known: the kernel zeroes their pages (about
    0.15 s for 100 lesions of 235,000 voxels) while the run still loads kernels and reads
    masks, work that holds the GIL and leaves a core idle. Pass it to
    :func:`stream_fisher_z` as ``reuse``."""

    def __init__(self, n_lesions: int, n_voxels: int):
        self.shape = (n_lesions, n_voxels)
        self._made: FisherZSums | BaseException | None = None
        self._thread = threading.Thread(target=self._make, name="lacuna-sums", daemon=True)
        self._thread.start()

    def _make(self) -> None:
        try:
            self._made = FisherZSums.zeros(*self.shape)
        except BaseException as exc:  # e.g. MemoryError: raised where the sums are taken
            self._made = exc

    def take(self) -> FisherZSums:
        """The sums (waits until they are made; raises what making them raised)."""
        self._thread.join()
        made, self._made = self._made, None
        if isinstance(made, BaseException):
            raise made
        if made is None:
            raise RuntimeError("the reserved sums were taken already")
        return made


@dataclass
class PassTiming:
    """Where a pass over the connectome spent its time."""

    seconds: float = 0.0
    waiting_for_data: float = 0.0
    bytes_read: int = 0
    flops: float = 0.0


@dataclass(frozen=True)
class SeedDefinition:
    """Seed weights of a chunk of lesions: lesion l averages ``columns[l]``."""

    columns: list[np.ndarray]
    weights: list[np.ndarray]

    @classmethod
    def means(cls, columns: list[np.ndarray]) -> "SeedDefinition":
        """Plain means over each lesion's columns."""
        return cls(columns, [np.full(c.size, 1.0 / c.size) for c in columns])

    @property
    def n_lesions(self) -> int:
        return len(self.columns)

    @cached_property
    def _gather_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All seeds' columns in voxel order, with the seed and weight of each."""
        columns = np.concatenate(self.columns)
        owners = np.repeat(np.arange(self.n_lesions), [c.size for c in self.columns])
        weights = np.concatenate(self.weights).astype(np.float64)
        order = np.argsort(columns, kind="stable")
        return columns[order], owners[order], weights[order]

    def seeds(self, timeseries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Seeds as rows (L x T float32, centred and unit-norm) and the mask of invalid
        (constant or non-finite) seeds, whose rows are 0. A seed is the weighted sum of
        its voxels' raw timeseries, summed in float64, then centred (which equals the
        weighted sum of the centred timeseries)."""
        columns, owners, weights = self._gather_plan
        sums = np.empty((timeseries.shape[0], self.n_lesions))
        kernels.weighted_sums(_stored(timeseries), columns, owners, weights, sums)
        sums -= sums.mean(axis=0)
        seeds = sums.astype(np.float32)
        invalid = normalise_columns(seeds)
        return np.ascontiguousarray(seeds.T), invalid


def centred_columns(timeseries: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The voxel ``columns`` of ``timeseries`` (T x V, float16 or float32) as float32
    columns with their means removed (T x n)."""
    gathered = np.empty((timeseries.shape[0], columns.size), dtype=np.float32)
    kernels.gather_columns(_stored(timeseries), columns, gathered)
    gathered -= gathered.mean(axis=0, dtype=np.float64).astype(np.float32)
    return gathered


def normalise_columns(data: np.ndarray) -> np.ndarray:
    """Scale every column of ``data`` to unit norm, in place.

    Returns the boolean mask of invalid columns (zero norm or non-finite values), which
    are set to 0.
    """
    norms = np.sqrt(np.einsum("ij,ij->j", data, data))
    invalid = ~(norms > 0) | ~np.isfinite(norms)
    data *= np.divide(1.0, norms, out=np.zeros_like(norms), where=~invalid)
    if invalid.any():
        data[:, invalid] = 0.0
    return invalid


@dataclass
class _Group:
    """Subjects mapped together, as :func:`~lacuna.analysis.functional.kernels.map_group`
    takes them."""

    timeseries: list[np.ndarray]  # (T, V) C-contiguous float32, or uint16 holding float16 bits
    addresses: np.ndarray  # (G,) int64: where each subject's data starts
    seeds: np.ndarray  # (G, L, T) float32
    valid_seeds: np.ndarray  # (G, L) bool
    first: bool  # the first group: its first subject sets the shift

    @classmethod
    def of(cls, subjects: list, first: bool) -> "_Group":
        """A group from ``(timeseries, (seeds, invalid seeds))`` pairs."""
        stored = [_stored(timeseries) for timeseries, _ in subjects]
        return cls(
            stored,
            np.array([timeseries.ctypes.data for timeseries in stored], dtype=np.int64),
            np.stack([seeds for _, (seeds, _) in subjects]),
            ~np.stack([invalid for _, (_, invalid) in subjects]),
            first,
        )

    def __len__(self) -> int:
        return len(self.timeseries)


class _BlockMapper:
    """Maps one voxel block for every subject of a group; buffers are per thread."""

    def __init__(self, sums: FisherZSums, n_timepoints: int, threads: int):
        self.totals = (sums.shift, sums.sum_dz, sums.sum_dz2)
        self.n_timepoints = n_timepoints
        self.n_lesions, n_voxels = sums.shift.shape
        self.part_width = part_width(self.n_lesions, n_timepoints, n_voxels, threads)
        self.sgemm = blas_sgemm()
        self.local = threading.local()

    def __call__(self, group: _Group, block: slice) -> np.ndarray:
        """Fold the group's Fisher z for ``block`` into the sums; returns the invalid
        voxels of the block per subject (len(group) x width bool)."""
        workspace = getattr(self.local, "workspace", None)
        if workspace is None:
            workspace = self.local.workspace = kernels.new_workspace(self.n_timepoints, self.n_lesions, self.part_width)
        invalid = np.empty((len(group), block.stop - block.start), dtype=bool)
        kernels.map_group(
            group.timeseries[0],
            group.addresses,
            group.seeds,
            group.valid_seeds,
            block.start,
            block.stop,
            group.first,
            _LIMIT,
            self.sgemm,
            self.totals,
            workspace,
            invalid,
        )
        return invalid


def _groups(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive groups of ``items`` (``(timeseries, prepared)`` pairs): 1, 2, 4, ...
    up to ``size`` items, so that the work starts as soon as the first subject is read;
    a group never mixes stored types."""
    group: list = []
    target = 1
    for item in items:
        if group and item[0].dtype != group[0][0].dtype:
            yield group
            group = []
        group.append(item)
        if len(group) == target:
            yield group
            group = []
            target = min(2 * target, size)
    if group:
        yield group


def stream_fisher_z(
    connectome: FunctionalConnectome,
    seeds: SeedDefinition,
    progress: Callable[[int, int, float], None] | None = None,
    memory_bytes: int = 1 << 30,
    reuse: FisherZSums | SumsReservation | None = None,
) -> tuple[FisherZSums, PassTiming]:
    """One pass over ``connectome`` accumulating Fisher-z sums for every seed.

    Parameters
    ----------
    connectome : FunctionalConnectome
        The connectome to stream.
    seeds : SeedDefinition
        Which voxels (and weights) form each lesion's seed.
    progress : callable, optional
        Called as ``progress(done, total, seconds)`` after each group of subjects.
    memory_bytes : int
        Memory for the subjects in flight; sets the group size.
    reuse : FisherZSums or SumsReservation, optional
        Sums of an earlier pass whose memory the new sums may take over, or sums
        reserved for this pass (see :meth:`FisherZSums.zeros`).
    """
    n_lesions, n_voxels = seeds.n_lesions, connectome.n_voxels
    n_timepoints = connectome.files[0].n_timepoints
    sums = FisherZSums.zeros(n_lesions, n_voxels, reuse)
    timing = PassTiming()
    threads = worker_threads()
    mapper = _BlockMapper(sums, n_timepoints, threads)
    width = block_width(n_voxels, mapper.part_width, threads)
    blocks = [slice(start, min(start + width, n_voxels)) for start in range(0, n_voxels, width)]
    size = group_size(n_timepoints * n_voxels * max(f.dtype.itemsize for f in connectome.files), memory_bytes)
    started = time.perf_counter()
    subjects = connectome.iter_subjects(prefetch=READ_AHEAD, prepare=seeds.seeds, hold=GROUPS_IN_FLIGHT * size)

    def fold(mapping: _MappingGroup) -> None:
        """Wait for a group's blocks, then count what it left out."""
        invalid_voxels = np.concatenate([future.result() for future in mapping.blocks], axis=1)
        for valid_seeds, invalid in zip(mapping.group.valid_seeds, invalid_voxels):
            sums.count_left_out(~valid_seeds, invalid)
            sums.n_subjects += 1
            timing.flops += 2.0 * n_timepoints * n_lesions * n_voxels
        timing.bytes_read += sum(timeseries.nbytes for timeseries in mapping.group.timeseries)
        if progress:
            progress(sums.n_subjects, connectome.n_subjects, time.perf_counter() - started)

    # Threads share the cores; BLAS must not spawn its own threads inside each of them.
    with ThreadPoolExecutor(max_workers=threads) as pool, single_threaded_blas():
        mapping: _MappingGroup | None = None
        waited = time.perf_counter()
        for members in _groups(subjects, size):
            timing.waiting_for_data += time.perf_counter() - waited
            group = _Group.of(members, first=mapping is None)
            del members
            earlier = mapping.blocks if mapping else [None] * len(blocks)
            queued = [pool.submit(_map_after, before, mapper, group, block) for before, block in zip(earlier, blocks)]
            started_group = _MappingGroup(group, queued)
            if mapping:
                fold(mapping)  # while the threads go on with the next group
            mapping = started_group
            waited = time.perf_counter()
        if mapping:
            fold(mapping)
        del mapping  # release the subjects (and their file mappings)
    timing.seconds = time.perf_counter() - started
    return sums, timing


@dataclass
class _MappingGroup:
    """A group whose blocks have been handed to the threads."""

    group: _Group
    blocks: list[Future]  # each gives the block's invalid voxels per subject


def _map_after(before: Future | None, mapper: _BlockMapper, group: _Group, block: slice) -> np.ndarray:
    """Map ``block`` for ``group`` once the previous group is done with that block.

    The sums of a block are folded group after group, so the next group's blocks can
    be queued before the last blocks of the previous one finish: the threads never wait
    for each other at the end of a group. (Tasks start in the order they were queued,
    so ``before`` has started, or finished, by the time this one starts.)
    """
    if before is not None:
        before.result()
    return mapper(group, block)


def _stored(timeseries: np.ndarray) -> np.ndarray:
    """The C-contiguous, read-only array the kernels take: float32 as is, float16 as its
    bits (uint16)."""
    stored = np.ascontiguousarray(timeseries)
    stored = stored.view(np.uint16) if stored.dtype == np.float16 else stored.view()
    stored.flags.writeable = False  # one compiled type for every subject
    return stored


@dataclass
class GroupStatistics:
    """Across-subject statistics of Fisher z of one lesion, per voxel (float32)."""

    z: np.ndarray
    r: np.ndarray
    t: np.ndarray
    p: np.ndarray | None
    p_fdr: np.ndarray | None
    undefined_t: np.ndarray


def summarise(shift: np.ndarray, sum_dz: np.ndarray, sum_dz2: np.ndarray, n, compute_p: bool = True) -> GroupStatistics:
    """Mean z, r = tanh(mean z), one-sample t, two-sided p (n-1 df) and BH-FDR p of one
    lesion.

    Parameters
    ----------
    shift : ndarray (V,)
        Per-voxel shift the sums are taken around (see :class:`FisherZSums`).
    sum_dz, sum_dz2 : ndarray (V,)
        Sums of (z - shift) and (z - shift)^2 over subjects.
    n : int or ndarray (V,)
        Subjects contributing to each voxel.
    compute_p : bool
        Also compute p and FDR-adjusted p.

    Notes
    -----
    Where the standard deviation of z is 0 (or fewer than 2 subjects contribute), t is
    undefined: it is set to 0 and p to 1 there, and the voxels are flagged in
    ``undefined_t``. FDR adjustment (Benjamini-Hochberg) runs over the brain-mask voxels.
    """
    counts = np.ascontiguousarray(n, dtype=np.float64).reshape(-1)
    mean = np.empty(sum_dz.shape, dtype=np.float32)
    t = np.empty(sum_dz.shape, dtype=np.float32)
    abs_t = np.empty(sum_dz.shape)
    defined = np.empty(sum_dz.shape, dtype=bool)
    kernels.t_statistics(
        np.ascontiguousarray(shift, dtype=np.float32),
        np.ascontiguousarray(sum_dz, dtype=np.float64),
        np.ascontiguousarray(sum_dz2, dtype=np.float64),
        counts,
        mean,
        t,
        abs_t,
        defined,
    )
    p = p_fdr = None
    if compute_p:
        df = counts - 1 if counts.size > 1 else float(counts[0] - 1)
        if defined.all():
            p = two_sided_p(abs_t, df)
        else:
            p = np.ones_like(abs_t)
            p[defined] = two_sided_p(abs_t[defined], df if counts.size == 1 else df[defined])
        p_fdr = benjamini_hochberg(p)
    return GroupStatistics(
        z=mean,
        r=np.tanh(mean),
        t=t,
        p=None if p is None else p.astype(np.float32),
        p_fdr=None if p_fdr is None else p_fdr.astype(np.float32),
        undefined_t=~defined,
    )


def pini_selection(
    connectome: FunctionalConnectome,
    columns: list[np.ndarray],
    percentile: float,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[np.ndarray]:
    """Voxels of each lesion kept by the PINI rule, from one pass over all subjects.

    For each lesion, the correlation matrices of its voxels' timeseries are summed over
    every connectome subject (each subject standardised on its own, so all weigh
    equally); the first principal component is the leading eigenvector of that sum. A
    voxel is kept when the absolute value of its loading is at least the
    ``percentile``-th percentile of the lesion's absolute loadings. Because the sum runs
    over all subjects of all batch files, the selection does not depend on how the
    connectome is split into files.
    """
    totals = [np.zeros((len(c), len(c))) for c in columns]
    flat = np.concatenate(columns)
    bounds = np.cumsum([0] + [len(c) for c in columns])
    started = time.perf_counter()
    done = 0
    for timeseries in connectome.iter_subjects():
        standardised = centred_columns(timeseries, flat)
        normalise_columns(standardised)
        for total, first, last in zip(totals, bounds[:-1], bounds[1:]):
            block = standardised[:, first:last]
            total += block.T @ block
        done += 1
        if progress:
            progress(done, connectome.n_subjects, time.perf_counter() - started)
    kept = []
    for total, cols in zip(totals, columns):
        if len(cols) == 1:
            kept.append(cols)
            continue
        _, vectors = np.linalg.eigh(total)
        loadings = np.abs(vectors[:, -1])
        kept.append(cols[loadings >= np.percentile(loadings, percentile)])
    return kept
