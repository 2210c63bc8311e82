"""Functional LNM against a plain numpy implementation (np.corrcoef per subject)."""

from __future__ import annotations

import shutil
import threading

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from lacuna import SubjectData
from lacuna.analysis.functional.network_mapping import FunctionalNetworkMapping
from lacuna.resources.connectomes import (
    ConnectomeError,
    get_connectome_path,
    list_connectomes,
    register_functional_connectome,
)
from lacuna.core.errors import AnalysisError
from lacuna.core.spaces import standard_grid
from lacuna.formats.functional_connectome import ConnectomeFormatError, ConnectomeWriter, FunctionalConnectome

SPACE = "MNI152NLin6Asym"
R_MAX = 1 - 2**-20  # documented clip of r before arctanh
GRID = standard_grid(SPACE, 2)


def _mask() -> np.ndarray:
    mask = np.zeros(GRID.shape, dtype=bool)
    mask[36:50, 50:64, 40:50] = True  # 1960 voxels
    return mask


def _timeseries(n_subjects: int, n_timepoints: int, seed: int = 0) -> np.ndarray:
    """Noise plus a few shared signals (moderate correlations), raw offset of 500."""
    rng = np.random.default_rng(seed)
    n_voxels = int(_mask().sum())
    data = rng.standard_normal((n_subjects, n_timepoints, n_voxels))
    signals = rng.standard_normal((n_subjects, n_timepoints, 3))
    loadings = rng.uniform(0, 0.5, size=(3, n_voxels))
    return data + signals @ loadings + 500.0


def _write(path, data, dtype=np.float32, batches=1):
    indices = np.array(np.nonzero(_mask()))
    splits = np.array_split(np.arange(data.shape[0]), batches)
    paths = []
    for number, subjects in enumerate(splits):
        target = path / f"batch_{number:03d}.h5" if batches > 1 else path
        with ConnectomeWriter(target, len(subjects), data.shape[1], indices, GRID.affine, GRID.shape, SPACE, 2.0, dtype=dtype) as writer:
            for subject in subjects:
                writer.write(data[subject].astype(dtype))
        paths.append(target)
    return path


def _lesion(tmp_path, name, voxels, grid=GRID) -> SubjectData:
    data = np.zeros(grid.shape, dtype=np.uint8)
    for index in voxels:
        data[index] = 1
    path = tmp_path / f"sub-{name}_space-{SPACE}_label-lesion_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, grid.affine), path)
    return SubjectData.from_nifti(path)


def _reference(stored: np.ndarray, lesion_columns: np.ndarray, selected_columns=None) -> dict:
    """Plain numpy: per subject np.corrcoef of the seed with every voxel, then stats."""
    columns = lesion_columns if selected_columns is None else selected_columns
    z = []
    for subject in stored.astype(np.float64):
        seed = subject[:, columns].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):  # constant/NaN voxels give NaN
            r = np.corrcoef(np.vstack([seed, subject.T]))[0, 1:]
        z.append(np.arctanh(np.clip(r, -R_MAX, R_MAX)))
    z = np.array(z)
    n = z.shape[0]
    mean = z.mean(axis=0)
    sd = z.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n))
    p = 2 * stats.t.sf(np.abs(t), df=n - 1)
    return {"z": mean, "r": np.tanh(mean), "t": t, "sd": sd, "p": p, "pfdr": _benjamini_hochberg(p)}


def _benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1)
    return out


def _columns(voxels) -> np.ndarray:
    lookup = np.full(GRID.shape, -1)
    lookup[_mask()] = np.arange(_mask().sum())
    return np.sort([lookup[v] for v in voxels if lookup[v] >= 0])


def _map(result: SubjectData, connectome: str, stat: str) -> np.ndarray:
    return result.results["FunctionalNetworkMapping"][f"{connectome}_{stat}"].data[_mask()]


