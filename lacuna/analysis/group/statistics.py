"""Group-level statistics of lesion network maps: the numerical engine (no I/O).

All functions take the maps of N masks as one ``N x V`` float32 array (a row per mask,
a column per voxel or parcel), stored in either order: C order, or the transpose of a
C-ordered ``V x N`` array (voxel-major, as a reader that fills one map at a time into
the voxels' rows makes it); ``rows`` selects the maps an analysis uses. See
``../shared/spec/group-level.md`` for the definitions.

* :func:`sensitivity`: percentages of maps above / below a threshold (network overlap);
* :func:`permutation_glm`: voxel-wise OLS t of one tested variable (case indicator or
  score) with covariates and an intercept, its two-sided parametric -log10 p, and
  family-wise error p from the maximum |t| (and optionally the maximum TFCE) under
  Freedman-Lane permutation, as ``nilearn.mass_univariate.permuted_ols`` defines them;
* :func:`tfce`: threshold-free cluster enhancement of one map on a :class:`TFCEGrid`;
* :func:`liebermeister`: the Liebermeister test (Fisher's exact test with one added to
  the concordant cells) on binarised maps.

How the permutations are made fast: the data are residualised on the covariates once
and scaled to unit norm per voxel, stored voxel-major (``V x N`` float32). For a batch
of permutations, one matrix product of the residuals with the permuted tested variable
and the permuted covariates gives every voxel's t for every permutation of the batch
(Freedman-Lane: ``t**2 = dof * b**2 / (1 - b**2 - sum(a_c**2))`` with ``b`` the product
with the permuted tested residuals and ``a_c`` those with the permuted orthonormal
covariates). The engine's threads each take a block of voxels through the product
(single-threaded BLAS) and a compiled kernel that keeps the largest |t| per
permutation; nothing of size permutations x voxels is stored unless TFCE needs the maps.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from lacuna.analysis.group import kernels as kernels
from lacuna.analysis.compiled_primitives import single_threaded_blas
from lacuna.core.errors import ValidationError
from lacuna.core.threads import worker_threads
from lacuna.core.timing import ProgressLog

log = logging.getLogger(__name__)

#: TFCE parameters (Smith & Nichols 2009; fslmaths and nilearn defaults).
TFCE_EXTENT = 0.5
TFCE_HEIGHT = 2.0
TFCE_STEPS = 100

#: Columns whose residual norm is below this fraction of their norm are constant (or
#: fully explained by the covariates): t = 0 there. float32 maps carry about 7 digits,
#: so a smaller residual is rounding.
_CONSTANT_TOLERANCE = 1e-6
#: Residual sum of squares floor, relative to the total (a perfect fit gives a large
#: finite t instead of a division by zero).
_RSS_FLOOR = 1e-12
#: Voxels per block of the permutation product (and of the residualisation).
_VOXEL_BLOCK = 8192
#: Columns of the permutation product per batch (permutations x (1 + covariates)).
_PRODUCT_COLUMNS = 384
#: Seconds between progress lines during the permutations.
_PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class SensitivityMaps:
    """Percent of maps beyond the threshold at each voxel (float32, V values each)."""

    percent_positive: np.ndarray
    percent_negative: np.ndarray | None
    percent_signed: np.ndarray | None
    n_maps: int
    threshold: float


@dataclass(frozen=True)
class LiebermeisterResult:
    """-log10 p of the Liebermeister test at each voxel, and the counts behind it."""

    logp: np.ndarray
    cases_above: np.ndarray
    controls_above: np.ndarray
    n_cases: int
    n_controls: int


@dataclass(frozen=True)
class GLMResult:
    """What :func:`permutation_glm` computes (maps of V values: ``t`` and ``tfce``
    float64, the -log10 p float32).

    ``logp_fwe``, ``logp_tfce_fwe`` and the null distributions are None without
    permutations; ``tfce`` is None unless a :class:`TFCEGrid` was given. Columns that
    hold a non-finite value have NaN everywhere.
    """

    t: np.ndarray
    logp: np.ndarray
    dof: int
    n_permutations: int
    random_seed: int
    logp_fwe: np.ndarray | None = None
    tfce: np.ndarray | None = None
    logp_tfce_fwe: np.ndarray | None = None
    null_max_t: np.ndarray | None = None
    null_max_tfce: np.ndarray | None = None


@dataclass(frozen=True)
class TFCEGrid:
    """The voxels of a 3-D mask and their face neighbours, for TFCE.

    Column v of the maps is the v-th voxel of ``mask`` in C order (``mask.ravel()``),
    as ``data[mask]`` and nilearn's maskers order them.
    """

    shape: tuple[int, int, int]
    neighbours: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "TFCEGrid":
        """The grid of the True voxels of a 3-D boolean ``mask``, in C order."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3:
            raise ValidationError(f"a TFCE mask must be 3-D, got shape {mask.shape}")
        return cls.from_indices(mask.shape, np.flatnonzero(mask))

    @classmethod
    def from_indices(cls, shape: tuple[int, int, int], flat_indices: np.ndarray) -> "TFCEGrid":
        """The voxels at the C-order ``flat_indices`` of a grid of ``shape``, column v
        being the voxel at ``flat_indices[v]``."""
        flat_indices = np.asarray(flat_indices, dtype=np.int64)
        index = np.full(int(np.prod(shape)), -1, dtype=np.int32)
        index[flat_indices] = np.arange(flat_indices.size, dtype=np.int32)
        index = index.reshape(shape)
        mask = index >= 0
        padded = np.pad(index, 1, constant_values=-1)
        inner = tuple(slice(1, -1) for _ in range(3))
        neighbours = []
        for axis in range(3):
            for step in (-1, 1):
                shifted = list(inner)
                shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
                neighbours.append(padded[tuple(shifted)][mask])
        by_c_order = np.stack(neighbours, axis=1)  # rows in C order of the voxels
        rank = np.argsort(np.argsort(flat_indices, kind="stable"), kind="stable")
        return cls(tuple(shape), np.ascontiguousarray(by_c_order[rank]))

    @property
    def n_voxels(self) -> int:
        return self.neighbours.shape[0]


