"""The streaming engine of functional lesion network mapping.

One pass over the connectome serves a whole chunk of lesions. For each connectome
subject (timeseries ``X``, T x V, read by a background thread while the previous subject
is computed):

1. every lesion's seed is the weighted mean of its voxels' centred timeseries, formed
   at once for all lesions from the gathered lesion columns (T x L), then normalised;
2. the brain is cut into voxel blocks spread over threads; for each block the voxel
   timeseries are converted to float32, centred and normalised while in cache, one
   float32 matrix product ``seeds.T @ block`` gives all lesions' Pearson r for the block,
   and Fisher z = arctanh(clip(r, -R_MAX, R_MAX)) and z^2 are added to float32 partial
   sums, which are folded into float64 running sums every :data:`FLUSH_EVERY` subjects.

Nothing of size (subjects x voxels) is ever held; memory is the running sums (24 bytes
per lesion and voxel) plus small per-thread buffers. A voxel whose timeseries has zero
variance or a non-finite value in a subject, and a seed that is constant in a subject,
are left out of that subject's contribution: the affected (lesion, voxel) pairs then have
fewer subjects, which the statistics account for (:attr:`FisherZSums.n`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from lacuna.io.functional_connectome import FunctionalConnectome

log = logging.getLogger(__name__)

#: Correlations are clipped to +-R_MAX = 1 - 2**-20 (exact in float32 and float64) before
#: arctanh, so r = +-1 gives |z| = 7.28 and never infinity. The same constant is used on
#: every code path.
R_MAX = 1.0 - 2.0**-20

#: Subjects summed in float32 before folding into the float64 running sums.
FLUSH_EVERY = 16


def worker_threads() -> int:
    """Threads for the per-block work: ``$LACUNA_NUM_THREADS`` or the usable CPUs."""
    value = os.environ.get("LACUNA_NUM_THREADS")
    return max(1, int(value)) if value else max(1, len(os.sched_getaffinity(0)))


def block_size(n_lesions: int, n_timepoints: int) -> int:
    """Voxels per block so that a block's timeseries and correlations stay in cache."""
    per_voxel = 4 * (n_timepoints + n_lesions)
    return int(np.clip((4 << 20) // per_voxel, 1024, 4096))


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
        Sums of (z - shift) and (z - shift)^2.
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
    def zeros(cls, n_lesions: int, n_voxels: int) -> "FisherZSums":
        return cls(
            np.zeros((n_lesions, n_voxels), dtype=np.float32),
            np.zeros((n_lesions, n_voxels)),
            np.zeros((n_lesions, n_voxels)),
            excluded_seeds=np.zeros(n_lesions, dtype=np.int64),
        )

    @property
    def n(self) -> np.ndarray | int:
        """Subjects contributing to each (lesion, voxel) pair."""
        return self.n_subjects if self.missing is None else self.n_subjects - self.missing

    def leave_out(self, seeds: np.ndarray, voxels: np.ndarray, partial_dz: np.ndarray, partial_dz2: np.ndarray) -> None:
        """Remove the current subject from the pairs of invalid ``seeds`` (L bool) and
        invalid ``voxels`` (V bool): they were folded in as z = 0, i.e. a deviation of
        -shift, which is taken back here, and their subject counts are lowered."""
        if self.missing is None:
            self.missing = np.zeros(self.shift.shape, dtype=np.int32)
        rows = np.flatnonzero(seeds)
        other_rows = np.flatnonzero(~seeds)
        columns = np.flatnonzero(voxels)
        for index in (np.ix_(rows, np.arange(self.shift.shape[1])), np.ix_(other_rows, columns)):
            shift = self.shift[index]
            partial_dz[index] += shift
            partial_dz2[index] -= shift * shift
            self.missing[index] += 1
        self.excluded_seeds += seeds
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
        return cls(columns, [np.full(c.size, 1.0 / c.size, dtype=np.float32) for c in columns])

    @property
    def n_lesions(self) -> int:
        return len(self.columns)

    def seeds(self, timeseries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised seeds (T x L float32) and the mask of invalid (constant) seeds."""
        flat = np.concatenate(self.columns)
        gathered = np.asarray(timeseries[:, flat], dtype=np.float32)
        gathered -= gathered.mean(axis=0, dtype=np.float64).astype(np.float32)
        gathered *= np.concatenate(self.weights)
        starts = np.cumsum([0] + [c.size for c in self.columns[:-1]])
        seeds = np.ascontiguousarray(np.add.reduceat(gathered, starts, axis=1))
        return seeds, normalise_columns(seeds)


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


def standardise(timeseries: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Centre and unit-normalise every column of ``timeseries`` into ``out`` (float32).

    Returns the mask of invalid columns (set to 0).
    """
    to_float32(timeseries, out)
    out -= out.mean(axis=0)
    return normalise_columns(out)


# float16 -> float32 by table lookup: faster than numpy's element-wise cast.
_FLOAT16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def to_float32(values: np.ndarray, out: np.ndarray) -> None:
    """Copy ``values`` (float16 or float32) into the float32 array ``out``."""
    if values.dtype == np.float16:
        np.take(_FLOAT16_TABLE, values.view(np.uint16), out=out)
    else:
        np.copyto(out, values, casting="unsafe")


class _BlockWorker:
    """Per-block work of one subject; buffers are per thread."""

    def __init__(self, seeds_t: np.ndarray, sums: FisherZSums, partial_dz: np.ndarray, partial_dz2: np.ndarray):
        self.seeds_t = seeds_t
        self.sums = sums
        self.partial_dz = partial_dz
        self.partial_dz2 = partial_dz2
        self.local = threading.local()

    def __call__(self, timeseries: np.ndarray, block: slice) -> np.ndarray:
        width = block.stop - block.start
        local = self.local
        if getattr(local, "width", 0) < width or local.centred.shape[0] != timeseries.shape[0]:
            local.centred = np.empty((timeseries.shape[0], width), dtype=np.float32)
            local.correlations = np.empty((self.seeds_t.shape[0], width), dtype=np.float32)
            local.width = width
        centred = local.centred[:, :width]
        z = local.correlations[:, :width]
        to_float32(timeseries[:, block], centred)
        centred -= centred.mean(axis=0)
        norms = np.sqrt(np.einsum("tv,tv->v", centred, centred))
        invalid = ~(norms > 0) | ~np.isfinite(norms)
        if invalid.any():
            centred[:, invalid] = 0.0
        # Seeds are centred and unit-norm: r = seeds' x_centred / |x_centred|.
        np.matmul(self.seeds_t, centred, out=z)
        z *= np.divide(1.0, norms, out=np.zeros_like(norms), where=~invalid)
        np.clip(z, -R_MAX, R_MAX, out=z)
        np.arctanh(z, out=z)
        if self.sums.n_subjects == 0:
            self.sums.shift[:, block] = z
            return invalid
        z -= self.sums.shift[:, block]
        self.partial_dz[:, block] += z
        np.square(z, out=z)
        self.partial_dz2[:, block] += z
        return invalid


def stream_fisher_z(
    connectome: FunctionalConnectome,
    seeds: SeedDefinition,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[FisherZSums, PassTiming]:
    """One pass over ``connectome`` accumulating Fisher-z sums for every seed.

    Parameters
    ----------
    connectome : FunctionalConnectome
        The connectome to stream.
    seeds : SeedDefinition
        Which voxels (and weights) form each lesion's seed.
    progress : callable, optional
        Called as ``progress(done, total, seconds)`` after each subject.
    """
    n_lesions, n_voxels = seeds.n_lesions, connectome.n_voxels
    sums = FisherZSums.zeros(n_lesions, n_voxels)
    partial_dz = np.zeros((n_lesions, n_voxels), dtype=np.float32)
    partial_dz2 = np.zeros((n_lesions, n_voxels), dtype=np.float32)
    timing = PassTiming()
    width = block_size(n_lesions, connectome.files[0].n_timepoints)
    blocks = [slice(start, min(start + width, n_voxels)) for start in range(0, n_voxels, width)]
    started = time.perf_counter()
    pending = 0
    # Threads share the cores; BLAS must not spawn its own threads inside each of them.
    with ThreadPoolExecutor(max_workers=worker_threads()) as pool, threadpool_limits(1, user_api="blas"):
        waited = time.perf_counter()
        # The reader thread also forms the seeds, while this thread maps the previous subject.
        for timeseries, (seeds_t, invalid_seeds) in connectome.iter_subjects(prepare=seeds.seeds):
            timing.waiting_for_data += time.perf_counter() - waited
            timing.bytes_read += timeseries.nbytes
            worker = _BlockWorker(np.ascontiguousarray(seeds_t.T), sums, partial_dz, partial_dz2)
            invalid_voxels = np.concatenate(list(pool.map(lambda b: worker(timeseries, b), blocks)))
            timing.flops += 2.0 * timeseries.shape[0] * n_lesions * n_voxels
            if invalid_voxels.any() or invalid_seeds.any():
                sums.leave_out(invalid_seeds, invalid_voxels, partial_dz, partial_dz2)
            sums.n_subjects += 1
            pending += 1
            if pending == FLUSH_EVERY:
                _flush(sums, partial_dz, partial_dz2)
                pending = 0
            if progress:
                progress(sums.n_subjects, connectome.n_subjects, time.perf_counter() - started)
            waited = time.perf_counter()
    _flush(sums, partial_dz, partial_dz2)
    timing.seconds = time.perf_counter() - started
    return sums, timing


def _flush(sums: FisherZSums, partial_dz: np.ndarray, partial_dz2: np.ndarray) -> None:
    """Fold the float32 partial sums into the float64 running sums and reset them."""
    sums.sum_dz += partial_dz
    sums.sum_dz2 += partial_dz2
    partial_dz.fill(0.0)
    partial_dz2.fill(0.0)


@dataclass
class GroupStatistics:
    """Across-subject statistics of Fisher z, per lesion and voxel (float32, L x V)."""

    z: np.ndarray
    r: np.ndarray
    t: np.ndarray
    p: np.ndarray | None
    p_fdr: np.ndarray | None
    n: np.ndarray
    undefined_t: np.ndarray


def summarise(shift: np.ndarray, sum_dz: np.ndarray, sum_dz2: np.ndarray, n, compute_p: bool = True) -> GroupStatistics:
    """Mean z, r = tanh(mean z), one-sample t, two-sided p (n-1 df) and BH-FDR p.

    Parameters
    ----------
    shift : ndarray (L, V)
        Per-pair shift the sums are taken around (see :class:`FisherZSums`).
    sum_dz, sum_dz2 : ndarray (L, V)
        Sums of (z - shift) and (z - shift)^2 over subjects.
    n : int or ndarray (L, V)
        Subjects contributing to each pair.
    compute_p : bool
        Also compute p and FDR-adjusted p.

    Notes
    -----
    Where the standard deviation of z is 0 (or fewer than 2 subjects contribute), t is
    undefined: it is set to 0 and p to 1 there, and the pairs are flagged in
    ``undefined_t``. FDR adjustment (Benjamini-Hochberg) runs over each lesion's
    brain-mask voxels.
    """
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), sum_dz.shape)
    mean_dz = np.divide(sum_dz, n, out=np.zeros(sum_dz.shape), where=n > 0)
    mean = shift + mean_dz
    variance = np.divide(sum_dz2 - n * mean_dz**2, n - 1, out=np.zeros(sum_dz.shape), where=n > 1)
    standard_error = np.sqrt(np.clip(variance, 0.0, None) / np.maximum(n, 1))
    defined = (n > 1) & (standard_error > 1e-12 * np.maximum(np.abs(mean), 1.0))
    t = np.divide(mean, standard_error, out=np.zeros_like(mean), where=defined)
    p = p_fdr = None
    if compute_p:
        p = np.ones_like(t)
        p[defined] = 2.0 * stats.t.sf(np.abs(t[defined]), df=n[defined] - 1)
        p_fdr = np.vstack([stats.false_discovery_control(row, method="bh") for row in p])
    return GroupStatistics(
        z=mean.astype(np.float32),
        r=np.tanh(mean).astype(np.float32),
        t=t.astype(np.float32),
        p=None if p is None else p.astype(np.float32),
        p_fdr=None if p_fdr is None else p_fdr.astype(np.float32),
        n=n.astype(np.int32),
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
    started = time.perf_counter()
    done = 0
    standardised = None
    for timeseries in connectome.iter_subjects():
        if standardised is None or standardised.shape != timeseries.shape:
            standardised = np.empty(timeseries.shape, dtype=np.float32)
        standardise(timeseries, standardised)
        for total, cols in zip(totals, columns):
            block = standardised[:, cols]
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