LESION_A = [(40 + i, 55 + j, 44) for i in range(3) for j in range(3)]  # 9 voxels inside
LESION_B = [(49, 63, 49), (50, 63, 49), (51, 63, 49)]  # 1 inside, 2 outside the mask


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_maps_match_numpy_reference(tmp_path, dtype):
    data = _timeseries(8, 40)
    _write(tmp_path / "conn.h5", data, dtype=dtype)
    stored = data.astype(dtype)
    lesions = [_lesion(tmp_path, "A", LESION_A), _lesion(tmp_path, "B", LESION_B)]
    analysis = FunctionalNetworkMapping(tmp_path / "conn.h5")
    results = analysis.run_batch(lesions)
    for result, voxels in zip(results, (LESION_A, LESION_B)):
        expected = _reference(stored, _columns(voxels))
        # The seed's own voxel (single-voxel seed): r = 1 in every subject, sd(z) = 0, t is
        # undefined; Lacuna documents t = 0 and p = 1 there.
        undefined = expected["sd"] < 1e-9
        assert undefined.sum() == (1 if len(_columns(voxels)) == 1 else 0)
        np.testing.assert_allclose(_map(result, "conn", "z"), expected["z"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(_map(result, "conn", "r"), expected["r"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(_map(result, "conn", "t")[~undefined], expected["t"][~undefined], atol=1e-4, rtol=0)
        assert np.all(_map(result, "conn", "t")[undefined] == 0)
        assert np.all(_map(result, "conn", "p")[undefined] == 1)
        np.testing.assert_allclose(_map(result, "conn", "p")[~undefined], expected["p"][~undefined], atol=1e-5, rtol=1e-3)
        defined_fdr = _benjamini_hochberg(np.where(undefined, 1.0, expected["p"]))
        np.testing.assert_allclose(_map(result, "conn", "pfdr"), defined_fdr, atol=1e-5, rtol=1e-3)
        # outside the brain mask: 0 for statistics, 1 for p
        volume = result.results["FunctionalNetworkMapping"]["conn_t"].data
        assert np.all(volume[~_mask()] == 0)
        assert np.all(result.results["FunctionalNetworkMapping"]["conn_p"].data[~_mask()] == 1)
    scalars = results[1].results["FunctionalNetworkMapping"]
    assert scalars["conn_lesion_fraction_in_mask"].value == pytest.approx(1 / 3)
    assert scalars["conn_lesion_voxels_used"].value == 1
    assert scalars["conn_n_subjects"].value == 8
    t = _reference(stored, _columns(LESION_B))["t"]
    t = np.where(np.isfinite(t) & (np.abs(t) < 1e6), t, 0)
    assert scalars["conn_peak_t"].value == pytest.approx(t[np.argmax(np.abs(t))], abs=1e-3)


# Eight lesions of 1-9 voxels, enough for the centre + matrix-product path of the engine
# (the one-pass kernel serves up to DIRECT_MAX_LESIONS lesions).
COHORT = [[(40 + i, 55 + j, 42 + k) for i in range(1 + k % 3) for j in range(3)] for k in range(8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cohort_pass_matches_numpy_reference(tmp_path, dtype):
    from lacuna.analysis.functional.engine import DIRECT_MAX_LESIONS

    assert len(COHORT) > DIRECT_MAX_LESIONS
    data = _timeseries(11, 33, seed=11)
    data[3, :, 70] = 2.5  # constant voxel in one subject
    data[6, 5, 300] = np.inf  # non-finite voxel in another
    (tmp_path / "batched").mkdir()
    _write(tmp_path / "batched", data, dtype=dtype, batches=2)
    stored = data.astype(dtype)
    lesions = [_lesion(tmp_path, f"L{k}", voxels) for k, voxels in enumerate(COHORT)]
    results = FunctionalNetworkMapping(tmp_path / "batched").run_batch(lesions)
    for result, voxels in zip(results, COHORT):
        expected = _reference(stored, _columns(voxels))
        for voxel, bad in ((70, 3), (300, 6)):
            keep = [s for s in range(11) if s != bad]
            for stat, value in _reference(stored[keep], _columns(voxels)).items():
                expected[stat][voxel] = value[voxel]
        for stat in ("z", "r", "t"):
            np.testing.assert_allclose(_map(result, "batched", stat), expected[stat], atol=1e-4, rtol=0)
        np.testing.assert_allclose(_map(result, "batched", "p"), expected["p"], atol=1e-5, rtol=1e-3)


def test_unmappable_files_are_read_through_hdf5(tmp_path):
    """A compressed connectome cannot be memory-mapped: HDF5 reads it, same maps."""
    data = _timeseries(6, 24, seed=13)
    _write(tmp_path / "plain.h5", data)
    indices = np.array(np.nonzero(_mask()))
    with h5py.File(tmp_path / "gzip.h5", "w") as handle:
        handle.create_dataset("timeseries", data=data.astype(np.float32), chunks=(1, 24, indices.shape[1]), compression="gzip")
        handle.create_dataset("mask_indices", data=indices)
        handle.create_dataset("mask_affine", data=GRID.affine)
        handle.attrs.update(mask_shape=GRID.shape, space=SPACE, resolution=2.0, format_version="1.0")
    lesions = [_lesion(tmp_path, f"L{k}", voxels) for k, voxels in enumerate(COHORT[:6])]
    plain = FunctionalNetworkMapping(tmp_path / "plain.h5").run_batch(lesions)
    compressed = FunctionalNetworkMapping(tmp_path / "gzip.h5").run_batch(lesions)
    for a, b in zip(plain, compressed):
        np.testing.assert_array_equal(_map(a, "plain", "t"), _map(b, "gzip", "t"))


def test_batch_split_and_cohort_size_do_not_change_the_maps(tmp_path):
    data = _timeseries(20, 30, seed=3)
    _write(tmp_path / "single.h5", data)
    (tmp_path / "batched").mkdir()
    _write(tmp_path / "batched", data, batches=3)
    lesion = _lesion(tmp_path, "A", LESION_A)
    other = _lesion(tmp_path, "B", LESION_B)
    single = FunctionalNetworkMapping(tmp_path / "single.h5").run(lesion)
    batched = FunctionalNetworkMapping(tmp_path / "batched").run(lesion)
    cohort = FunctionalNetworkMapping(tmp_path / "batched").run_batch([other, lesion])[1]
    for stat in ("z", "t", "p"):
        # The file split changes nothing, to the bit.
        np.testing.assert_array_equal(_map(single, "single", stat), _map(batched, "batched", stat))
        # Mapping alongside other lesions only changes float32 rounding.
        np.testing.assert_allclose(_map(cohort, "batched", stat), _map(batched, "batched", stat), atol=1e-4, rtol=1e-5)


def test_pini_selects_voxels_over_all_subjects(tmp_path):
    data = _timeseries(12, 30, seed=5)
    _write(tmp_path / "single.h5", data)
    (tmp_path / "batched").mkdir()
    _write(tmp_path / "batched", data, batches=4)
    voxels = [(40 + i, 55 + j, 44 + k) for i in range(3) for j in range(3) for k in range(2)]  # 18 voxels
    lesion = _lesion(tmp_path, "A", voxels)
    columns = _columns(voxels)
    # Reference selection: leading eigenvector of the summed correlation matrices.
    total = sum(np.corrcoef(subject[:, columns].T) for subject in data.astype(np.float32).astype(np.float64))
    loadings = np.abs(np.linalg.eigh(total)[1][:, -1])
    selected = columns[loadings >= np.percentile(loadings, 30)]
    assert 0 < selected.size < columns.size
    expected = _reference(data.astype(np.float32), columns, selected)
    for path, name in ((tmp_path / "single.h5", "single"), (tmp_path / "batched", "batched")):
        result = FunctionalNetworkMapping(path, method="pini", pini_percentile=30).run(lesion)
        np.testing.assert_allclose(_map(result, name, "z"), expected["z"], atol=1e-4)
        np.testing.assert_allclose(_map(result, name, "t"), expected["t"], atol=1e-4)
        used = result.results["FunctionalNetworkMapping"][f"{name}_lesion_voxels_used"].value
        assert used == selected.size


def test_lesion_outside_the_mask_fails_alone(tmp_path):
    data = _timeseries(5, 20)
    _write(tmp_path / "conn.h5", data)
    outside = _lesion(tmp_path, "X", [(10, 10, 10)])
    inside = _lesion(tmp_path, "A", LESION_A)
    outcomes = dict(FunctionalNetworkMapping(tmp_path / "conn.h5").iter_batch([outside, inside]))
    assert isinstance(outcomes[0], AnalysisError) and "brain mask" in str(outcomes[0])
    assert isinstance(outcomes[1], SubjectData)


def test_1mm_lesion_is_resampled_to_the_connectome_grid(tmp_path):
    data = _timeseries(5, 20)
    _write(tmp_path / "conn.h5", data)
    grid_1mm = standard_grid(SPACE, 1)
    # 2 mm voxel (41, 56, 44) covers 1 mm voxels 81..83 x 111..113 x 87..89 (half at the edges).
    voxels = [(x, y, z) for x in range(81, 84) for y in range(111, 114) for z in range(87, 90)]
    lesion = _lesion(tmp_path, "A", voxels, grid=grid_1mm)
    result = FunctionalNetworkMapping(tmp_path / "conn.h5", return_in_input_space=False).run(lesion)
    expected = _reference(data.astype(np.float32), _columns([(41, 56, 44)]))
    np.testing.assert_allclose(_map(result, "conn", "z"), expected["z"], atol=1e-4)
    assert any("resampled" in note for note in result.provenance[-1].notes)
    # By default the maps come back on the lesion's 1 mm grid.
    back = FunctionalNetworkMapping(tmp_path / "conn.h5").run(lesion).results["FunctionalNetworkMapping"]["conn_z"]
    assert back.data.shape == grid_1mm.shape and back.resolution == 1.0


def test_zero_variance_and_nan_voxels_are_left_out_per_subject(tmp_path):
    data = _timeseries(6, 25, seed=7)
    data[2, :, 100] = 7.0  # constant voxel in subject 2
    data[4, 3, 200] = np.nan  # non-finite voxel in subject 4
    _write(tmp_path / "conn.h5", data)
    lesion = _lesion(tmp_path, "A", LESION_A)
    result = FunctionalNetworkMapping(tmp_path / "conn.h5").run(lesion)
    t = _map(result, "conn", "t")
    assert np.all(np.isfinite(t))
    for voxel, bad_subject in ((100, 2), (200, 4)):
        keep = [s for s in range(6) if s != bad_subject]
        expected = _reference(data[keep].astype(np.float32), _columns(LESION_A))
        assert t[voxel] == pytest.approx(expected["t"][voxel], abs=1e-4)


def test_malformed_connectomes_are_rejected(tmp_path):
    data = _timeseries(3, 10)
    _write(tmp_path / "good.h5", data)
    broken = tmp_path / "broken.h5"
    shutil.copy(tmp_path / "good.h5", broken)
    with h5py.File(broken, "a") as handle:
        del handle["mask_indices"]
    with pytest.raises(ConnectomeFormatError, match="mask_indices"):
        FunctionalConnectome.open(broken)
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tmp_path / "good.h5", folder / "a.h5")
    with ConnectomeWriter(folder / "b.h5", 1, 10, np.array(np.nonzero(_mask()))[:, :-1], GRID.affine, GRID.shape, SPACE, 2.0) as writer:
        writer.write(np.ones((10, int(_mask().sum()) - 1)))
    with pytest.raises(ConnectomeFormatError, match="different brain masks"):
        FunctionalConnectome.open(folder)
    with pytest.raises(FileNotFoundError):
        FunctionalConnectome.open(tmp_path / "missing.h5")


def test_registry_persists_and_survives_a_moved_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LACUNA_DATA_DIR", str(cache))
    (cache / "connectomes").mkdir(parents=True)
    _write(cache / "connectomes" / "tiny.h5", _timeseries(4, 12))
    register_functional_connectome("Tiny", cache / "connectomes" / "tiny.h5", SPACE, 2.0, n_subjects=4)
    with pytest.raises(ConnectomeError, match="already registered"):
        register_functional_connectome("Tiny", cache / "connectomes" / "tiny.h5", SPACE, 2.0)
    with pytest.raises(ConnectomeError, match="MNI152NLin2009cAsym"):
        register_functional_connectome("Wrong", cache / "connectomes" / "tiny.h5", "MNI152NLin2009cAsym", 2.0)
    # The cache is mounted elsewhere (as in a container): the registration still resolves.
    moved = tmp_path / "mounted"
    cache.rename(moved)
    monkeypatch.setenv("LACUNA_DATA_DIR", str(moved))
    assert [c.name for c in list_connectomes("functional")] == ["Tiny"]
    assert get_connectome_path("Tiny") == (moved / "connectomes" / "tiny.h5").resolve()
    lesion = _lesion(tmp_path, "A", LESION_A)
    result = FunctionalNetworkMapping("Tiny").run(lesion)
    assert result.results["FunctionalNetworkMapping"]["Tiny_n_subjects"].value == 4


def test_mapped_reader_faults_subjects_in_on_huge_pages(tmp_path, monkeypatch):
    """The mapping is advised to use huge pages; the reader thread faults each subject in
    before it is handed over; the subjects still come out exactly as stored."""
    import mmap

    from lacuna.formats import functional_connectome as reader

    data = _timeseries(6, 24, seed=5)
    _write(tmp_path / "c.h5", data)
    advice, faulted = [], []
    real_madvise, real_populate = reader.madvise, reader._populate

    def recording_madvise(mapped, start, length, how):
        advice.append((start, length, how))
        return real_madvise(mapped, start, length, how)

    def recording_populate(mapped, start, length):
        real_populate(mapped, start, length)
        faulted.append((start, threading.current_thread().name))

    monkeypatch.setattr(reader, "madvise", recording_madvise)
    monkeypatch.setattr(reader, "_populate", recording_populate)
    subjects, faulted_when_handed_over = [], []
    for timeseries in FunctionalConnectome.open(tmp_path / "c.h5").iter_subjects(prefetch=1):
        faulted_when_handed_over.append(len(faulted))
        subjects.append(timeseries.copy())
    np.testing.assert_array_equal(np.stack(subjects), data.astype(np.float32))
    assert advice[0][0] == 0 and advice[0][2] == mmap.MADV_HUGEPAGE  # the whole file, first
    starts = [start for start, _ in faulted]
    assert starts == sorted(starts) and len(set(starts)) == 6  # each subject once, in order
    assert all(name == "connectome-reader" for _, name in faulted)
    assert all(count >= index + 1 for index, count in enumerate(faulted_when_handed_over))


def test_pass_with_many_blocks_and_groups_in_flight_matches_numpy(tmp_path, monkeypatch):
    """The threads queue a group's blocks before the previous group's are done; each
    block waits for its own block of the previous group. The first block of the first
    group (whose first subject sets the shift) is held back, so that without that wait
    the next group would overtake it."""
    import time

    from lacuna.analysis.functional import engine as engine

    data = _timeseries(11, 30, seed=9)
    connectome = FunctionalConnectome.open(_write(tmp_path / "c.h5", data))
    columns = [np.arange(40, 60), np.arange(700, 705), np.arange(1500, 1540)]
    monkeypatch.setenv("LACUNA_NUM_THREADS", "3")
    monkeypatch.setattr(engine, "part_width", lambda *args: 64)  # 16 blocks of 128 voxels
    mapped = engine._BlockMapper.__call__

    def held_back(mapper, group, block):
        if group.first and block.start == 0:
            time.sleep(0.1)
        return mapped(mapper, group, block)

    monkeypatch.setattr(engine._BlockMapper, "__call__", held_back)
    subject_bytes = data[0].astype(np.float32).nbytes
    sums, _ = engine.stream_fisher_z(connectome, engine.SeedDefinition.means(columns), memory_bytes=2 * 3 * subject_bytes)

    assert sums.n_subjects == 11
    for lesion, lesion_columns in enumerate(columns):
        z = []
        for subject in data.astype(np.float32).astype(np.float64):
            seed = subject[:, lesion_columns].mean(axis=1)
            r = np.corrcoef(np.vstack([seed, subject.T]))[0, 1:]
            z.append(np.arctanh(np.clip(r, -R_MAX, R_MAX)))
        z = np.array(z)
        np.testing.assert_allclose(sums.shift[lesion], z[0], atol=1e-5)
        np.testing.assert_allclose(sums.shift[lesion] + sums.sum_dz[lesion] / 11, z.mean(axis=0), atol=1e-5)
        deviations = z - sums.shift[lesion]
        np.testing.assert_allclose(sums.sum_dz2[lesion], (deviations**2).sum(axis=0), atol=1e-4)


def test_a_pass_taking_over_earlier_sums_matches_a_fresh_pass(tmp_path):
    """Sums of an earlier pass (more lesions, values left in them) handed to the next
    pass are zeroed and reused in place: the result equals a pass with new sums."""
    from lacuna.analysis.functional import engine as engine

    data = _timeseries(7, 30, seed=12)
    connectome = FunctionalConnectome.open(_write(tmp_path / "c.h5", data))
    earlier, _ = engine.stream_fisher_z(connectome, engine.SeedDefinition.means([np.arange(5, 9), np.arange(100, 120), np.arange(300, 301)]))
    seeds = engine.SeedDefinition.means([np.arange(40, 60), np.arange(700, 705)])
    fresh, _ = engine.stream_fisher_z(connectome, seeds)
    reused, _ = engine.stream_fisher_z(connectome, seeds, reuse=earlier)
    assert np.shares_memory(reused.sum_dz, earlier.sum_dz) and reused.sum_dz.shape == fresh.sum_dz.shape
    for name in ("shift", "sum_dz", "sum_dz2"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(fresh, name))
    assert reused.n_subjects == fresh.n_subjects == 7


def test_a_pass_taking_reserved_sums_matches_a_fresh_pass(tmp_path):
    """Sums reserved on a background thread (for more lesions than the pass maps) are
    taken as they are, not zeroed again, and give the sums of a pass with new ones."""
    from lacuna.analysis.functional import engine as engine

    data = _timeseries(7, 30, seed=13)
    connectome = FunctionalConnectome.open(_write(tmp_path / "c.h5", data))
    seeds = engine.SeedDefinition.means([np.arange(40, 60), np.arange(700, 705)])
    fresh, _ = engine.stream_fisher_z(connectome, seeds)
    reservation = engine.SumsReservation(3, connectome.n_voxels)
    reused, _ = engine.stream_fisher_z(connectome, seeds, reuse=reservation)
    assert reused.sum_dz.shape == fresh.sum_dz.shape == (2, connectome.n_voxels)
    for name in ("shift", "sum_dz", "sum_dz2"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(fresh, name))
    with pytest.raises(RuntimeError, match="taken already"):
        reservation.take()


def test_reserved_sums_raise_what_making_them_raised(monkeypatch):
    from lacuna.analysis.functional import engine as engine

    def no_memory(*args):
        raise MemoryError("no room for the sums")

    monkeypatch.setattr(engine.FisherZSums, "zeros", no_memory)
    reservation = engine.SumsReservation(4, 10)
    with pytest.raises(MemoryError, match="no room"):
        reservation.take()
