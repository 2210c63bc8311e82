"""The group-level statistics engine against independent computations: numpy (overlap
maps, least squares), scipy (t distribution, Fisher's exact test) and nilearn's
``permuted_ols`` (t, FWE p, TFCE)."""

from __future__ import annotations

import logging
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from lacuna.analysis.group.statistics import (
    TFCEGrid,
    liebermeister,
    liebermeister_logp,
    permutation_glm,
    sensitivity,
    tfce,
)
from lacuna.core.errors import ValidationError

nilearn_mass_univariate = pytest.importorskip("nilearn.mass_univariate")


def nilearn_ols(tested, maps, covariates, n_perm, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nilearn_mass_univariate.permuted_ols(
            tested_vars=np.asarray(tested, dtype=float)[:, None],
            target_vars=maps.astype(np.float64),
            confounding_vars=covariates,
            model_intercept=True,
            two_sided_test=True,
            n_perm=n_perm,
            random_state=0,
            **options,
        )


def cohort(n=40, v=300, n_cases=15, covariates=2, seed=1):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, v)).astype(np.float32)
    case = (np.arange(n) < n_cases).astype(float)
    z = rng.standard_normal((n, covariates)) if covariates else None
    return maps, case, z


def monte_carlo_tolerance(p, n_perm, z=5.0):
    """Allowed |p1 - p2| for two independent permutation estimates of the same p."""
    return z * np.sqrt(2 * np.clip(p, 1 / n_perm, 1) * (1 - np.clip(p, 0, 1 - 1 / n_perm)) / n_perm) + 2.0 / n_perm


# --- sensitivity ------------------------------------------------------------------


def test_sensitivity_is_the_percentage_of_maps_beyond_the_threshold():
    rng = np.random.default_rng(0)
    maps = (rng.standard_normal((37, 1000)) * 8).astype(np.float32)
    maps[:, 0] = 7.0  # exactly at the threshold: not above
    result = sensitivity(maps, 7.0)
    positive = 100 * np.mean(maps > 7.0, axis=0)
    negative = 100 * np.mean(maps < -7.0, axis=0)
    np.testing.assert_allclose(result.percent_positive, positive, rtol=1e-6)
    np.testing.assert_allclose(result.percent_negative, negative, rtol=1e-6)
    np.testing.assert_allclose(result.percent_signed, positive - negative, rtol=1e-6, atol=1e-5)
    assert result.percent_positive[0] == 0
    assert result.n_maps == 37


def test_sensitivity_of_unsigned_maps_has_only_the_positive_map():
    maps = np.random.default_rng(0).random((10, 50)).astype(np.float32)
    result = sensitivity(maps, 0.05, signed=False)
    np.testing.assert_allclose(result.percent_positive, 100 * np.mean(maps > 0.05, axis=0), rtol=1e-6)
    assert result.percent_negative is None and result.percent_signed is None


# --- GLM: t and parametric p ------------------------------------------------------


@pytest.mark.parametrize("covariates", [0, 1, 3])
def test_t_equals_nilearn_permuted_ols(covariates):
    maps, case, z = cohort(covariates=covariates)
    ours = permutation_glm(maps, case, z, n_permutations=0)
    reference = nilearn_ols(case, maps, z, n_perm=0)["t"][0]
    np.testing.assert_allclose(ours.t, reference, rtol=1e-9, atol=1e-12)
    assert ours.dof == maps.shape[0] - 2 - covariates


def test_t_and_logp_equal_least_squares_and_student_t():
    maps, _, z = cohort(n=30, v=20)
    score = np.random.default_rng(5).normal(50, 10, 30)
    ours = permutation_glm(maps, score, z, n_permutations=0)
    design = np.column_stack([np.ones(30), score, z])
    beta, rss, *_ = np.linalg.lstsq(design, maps.astype(np.float64), rcond=None)
    dof = 30 - design.shape[1]
    covariance = np.linalg.inv(design.T @ design)[1, 1]
    t = beta[1] / np.sqrt(rss / dof * covariance)
    np.testing.assert_allclose(ours.t, t, rtol=1e-8)
    np.testing.assert_allclose(ours.logp, -np.log10(2 * stats.t.sf(np.abs(t), dof)), rtol=1e-5)