def sensitivity(maps: np.ndarray, threshold: float, *, signed: bool = True, rows=None) -> SensitivityMaps:
    """Network-overlap (sensitivity) maps.

    Parameters
    ----------
    maps : ndarray (N, V) float32
        One map per row.
    threshold : float
        T of ``PercentPositive = 100 * mean(M > T)`` and ``PercentNegative =
        100 * mean(M < -T)``.
    signed : bool
        Also the negative and signed maps (fLNM t maps); False for maps that are never
        negative (sLNM disconnection).
    rows : array of int, optional
        The maps used (default all).
    """
    maps = np.asarray(maps)
    rows = _rows(maps, rows)
    n_maps, n_voxels = rows.size, maps.shape[1]
    if n_maps == 0:
        raise ValidationError("no map to summarise")
    positive = np.zeros(n_voxels, dtype=np.int64)
    negative = np.zeros(n_voxels, dtype=np.int64)
    for block in _blocks(n_voxels, _VOXEL_BLOCK * 4):
        values = maps[:, block][rows]
        positive[block] = np.count_nonzero(values > threshold, axis=0)
        if signed:
            negative[block] = np.count_nonzero(values < -threshold, axis=0)
    percent_positive = (100.0 * positive / n_maps).astype(np.float32)
    if not signed:
        return SensitivityMaps(percent_positive, None, None, n_maps, float(threshold))
    percent_negative = (100.0 * negative / n_maps).astype(np.float32)
    signed_map = (100.0 * (positive - negative) / n_maps).astype(np.float32)
    return SensitivityMaps(percent_positive, percent_negative, signed_map, n_maps, float(threshold))


