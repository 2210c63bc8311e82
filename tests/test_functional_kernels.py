"""The compiled kernels and fast statistics of functional LNM against numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from lacuna.analysis import functional_kernels as kernels
from lacuna.analysis.t_statistics import benjamini_hochberg, two_sided_p


def test_every_float16_value_is_widened_exactly():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(64, 1024)
    out = np.empty((64, 1024), dtype=np.float32)
    kernels.gather_columns(bits, np.arange(1024), out)
    expected = bits.view(np.float16).astype(np.float32)
    same = (out.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(out) & np.isnan(expected))
    assert same.all()


def _reference_r(data: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    centred = data.astype(np.float64) - data.astype(np.float64).mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = centred / np.linalg.norm(centred, axis=0)
    return seeds.astype(np.float64) @ normalised


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_both_correlation_kernels_match_numpy(dtype):
    rng = np.random.default_rng(0)
    n_timepoints, n_voxels, start, width = 50, 700, 100, 512
    data = (rng.standard_normal((n_timepoints, n_voxels)) * 4 + 900).astype(dtype)
    data[:, start + 3] = 12.0  # constant column
    data[7, start + 5] = np.nan
    seeds = rng.standard_normal((6, n_timepoints))
    seeds -= seeds.mean(axis=1, keepdims=True)
    seeds = (seeds / np.linalg.norm(seeds, axis=1, keepdims=True)).astype(np.float32)
    stored = data.view(np.uint16) if dtype == np.float16 else data
    expected = _reference_r(data[:, start : start + width], seeds)

    products = np.empty((6, width), dtype=np.float32)
    inverse_norms = np.empty(width, dtype=np.float32)
    kernels.correlate_block(stored, start, seeds, products, inverse_norms)
    centred = np.empty((n_timepoints, width), dtype=np.float32)
    inverse_norms_2 = np.empty(width, dtype=np.float32)
    kernels.centre_block(stored, start, centred, inverse_norms_2)
    products_2 = seeds @ centred

    valid = np.ones(width, dtype=bool)
    valid[[3, 5]] = False
    for values, norms in ((products, inverse_norms), (products_2, inverse_norms_2)):
        np.testing.assert_array_equal(norms != 0, valid)
        r = values[:, valid] * norms[valid]
        np.testing.assert_allclose(r, expected[:, valid], atol=2e-6)


def test_accumulate_folds_valid_pairs_around_the_first_subject():
    rng = np.random.default_rng(2)
    n_lesions, width = 3, 40
    valid_seeds = np.array([True, False, True])
    valid_voxels = np.ones(width, dtype=np.float32)
    valid_voxels[7] = 0
    shift = np.zeros((n_lesions, width), dtype=np.float32)
    sums = np.zeros((n_lesions, width), dtype=np.float32)
    squares = np.zeros((n_lesions, width), dtype=np.float32)
    z = rng.normal(size=(3, n_lesions, width)).astype(np.float32)
    for subject in range(3):
        kernels.accumulate(z[subject].copy(), valid_voxels, valid_seeds, subject == 0, shift, sums, squares)
    counted = valid_seeds[:, None] & (valid_voxels != 0)
    d = np.where(counted, z.astype(np.float64) - np.where(valid_voxels != 0, z[0], 0), 0)
    np.testing.assert_allclose(sums, d.sum(axis=0), atol=1e-5)
    np.testing.assert_allclose(squares, (d**2).sum(axis=0), atol=1e-5)
    assert np.all(sums[1] == 0) and np.all(squares[:, 7] == 0)


def test_scale_and_clip_gives_clipped_r():
    products = np.array([[0.5, 3.0, -3.0, 0.2]], dtype=np.float32)
    norms = np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    kernels.scale_and_clip(products, norms, np.float32(0.99))
    np.testing.assert_array_equal(products, np.float32([[0.5, 0.99, -0.99, 0.0]]))


@pytest.mark.parametrize("df", [1, 2, 3, 7, 29, 99, 999, 5000, 100_000])
def test_two_sided_p_matches_scipy(df):
    rng = np.random.default_rng(df)
    t = np.concatenate([np.abs(rng.standard_normal(50_000)) * rng.choice([0.5, 3, 30, 300], 50_000), [0.0, 1e-9, 1e12]])
    expected = 2 * special.stdtr(df, -t)
    p = two_sided_p(t, df)
    relevant = expected > 1e-300
    np.testing.assert_allclose(p[relevant], expected[relevant], rtol=1e-7, atol=0)
    assert np.all(p[~relevant] < 1e-290)


def test_two_sided_p_with_degrees_of_freedom_per_value():
    t = np.array([0.5, 2.0, 2.0, 10.0])
    df = np.array([3, 3, 40, 40])
    np.testing.assert_allclose(two_sided_p(t, df), 2 * special.stdtr(df, -t), rtol=1e-7)


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=5000) ** 3, np.full(50, 0.01), [1.0, 0.0]])  # with ties
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12)