def test_constant_and_non_finite_columns_are_defined():
    maps, case, z = cohort(v=10)
    maps[:, 3] = 0.3  # constant
    maps[:, 4] = 2.0 * z[:, 0] + 1.0  # fully explained by a covariate
    maps[5, 6] = np.nan
    ours = permutation_glm(maps, case, z, n_permutations=50)
    assert ours.t[3] == 0 and ours.logp[3] == 0
    assert ours.t[4] == 0 and ours.logp[4] == 0
    assert np.isnan(ours.t[6]) and np.isnan(ours.logp[6]) and np.isnan(ours.logp_fwe[6])
    others = [i for i in range(10) if i not in (3, 4, 6)]
    assert np.isfinite(ours.logp_fwe[others]).all()
    np.testing.assert_allclose(ours.t[others], nilearn_ols(case, maps[:, others], z, n_perm=0)["t"][0], rtol=1e-9)


def test_designs_without_a_testable_variable_are_refused():
    maps, case, z = cohort(n=6, v=5)
    with pytest.raises(ValidationError, match="constant"):
        permutation_glm(maps, np.ones(6), z)
    with pytest.raises(ValidationError, match="constant or explained"):
        permutation_glm(maps, z[:, 0] * 3 + 2, z)
    with pytest.raises(ValidationError, match="degree of freedom"):
        permutation_glm(maps[:4], case[:4], z[:4])
    with pytest.raises(ValidationError, match="missing"):
        permutation_glm(maps, np.where(case == 1, np.nan, 0.0), z)


# --- GLM: permutations ------------------------------------------------------------


def test_fwe_p_equals_nilearn_within_monte_carlo_error():
    maps, case, z = cohort(n=40, v=300)
    maps[:, :15] += 0.9 * case[:, None].astype(np.float32)
    n_perm = 2000
    ours = permutation_glm(maps, case, z, n_permutations=n_perm, random_seed=3)
    reference = nilearn_ols(case, maps, z, n_perm=n_perm)
    p_ours, p_nilearn = 10.0 ** -ours.logp_fwe, 10.0 ** -reference["logp_max_t"][0]
    assert np.all(np.abs(p_ours - p_nilearn) <= monte_carlo_tolerance(p_nilearn, n_perm))
    # the null distributions of the maximum |t| are the same distribution
    assert stats.ks_2samp(ours.null_max_t, reference["h0_max_t"][0]).pvalue > 1e-3


def test_fwe_p_counts_the_permutations_whose_maximum_reaches_each_t():
    maps, case, z = cohort(v=50)
    ours = permutation_glm(maps, case, z, n_permutations=200)
    expected = [(1 + np.sum(ours.null_max_t >= abs(t))) / 201 for t in ours.t]
    np.testing.assert_allclose(10.0 ** -ours.logp_fwe, expected, rtol=1e-5)
    # the permutation t statistics are those of the permuted design (Freedman-Lane),
    # whose maximum is never below the observed map's for the identity
    assert ours.null_max_t.shape == (200,) and np.all(ours.null_max_t > 0)


def test_planted_effect_is_found_and_nothing_else():
    rng = np.random.default_rng(11)
    n, v = 60, 2000
    case = (np.arange(n) < 30).astype(float)
    volume = rng.normal(10, 3, n)
    maps = rng.standard_normal((n, v)).astype(np.float32) + 0.2 * volume[:, None].astype(np.float32)
    block = slice(100, 150)
    maps[:, block] += 2.0 * case[:, None].astype(np.float32)
    ours = permutation_glm(maps, case, volume[:, None], n_permutations=1000, random_seed=0)
    significant = ours.logp_fwe > -np.log10(0.05)
    assert significant[block].all()
    assert significant.sum() - significant[block].sum() <= 1
    assert np.all(ours.t[block] > 0)


def test_null_cohorts_reject_in_about_five_percent_of_runs():
    """Family-wise error rate of the max-|t| test, measured: data with a covariate
    effect (removed by the model) and no effect of the tested variable."""
    rng = np.random.default_rng(2024)
    runs, n, v, n_perm = 400, 16, 30, 99
    rejected = 0
    for run in range(runs):
        case = rng.permutation((np.arange(n) < 7).astype(float))
        covariate = rng.normal(size=(n, 1))
        maps = (rng.standard_normal((n, v)) + 1.5 * covariate).astype(np.float32)
        result = permutation_glm(maps, case, covariate, n_permutations=n_perm, random_seed=run, threads=1)
        rejected += bool(np.any(result.logp_fwe >= -np.log10(0.05) - 1e-6))
    # a correct level-0.05 test: the count is Binomial(runs, 0.05)
    assert stats.binomtest(rejected, runs, 0.05).pvalue > 1e-3, rejected