def liebermeister(
    maps: np.ndarray, is_case: np.ndarray, threshold: float, *, absolute: bool = True, rows=None
) -> LiebermeisterResult:
    """The Liebermeister test of cases against controls at each voxel.

    With a / b the cases / controls whose map exceeds the threshold (``|M| > T`` when
    ``absolute``, else ``M > T``) and c / d those whose map does not, p is
    ``scipy.stats.fisher_exact([[a + 1, b], [c, d + 1]], alternative="greater")``'s
    (Rorden, Karnath & Bonilha 2007). Computed once per distinct (a, b) pair.

    Parameters
    ----------
    maps : ndarray (N_all, V)
    is_case : ndarray (N,) bool
        True for cases, False for controls, for each map used.
    rows : array of int, optional
        The N maps used (default all).
    """
    maps = np.asarray(maps)
    rows = _rows(maps, rows)
    is_case = np.asarray(is_case, dtype=bool)
    if is_case.shape != rows.shape:
        raise ValidationError(f"{is_case.size} case labels for {rows.size} maps")
    n_cases = int(is_case.sum())
    n_controls = is_case.size - n_cases
    if n_cases == 0 or n_controls == 0:
        raise ValidationError(f"the Liebermeister test needs cases and controls (got {n_cases} and {n_controls})")
    cases_above = np.zeros(maps.shape[1], dtype=np.int64)
    controls_above = np.zeros(maps.shape[1], dtype=np.int64)
    for block in _blocks(maps.shape[1], _VOXEL_BLOCK * 4):
        values = maps[:, block][rows]
        above = (np.abs(values) if absolute else values) > threshold
        cases_above[block] = np.count_nonzero(above[is_case], axis=0)
        controls_above[block] = np.count_nonzero(above[~is_case], axis=0)
    logp = liebermeister_logp(cases_above, controls_above, n_cases, n_controls)
    return LiebermeisterResult(logp, cases_above, controls_above, n_cases, n_controls)


def liebermeister_logp(cases_above: np.ndarray, controls_above: np.ndarray, n_cases: int, n_controls: int) -> np.ndarray:
    """-log10 p of the Liebermeister test for counts of cases / controls above (float32).

    ``fisher_exact([[A, B], [C, D]], "greater")`` is ``P(X >= A)`` for X hypergeometric
    with ``A + B + C + D`` items of which ``A + B`` are marked, ``A + C`` drawn; here
    ``A = a + 1, B = b, C = n_cases - a, D = n_controls - b + 1``.
    """
    width = n_controls + 1
    keys, inverse = np.unique(np.asarray(cases_above) * width + np.asarray(controls_above), return_inverse=True)
    a, b = keys // width, keys % width
    log_p = stats.hypergeom.logsf(a, n_cases + n_controls + 2, a + 1 + b, n_cases + 1)
    logp = np.minimum(-log_p / np.log(10.0), _max_logp())
    return np.maximum(logp, 0.0)[inverse].astype(np.float32)


