"""The compiled kernels and fast statistics of functional LNM against numpy and scipy."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numba.extending import get_cython_function_address
from scipy import special, stats

from lacuna.analysis import compiled_primitives
from lacuna.analysis.functional import kernels as kernels
from lacuna.analysis.functional import statistics_kernels
from lacuna.analysis.functional.engine import R_MAX
from lacuna.analysis.functional.t_statistics import benjamini_hochberg, two_sided_p


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


def _unit_seeds(rng, n_lesions: int, n_timepoints: int) -> np.ndarray:
    seeds = rng.standard_normal((n_lesions, n_timepoints))
    seeds -= seeds.mean(axis=1, keepdims=True)
    return (seeds / np.linalg.norm(seeds, axis=1, keepdims=True)).astype(np.float32)


def _map_group(stored: list, seeds: np.ndarray, valid_seeds: np.ndarray, start: int, stop: int, part_width: int, totals=None, sgemm=None):
    """Run map_group over one group; returns the totals and the invalid voxels."""
    n_subjects, n_lesions, n_timepoints = seeds.shape
    n_voxels = stored[0].shape[1]
    first = totals is None
    if first:
        totals = (np.zeros((n_lesions, n_voxels), np.float32), np.zeros((n_lesions, n_voxels)), np.zeros((n_lesions, n_voxels)))
    invalid = np.empty((n_subjects, stop - start), dtype=bool)
    contiguous = [np.ascontiguousarray(timeseries) for timeseries in stored]
    addresses = np.array([timeseries.ctypes.data for timeseries in contiguous])
    workspace = kernels.new_workspace(n_timepoints, n_lesions, part_width)
    kernels.map_group(contiguous[0], addresses, seeds, valid_seeds, start, stop, first, np.float32(R_MAX), sgemm or compiled_primitives.blas_sgemm(), totals, workspace, invalid)
    return totals, invalid


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_lesions", [1, 2, 7])  # one-pass products (one seed, a few); centring and sgemm
def test_map_group_sums_match_numpy(dtype, n_lesions):
    rng = np.random.default_rng(0)
    n_subjects, n_timepoints, n_voxels, start, stop = 5, 50, 700, 100, 650
    data = (rng.standard_normal((n_subjects, n_timepoints, n_voxels)) * 4 + 900).astype(dtype)
    data[:, :, 103] = 12.0  # constant column
    data[2, 7, 105] = np.nan  # invalid in one subject
    seeds = np.stack([_unit_seeds(rng, n_lesions, n_timepoints) for _ in range(n_subjects)])
    valid_seeds = np.ones((n_subjects, n_lesions), dtype=bool)
    valid_seeds[3, -1] = False
    seeds[3, -1] = 0.0
    stored = [d.view(np.uint16) if dtype == np.float16 else d for d in data]

    # Two groups (first sets the shift), parts that do not divide the voxel range.
    totals, invalid_1 = _map_group(stored[:2], seeds[:2], valid_seeds[:2], start, stop, part_width=96)
    totals, invalid_2 = _map_group(stored[2:], seeds[2:], valid_seeds[2:], start, stop, part_width=96, totals=totals)

    r = np.stack([_reference_r(d[:, start:stop], s) for d, s in zip(data, seeds)])
    valid_voxels = np.isfinite(r).all(axis=1)  # (subjects, voxels)
    np.testing.assert_array_equal(np.concatenate([invalid_1, invalid_2]), ~valid_voxels)
    z = np.arctanh(np.clip(np.nan_to_num(r), -R_MAX, R_MAX))
    counted = valid_seeds[:, :, None] & valid_voxels[:, None, :]
    shift = np.where(counted[0], z[0], 0.0)
    d = np.where(counted, z - shift, 0.0)
    shift_total, sum_dz, sum_dz2 = totals
    np.testing.assert_allclose(shift_total[:, start:stop], shift, atol=2e-6)
    np.testing.assert_allclose(sum_dz[:, start:stop], d.sum(axis=0), atol=1e-5)
    np.testing.assert_allclose(sum_dz2[:, start:stop], (d**2).sum(axis=0), atol=1e-5)
    outside = np.r_[0:start, stop:n_voxels]
    assert not sum_dz[:, outside].any() and not shift_total[:, outside].any()


def test_scipy_blas_gives_the_same_sums():
    # blas_sgemm prefers numpy's OpenBLAS (64-bit integers); scipy's (32-bit) is the
    # fallback where numpy uses another BLAS.
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 40, 300)).astype(np.float32)
    seeds = np.stack([_unit_seeds(rng, 9, 40) for _ in range(2)])
    valid = np.ones((2, 9), dtype=bool)
    scipy_sgemm = (get_cython_function_address("scipy.linalg.cython_blas", "sgemm"), 32)
    preferred, _ = _map_group(list(data), seeds, valid, 0, 300, part_width=64)
    fallback, _ = _map_group(list(data), seeds, valid, 0, 300, part_width=64, sgemm=scipy_sgemm)
    for ours, theirs in zip(preferred, fallback):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(preferred[1]).sum() > 1  # something was summed


def test_fisher_z_matches_arctanh():
    values = np.concatenate(
        [
            np.linspace(-R_MAX, R_MAX, 200_001),
            np.float32([R_MAX, -R_MAX, 0.0, -0.0]),
            np.logspace(-30, -0.01, 5000),
            -np.logspace(-30, -0.01, 5000),
        ]
    ).astype(np.float32)
    out = np.empty_like(values)
    kernels.fisher_z_array(values, out)
    exact = np.arctanh(values.astype(np.float64))
    np.testing.assert_allclose(out, exact, rtol=6e-7, atol=0)


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


@pytest.mark.parametrize(
    "p",
    [
        np.random.default_rng(2).uniform(size=70_000) ** 6,  # many decades: every radix pass runs
        np.full(1000, 0.25),  # one value: every pass skipped, index order kept
        np.array([1.0, 0.0, 1e-300, 0.5, 0.5, 1.0]),
        np.array([0.3]),
    ],
)
def test_radix_sort_of_rank_keys_equals_numpy_sort(p):
    keys = np.empty(p.size, dtype=np.uint64)
    shift = statistics_kernels.rank_keys(p, keys)
    expected = np.sort(keys)
    statistics_kernels.radix_sort_keys(keys, shift, np.empty_like(keys))
    np.testing.assert_array_equal(keys, expected)


@pytest.mark.parametrize(
    ("flags", "architecture", "expected"),
    [
        ("fpu avx2 avx512f avx512cd avx512bw avx512dq avx512vl", "Haswell", True),
        ("fpu avx2 avx512f avx512cd avx512bw avx512dq avx512vl", "SkylakeX", False),
        ("fpu avx2 fma", "Haswell", False),
    ],
)
def test_avx2_blas_on_avx512_cpu_is_detected(tmp_path, monkeypatch, flags, architecture, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    libraries = [{"internal_api": "openblas", "architecture": architecture, "filepath": "x"}]
    monkeypatch.setattr(compiled_primitives.threadpoolctl, "threadpool_info", lambda: libraries)
    assert compiled_primitives.avx2_blas_on_avx512_cpu(str(cpuinfo)) is expected
    assert compiled_primitives.avx2_blas_on_avx512_cpu(str(tmp_path / "missing")) is False


def test_single_threaded_blas_limits_every_blas_library_and_restores_them():
    import threadpoolctl

    def blas_threads():
        return [library["num_threads"] for library in threadpoolctl.threadpool_info() if library["user_api"] == "blas"]

    compiled_primitives.blas_sgemm()  # the libraries the mapping calls are loaded
    before = blas_threads()
    with compiled_primitives.single_threaded_blas():
        inside = blas_threads()
    assert inside and all(threads == 1 for threads in inside)
    assert blas_threads() == before


def test_blas_pools_not_started_unless_the_user_asked_for_threads():
    """The participant level never lets BLAS use its own threads, so their pools are not
    started at all (numpy's and scipy's OpenBLAS load with one thread); a thread count
    the user (or --omp-nthreads) gave is left alone."""
    import os
    import subprocess
    import sys

    code = (
        "from lacuna.core.threads import library_pools_not_started\n"
        "library_pools_not_started()\n"
        "import numpy, scipy.linalg, threadpoolctl\n"
        "print(sorted({lib['num_threads'] for lib in threadpoolctl.threadpool_info() if lib['user_api'] == 'blas'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert unset.stdout.strip() == "[1]", unset.stdout + unset.stderr
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"}, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "[2]", chosen.stdout + chosen.stderr


def test_compiled_kernels_are_cached_in_the_user_cache_not_beside_the_code(tmp_path):
    import os
    import subprocess
    import sys

    code = tmp_path / "installed"
    code.mkdir()
    (code / "tiny_kernel.py").write_text(
        "from lacuna.core.compiled import compile_kernel\n\n\n"
        "@compile_kernel\ndef double(x):\n    return 2 * x\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    run = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r}); import tiny_kernel; print(tiny_kernel.double(21))"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "42"
    assert list((tmp_path / "cache" / "lacuna" / "numba").rglob("*.nbi"))
    assert not list(code.rglob("*.nbi"))  # nothing written beside the (installed) code


def test_p_tables_come_from_the_data_cache_without_scipy_special(tmp_path):
    """The first process derives the table of its degrees of freedom with scipy and
    keeps it; the next one reads it and never imports scipy.special (50 ms)."""
    code = (
        "import sys, numpy as np\n"
        "from lacuna.analysis.functional.t_statistics import two_sided_p\n"
        "p = two_sided_p(np.array([0.0, 1.0, 2.5, 7.0]), 29.0)\n"
        "print(' '.join(repr(float(v)) for v in p), 'scipy.special' in sys.modules)\n"
    )
    env = dict(os.environ, LACUNA_DATA_DIR=str(tmp_path))
    first, second = (subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split() for _ in range(2))
    assert first[-1] == "True" and second[-1] == "False"
    assert first[:-1] == second[:-1]  # the same values from the kept table
    np.testing.assert_allclose([float(v) for v in second[:-1]], 2 * stats.t.sf([0.0, 1.0, 2.5, 7.0], 29), rtol=1e-7)
    assert list((tmp_path / "derived" / "t-tail-tables").glob("*.npz"))