def test_same_seed_gives_identical_output_whatever_the_threads():
    maps, case, z = cohort(v=20000, n=30)
    first = permutation_glm(maps, case, z, n_permutations=300, random_seed=7, threads=1)
    second = permutation_glm(maps, case, z, n_permutations=300, random_seed=7, threads=2)
    other = permutation_glm(maps, case, z, n_permutations=300, random_seed=8, threads=2)
    np.testing.assert_array_equal(first.null_max_t, second.null_max_t)
    np.testing.assert_array_equal(first.logp_fwe, second.logp_fwe)
    assert not np.array_equal(first.null_max_t, other.null_max_t)


def test_permutations_log_progress(caplog):
    maps, case, z = cohort(v=20)
    with caplog.at_level(logging.DEBUG, logger="lacuna"):
        permutation_glm(maps, case, z, n_permutations=150)
    assert any("permutations: 150/150" in record.getMessage() for record in caplog.records)


# --- TFCE -------------------------------------------------------------------------


def brain_like_mask(shape=(9, 10, 8)):
    ijk = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((ijk[a] - centre[a]) / (shape[a] / 2)) ** 2 for a in range(3))
    return r <= 1.0


def smooth_maps(n, mask, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    maps = np.stack([gaussian_filter(rng.standard_normal(mask.shape), 1.0)[mask] for _ in range(n)])
    return (maps / maps.std()).astype(np.float32)


def test_tfce_grid_neighbours_are_the_face_neighbours_inside_the_mask():
    mask = brain_like_mask()
    grid = TFCEGrid.from_mask(mask)
    coordinates = np.argwhere(mask)
    lookup = {tuple(c): i for i, c in enumerate(coordinates)}
    for index, c in enumerate(coordinates):
        expected = set()
        for axis in range(3):
            for step in (-1, 1):
                other = c.copy()
                other[axis] += step
                if tuple(other) in lookup:
                    expected.add(lookup[tuple(other)])
        assert set(grid.neighbours[index][grid.neighbours[index] >= 0]) == expected


def test_tfce_equals_nilearn_calculate_tfce_including_values_on_the_thresholds():
    from nilearn.mass_univariate._utils import calculate_tfce
    from scipy.ndimage import generate_binary_structure

    mask = brain_like_mask((12, 11, 10))
    grid = TFCEGrid.from_mask(mask)
    rng = np.random.default_rng(4)
    maps = [
        smooth_maps(1, mask, 0)[0].astype(np.float64) * 4,
        rng.integers(-100, 101, mask.sum()).astype(np.float64),  # on the thresholds 1..100
        np.abs(rng.standard_normal(mask.sum())),  # one sign only
    ]
    for values in maps:
        volume = np.zeros(mask.shape + (1,))
        volume[mask, 0] = values
        expected = calculate_tfce(volume, generate_binary_structure(3, 1))[..., 0][mask]
        np.testing.assert_allclose(tfce(values, grid), expected, rtol=1e-10, atol=1e-9)


def test_tfce_and_its_fwe_equal_nilearn_permuted_ols():
    from nilearn.maskers import NiftiMasker

    mask = brain_like_mask()
    grid = TFCEGrid.from_mask(mask)
    n = 24
    maps = smooth_maps(n, mask, 1)
    case = (np.arange(n) < 10).astype(float)
    z = np.random.default_rng(2).standard_normal((n, 1))
    centre = np.zeros(mask.shape, bool)
    centre[3:6, 3:7, 3:5] = True
    maps[:, centre[mask]] += 1.5 * case[:, None].astype(np.float32)
    masker = NiftiMasker(mask_img=nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))).fit()
    n_perm = 250
    reference = nilearn_ols(case, maps, z, n_perm=n_perm, tfce=True, masker=masker)
    ours = permutation_glm(maps, case, z, n_permutations=n_perm, random_seed=1, tfce_grid=grid)
    np.testing.assert_allclose(ours.t, reference["t"][0], rtol=1e-9)
    np.testing.assert_allclose(ours.tfce, reference["tfce"][0], rtol=1e-8)
    p_ours, p_nilearn = 10.0 ** -ours.logp_tfce_fwe, 10.0 ** -reference["logp_max_tfce"][0]
    assert np.all(np.abs(p_ours - p_nilearn) <= monte_carlo_tolerance(p_nilearn, n_perm))
    assert stats.ks_2samp(ours.null_max_tfce, reference["h0_max_tfce"][0]).pvalue > 1e-3
    # the planted block is found, by TFCE in more of its voxels than by the max |t|
    in_block = centre[mask]
    tfce_found = np.count_nonzero(ours.logp_tfce_fwe[in_block] > -np.log10(0.05))
    assert tfce_found > in_block.sum() / 2
    assert tfce_found > np.count_nonzero(ours.logp_fwe[in_block] > -np.log10(0.05))