def permutation_glm(
    maps: np.ndarray,
    tested: np.ndarray,
    covariates: np.ndarray | None = None,
    *,
    n_permutations: int = 5000,
    random_seed: int = 0,
    tfce_grid: TFCEGrid | None = None,
    rows=None,
    threads: int | None = None,
) -> GLMResult:
    """OLS GLM at every column with permutation family-wise error.

    The model is ``M(v) = b0 + b1 * tested + covariates @ c + e``; ``t`` is the t of b1
    (n - p degrees of freedom), ``logp`` -log10 of its two-sided parametric p. With
    permutations, ``logp_fwe`` is -log10 of ``(1 + #{permutations whose max |t| over
    columns >= |t(v)|}) / (1 + n_permutations)`` under Freedman-Lane permutation (the
    tested variable and covariates, residualised, permuted jointly against the
    residuals); with ``tfce_grid`` the same for TFCE (E = 0.5, H = 2, 100 steps up to
    the map's max |t|, face connectivity, two-sided). These are the definitions of
    ``nilearn.mass_univariate.permuted_ols(..., model_intercept=True,
    two_sided_test=True)``; the permutations are drawn from
    ``numpy.random.default_rng(random_seed)``, so the same inputs and seed give the same
    output.

    Parameters
    ----------
    maps : ndarray (N_all, V) float32
        One map per row (not modified).
    tested : ndarray (N,)
        The tested variable (1 = case, 0 = control; or a score) of each map used.
    covariates : ndarray (N, k), optional
        Nuisance variables (an intercept is always added).
    n_permutations : int
        0 for parametric statistics only.
    tfce_grid : TFCEGrid, optional
        The voxels of the columns on their 3-D grid; TFCE is computed when given.
    rows : array of int, optional
        The N maps used (default all).
    threads : int, optional
        Default :func:`lacuna.core.threads.worker_threads`.

    Raises
    ------
    ValidationError
        If the design leaves no degree of freedom, or the tested variable is constant
        or explained by the covariates.
    """
    maps = np.asarray(maps)
    rows = _rows(maps, rows)
    design = _Design.build(np.asarray(tested, dtype=np.float64), covariates, rows.size)
    if tfce_grid is not None and tfce_grid.n_voxels != maps.shape[1]:
        raise ValidationError(f"the TFCE grid has {tfce_grid.n_voxels} voxels, the maps {maps.shape[1]} columns")
    threads = threads or worker_threads()
    residuals, t = _residualise(maps, rows, design, threads)
    logp = _parametric_logp(t, design.dof)
    enhanced = tfce(t, tfce_grid) if tfce_grid is not None else None
    common = dict(dof=design.dof, n_permutations=int(n_permutations), random_seed=int(random_seed))
    if n_permutations <= 0:
        return GLMResult(t, logp, tfce=enhanced, **common)
    null_t, null_tfce = _permute(residuals, design, n_permutations, random_seed, tfce_grid, threads)
    del residuals
    logp_fwe = _fwe_logp(np.abs(t), null_t)
    logp_tfce_fwe = _fwe_logp(np.abs(enhanced), null_tfce) if enhanced is not None else None
    return GLMResult(
        t,
        logp,
        logp_fwe=logp_fwe,
        tfce=enhanced,
        logp_tfce_fwe=logp_tfce_fwe,
        null_max_t=null_t,
        null_max_tfce=null_tfce,
        **common,
    )


@dataclass(frozen=True)
class _Design:
    """The tested variable's residuals (unit norm) and the covariates' orthonormal
    basis (intercept included; only the non-constant columns are permuted)."""

    tested: np.ndarray
    basis: np.ndarray
    permuted_basis: np.ndarray
    dof: int

    @classmethod
    def build(cls, tested: np.ndarray, covariates, n: int) -> "_Design":
        if tested.shape != (n,):
            raise ValidationError(f"{tested.size} values of the tested variable for {n} maps")
        intercept = np.full((n, 1), 1.0 / np.sqrt(n))
        covariates = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(n, -1)
        if not (np.isfinite(tested).all() and np.isfinite(covariates).all()):
            raise ValidationError("the design has missing (non-finite) values")
        # The intercept as its own (constant) basis vector: its product with any
        # residual is zero, so only the others need permuting.
        others = _orthonormal_basis(covariates)
        basis = np.hstack([intercept, others])
        dof = n - basis.shape[1] - 1
        if dof < 1:
            raise ValidationError(f"{n} maps leave no degree of freedom for {basis.shape[1] + 1} regressors")
        residual = tested - basis @ (basis.T @ tested)
        norm = np.linalg.norm(residual)
        if norm <= _CONSTANT_TOLERANCE * max(np.linalg.norm(tested), 1e-300):
            raise ValidationError("the tested variable is constant or explained by the covariates")
        return cls(residual / norm, basis, np.ascontiguousarray(others), dof)


def _orthonormal_basis(covariates: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the centred covariates' column space (SVD of the columns
    scaled to unit norm; constant and linearly dependent columns add nothing)."""
    centred = covariates - covariates.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    varying = norms > _CONSTANT_TOLERANCE * np.linalg.norm(covariates, axis=0)
    if not varying.any():
        return np.zeros((covariates.shape[0], 0))
    u, s, _ = np.linalg.svd(centred[:, varying] / norms[varying], full_matrices=False)
    return u[:, : int(np.count_nonzero(s > 1e-10 * s[0]))]


def _blocks(n: int, size: int):
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def _rows(maps: np.ndarray, rows) -> np.ndarray:
    if maps.ndim != 2:
        raise ValidationError(f"maps must be a 2-D array (maps x voxels), got shape {maps.shape}")
    if rows is None:
        return np.arange(maps.shape[0], dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= maps.shape[0]):
        raise ValidationError(f"map rows outside 0..{maps.shape[0] - 1}")
    return rows


def _c_ordered(maps: np.ndarray) -> tuple[np.ndarray, bool]:
    """``maps`` (N x V float32) as a C-ordered array: itself, or (``voxel_major``) the
    V x N array it is the transpose of; copied only when it is neither."""
    if maps.dtype == np.float32 and maps.flags.c_contiguous:
        return maps, False
    if maps.dtype == np.float32 and maps.T.flags.c_contiguous:
        return maps.T, True
    return np.ascontiguousarray(maps, dtype=np.float32), False


def _residualise(maps: np.ndarray, rows: np.ndarray, design: _Design, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm residuals, voxel-major (V x N float32), and the observed t (float64,
    computed in float64)."""
    data, voxel_major = _c_ordered(maps)
    n_voxels = maps.shape[1]
    residuals = np.empty((n_voxels, rows.size), dtype=np.float32)
    t = np.empty(n_voxels, dtype=np.float64)
    basis_t = np.ascontiguousarray(design.basis.T)

    def run(block):
        kernels.residualise_block(
            data, voxel_major, rows, block.start, block.stop, basis_t, design.tested, float(design.dof),
            _CONSTANT_TOLERANCE, _RSS_FLOOR, residuals, t,
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(run, _blocks(n_voxels, _VOXEL_BLOCK)))
    return residuals, t


def _max_logp() -> float:
    return -np.log10(np.finfo(np.float64).tiny)


def _parametric_logp(t: np.ndarray, dof: int) -> np.ndarray:
    """-log10 of the two-sided p of Student t (p floored at the smallest float64)."""
    p = 2.0 * special.stdtr(dof, -np.abs(t))
    with np.errstate(divide="ignore"):
        logp = 0.0 - np.log10(np.maximum(p, np.finfo(np.float64).tiny))
    return np.where(np.isnan(t), np.nan, logp).astype(np.float32)


def _fwe_logp(observed: np.ndarray, null_max: np.ndarray) -> np.ndarray:
    """-log10 of ``(1 + #{null >= observed}) / (1 + n)`` at each value."""
    ordered = np.sort(null_max)
    exceeding = ordered.size - np.searchsorted(ordered, np.nan_to_num(observed, nan=np.inf), side="left")
    p = (1.0 + exceeding) / (1.0 + ordered.size)
    return np.where(np.isnan(observed), np.nan, 0.0 - np.log10(p)).astype(np.float32)


class _TFCEWorkspace:
    """Per-thread scratch arrays of :func:`lacuna.analysis.group.kernels.tfce_two_sided`."""

    def __init__(self, n_voxels: int):
        self.nodes = np.empty((n_voxels, 4), dtype=np.int32)
        self.offset = np.empty(n_voxels, dtype=np.float64)
        self.no_output = np.zeros(1, dtype=np.float64)


def _tfce(values: np.ndarray, grid: TFCEGrid, workspace: _TFCEWorkspace, out: np.ndarray | None) -> float:
    """Two-sided TFCE of one map into ``out`` when given (100 thresholds evenly up to
    the map's max |value|, as nilearn's ``dh="auto"``); returns the largest |TFCE|."""
    finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(np.abs(finite).max()) if finite.size else 0.0
    if top == 0.0:
        if out is not None:
            out[:] = 0.0
        return 0.0
    thresholds = np.linspace(0.0, top, TFCE_STEPS + 1)[1:]
    height_sums = np.concatenate([[0.0], np.cumsum(thresholds**TFCE_HEIGHT)])
    target = workspace.no_output if out is None else out
    return kernels.tfce_two_sided(
        finite, thresholds, height_sums, TFCE_EXTENT, grid.neighbours, workspace.nodes, workspace.offset, target, out is not None
    )