def test_tfce_grid_must_match_the_maps():
    maps, case, z = cohort(v=10)
    with pytest.raises(ValidationError, match="TFCE grid"):
        permutation_glm(maps, case, z, tfce_grid=TFCEGrid.from_mask(brain_like_mask()))


# --- Liebermeister ----------------------------------------------------------------


def test_liebermeister_equals_scipy_fisher_exact_with_the_added_ones():
    rng = np.random.default_rng(9)
    n_cases, n_controls = 13, 21
    is_case = np.r_[np.ones(n_cases, bool), np.zeros(n_controls, bool)]
    rate = rng.random(400)
    maps = np.where(rng.random((34, 400)) < rate, 9.0, 0.0).astype(np.float32)
    maps[is_case, :40] = np.where(rng.random((n_cases, 40)) < 0.9, -9.0, 0.0)  # negative: above in |M|
    result = liebermeister(maps, is_case, 7.0)
    for v in range(400):
        above = np.abs(maps[:, v]) > 7.0
        a, b = int(above[is_case].sum()), int(above[~is_case].sum())
        c, d = n_cases - a, n_controls - b
        p = stats.fisher_exact([[a + 1, b], [c, d + 1]], alternative="greater")[1]
        assert result.cases_above[v] == a and result.controls_above[v] == b
        np.testing.assert_allclose(result.logp[v], -np.log10(p), rtol=2e-6, atol=1e-7)


def test_liebermeister_of_unsigned_maps_uses_values_above_the_threshold():
    maps = np.array([[-9.0, 9.0], [-9.0, 9.0], [0.0, 0.0]], dtype=np.float32)
    result = liebermeister(maps, np.array([True, True, False]), 7.0, absolute=False)
    assert list(result.cases_above) == [0, 2]


def test_liebermeister_of_extreme_tables_stays_finite():
    logp = liebermeister_logp(np.array([500, 0]), np.array([0, 500]), 500, 500)
    expected = -np.log10(stats.fisher_exact([[501, 0], [0, 501]], alternative="greater")[1])
    assert np.isfinite(logp).all() and logp[0] > 250
    if np.isfinite(expected):
        np.testing.assert_allclose(logp[0], expected, rtol=1e-5)
    assert logp[1] == pytest.approx(0.0, abs=1e-6)


def test_liebermeister_needs_both_groups():
    with pytest.raises(ValidationError, match="cases and controls"):
        liebermeister(np.zeros((3, 2), np.float32), np.array([True, True, True]), 1.0)


# --- layouts and selections -------------------------------------------------------


def test_voxel_major_maps_and_selected_rows_give_the_same_results():
    maps, case, z = cohort(n=40, v=500)
    rows = np.r_[0:10, 15:40:2]
    plain = permutation_glm(maps[rows], case[rows], z[rows], n_permutations=200, random_seed=4)
    voxel_major = np.ascontiguousarray(maps.T).T
    assert voxel_major.flags.f_contiguous and not voxel_major.flags.c_contiguous
    for layout in (maps, voxel_major):
        selected = permutation_glm(layout, case[rows], z[rows], n_permutations=200, random_seed=4, rows=rows)
        np.testing.assert_array_equal(selected.t, plain.t)
        np.testing.assert_array_equal(selected.null_max_t, plain.null_max_t)
        overlap = sensitivity(layout, 1.0, rows=rows)
        np.testing.assert_array_equal(overlap.percent_signed, sensitivity(maps[rows], 1.0).percent_signed)
        counts = liebermeister(layout, case[rows] > 0, 1.0, rows=rows)
        np.testing.assert_array_equal(counts.logp, liebermeister(maps[rows], case[rows] > 0, 1.0).logp)


def test_tfce_grid_of_voxels_in_any_order():
    mask = brain_like_mask()
    flat = np.flatnonzero(mask)
    order = np.random.default_rng(0).permutation(flat.size)
    values = smooth_maps(1, mask, 3)[0].astype(np.float64)
    in_c_order = tfce(values, TFCEGrid.from_mask(mask))
    shuffled = tfce(values[order], TFCEGrid.from_indices(mask.shape, flat[order]))
    np.testing.assert_allclose(shuffled, in_c_order[order], rtol=1e-12)


def test_long_permutation_runs_log_an_eta(caplog, monkeypatch):
    from lacuna.analysis.group import statistics as group_statistics

    monkeypatch.setattr(group_statistics, "_PROGRESS_SECONDS", 0.0)
    maps, case, z = cohort(v=20)
    with caplog.at_level(logging.INFO, logger="lacuna"):
        permutation_glm(maps, case, z, n_permutations=1000)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("permutations:")]
    assert any("ETA" in line for line in lines) and lines[-1] == "permutations: 1000/1000"