def tfce(values: np.ndarray, grid: TFCEGrid) -> np.ndarray:
    """Two-sided threshold-free cluster enhancement of one map (float64).

    ``TFCE(v) = sign(M(v)) * sum over h_j <= |M(v)| of e_j(v)**0.5 * h_j**2`` with the
    thresholds ``h_j = j * max|M| / 100`` (j = 1..100) and ``e_j(v)`` the number of
    voxels of v's face-connected cluster of same-signed voxels with ``|M| >= h_j``:
    nilearn's ``calculate_tfce`` (and fslmaths' convention: no ``dh`` factor).
    Non-finite values count as 0.

    Parameters
    ----------
    values : ndarray (V,)
        One value per voxel of ``grid``.
    grid : TFCEGrid
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (grid.n_voxels,):
        raise ValidationError(f"{values.size} values for a TFCE grid of {grid.n_voxels} voxels")
    out = np.zeros(values.size, dtype=np.float64)
    _tfce(values, grid, _TFCEWorkspace(values.size), out)
    return out


def _permute(residuals, design: _Design, n_permutations: int, seed: int, grid: TFCEGrid | None, threads: int):
    """Max |t| (and max |TFCE|) of each permutation, in the order they are drawn."""
    n, n_voxels = residuals.shape[1], residuals.shape[0]
    n_covariates = design.permuted_basis.shape[1]
    batch = max(1, _PRODUCT_COLUMNS // (1 + n_covariates))
    rng = np.random.default_rng(seed)
    null_t = np.empty(n_permutations, dtype=np.float64)
    null_tfce = np.empty(n_permutations, dtype=np.float64) if grid is not None else None
    report = ProgressLog(log, "permutations", interval=_PROGRESS_SECONDS)
    local = threading.local()
    blocks = _blocks(n_voxels, _VOXEL_BLOCK)
    t_maps = np.empty((batch, n_voxels), dtype=np.float32) if grid is not None else np.empty((1, 1), np.float32)
    started = time.perf_counter()
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, n_permutations, batch):
            size = min(batch, n_permutations - start)
            orders = [rng.permutation(n) for _ in range(size)]
            product = _permuted_design(design, orders)

            def block_max(block, size=size, product=product):
                out = _thread_buffer(local, "products", (block.stop - block.start, product.shape[1]))
                np.matmul(residuals[block], product, out=out)
                max_t2 = np.zeros(size, dtype=np.float64)
                kernels.block_null_stats(
                    out, size, n_covariates, float(design.dof), _RSS_FLOOR, max_t2, t_maps, block.start, grid is not None
                )
                return max_t2

            null_t[start : start + size] = np.sqrt(design.dof * np.max(list(pool.map(block_max, blocks)), axis=0))
            if grid is not None:

                def tfce_max(p):
                    if not hasattr(local, "tfce"):
                        local.tfce = _TFCEWorkspace(n_voxels)
                    return _tfce(t_maps[p], grid, local.tfce, None)

                null_tfce[start : start + size] = list(pool.map(tfce_max, range(size)))
            report(start + size, n_permutations, time.perf_counter() - started)
    return null_t, null_tfce


def _permuted_design(design: _Design, orders: list[np.ndarray]) -> np.ndarray:
    """N x (B * (1 + k)) float32: the permuted tested residuals, then each permuted
    covariate, each in B consecutive columns (the layout the kernel reads)."""
    index = np.stack(orders, axis=1)  # N x B
    parts = [design.tested[index]] + [design.permuted_basis[index, c] for c in range(design.permuted_basis.shape[1])]
    return np.asfortranarray(np.hstack(parts), dtype=np.float32)


def _thread_buffer(local: threading.local, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch array of this thread, at least ``shape`` (reused)."""
    buffer = getattr(local, name, None)
    if buffer is None or buffer.shape[1] != shape[1] or buffer.shape[0] < shape[0]:
        buffer = np.empty((max(shape[0], _VOXEL_BLOCK), shape[1]), dtype=np.float32)
        setattr(local, name, buffer)
    return buffer[: shape[0]]
