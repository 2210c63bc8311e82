"""Parcel statistics through the sparse operator equal resampling then reducing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from lacuna import SubjectData
from lacuna.analysis import ParcelAggregation
from lacuna.analysis.regional.parcel_operator import ParcelOperator, parcel_operator
from lacuna.resources.parcellations import ParcellationImage
from lacuna.core.results import VoxelMap
from lacuna.core.grid import Grid
from lacuna.core.spaces import standard_grid

from conftest import sphere

SIX = "MNI152NLin6Asym"

# A small piece of the FSL lattice: 2 mm source, 1 mm target (the 1 mm voxels of odd
# index straddle 2 mm voxels, as on the full grids), and the 1 mm grid reaching one
# voxel beyond the 2 mm field of view (zeros there, as scipy's mode="constant").
SOURCE = Grid((14, 16, 12), np.array([[-2.0, 0, 0, 20], [0, 2, 0, -20], [0, 0, 2, -10], [0, 0, 0, 1]]))
TARGET = Grid((29, 33, 25), np.array([[-1.0, 0, 0, 20], [0, 1, 0, -20], [0, 0, 1, -10], [0, 0, 0, 1]]))


def _label_image(grid, n_regions=7, seed=0) -> ParcellationImage:
    """Blocky labels with an empty region (id 99) and a label not in the table (50)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(grid.shape, np.int32)
    coarse = rng.integers(0, n_regions + 1, size=(8, 8, 8))
    index = [np.minimum(np.arange(n) * 8 // n, 7) for n in grid.shape]
    labels[:] = coarse[np.ix_(*index)]
    labels[:5] = 50
    ids = list(range(1, n_regions + 1)) + [99]
    return ParcellationImage("Toy", labels, 1.0, grid.affine, ids, [f"r{i}" for i in ids], False)


def _plain_statistics(resampled: np.ndarray, labels: np.ndarray, ids, method: str, threshold: float) -> np.ndarray:
    out = []
    for region in ids:
        inside = resampled[labels == region]
        if inside.size == 0:
            out.append(np.nan)
        elif method == "mean":
            out.append(inside.mean())
        elif method == "sum":
            out.append(inside.sum())
        elif method == "max":
            out.append(inside.max())
        else:
            out.append(100.0 * np.mean(inside > threshold))
    return np.array(out)


@pytest.mark.parametrize("method", ["mean", "sum", "max", "percent"])
def test_label_statistics_equal_resample_then_numpy(method):
    source, target = SOURCE, TARGET
    image = _label_image(target)
    values = np.random.default_rng(1).standard_normal(source.shape)
    resampled = np.asanyarray(
        resample_from_to(nib.Nifti1Image(values, source.affine), (target.shape, target.affine), order=1, mode="constant", cval=0.0).dataobj
    )
    expected = _plain_statistics(resampled, image.data, image.region_ids, method, 0.3)
    got = ParcelOperator(source, image).apply(values, method, 0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert np.isnan(got[-1])  # region 99 has no voxel


@pytest.mark.parametrize("method", ["mean", "sum", "max", "percent"])
def test_probabilistic_statistics_are_probability_weighted(method):
    source, target = SOURCE, TARGET
    rng = np.random.default_rng(2)
    maps = np.zeros((*target.shape, 3), np.uint8)
    maps[4:20, 5:25, 4:20, 0] = rng.integers(0, 201, size=(16, 20, 16))
    maps[10:29, 15:33, 6:25, 1] = rng.integers(0, 201, size=(19, 18, 19))
    image = ParcellationImage("Prob", maps, 1 / 200, target.affine, [1, 2, 3], ["a", "b", "c"], True)
    values = rng.standard_normal(source.shape)
    resampled = np.asanyarray(
        resample_from_to(nib.Nifti1Image(values, source.affine), (target.shape, target.affine), order=1, mode="constant", cval=0.0).dataobj
    )
    expected = []
    for region in range(2):
        weights = maps[..., region].astype(float) / 200
        inside = weights > 0
        v, w = resampled[inside], weights[inside]
        expected.append(
            {"mean": (v * w).sum() / w.sum(), "sum": (v * w).sum(), "max": v.max(), "percent": 100 * (w * (v > 0.2)).sum() / w.sum()}[method]
        )
    got = ParcelOperator(source, image).apply(values, method, 0.2)
    np.testing.assert_allclose(got[:2], expected, rtol=1e-9)
    assert np.isnan(got[2])


def test_operators_are_built_once_per_grid_and_parcellation():
    image = _label_image(TARGET)
    assert parcel_operator(SOURCE, image) is parcel_operator(SOURCE, image)
    assert parcel_operator(TARGET, image) is not parcel_operator(SOURCE, image)


def _subject_with_map(values: np.ndarray, grid) -> SubjectData:
    mask = sphere(grid, (0, 0, 0), 6)
    subject = SubjectData(nib.Nifti1Image(mask, grid.affine), SIX)
    voxel_map = VoxelMap("t", values.astype(np.float32), grid.affine, SIX, 2.0)
    from lacuna.core.provenance import ProvenanceStep

    return subject.with_results("Fake", {"t": voxel_map}, ProvenanceStep(name="Fake", kind="analysis").finish())


def test_parcel_aggregation_gives_the_same_table_with_and_without_the_operator(shared_atlases, monkeypatch):
    grid = standard_grid(SIX, 2)
    values = np.random.default_rng(4).standard_normal(grid.shape)
    subject = _subject_with_map(values, grid)
    analysis = ParcelAggregation("Fake.t", ["Schaefer2018_100Parcels7Networks"], method="mean", atlas_dir=shared_atlases)
    fast = analysis.run(subject).results["ParcelAggregation"]
    monkeypatch.setattr(ParcelAggregation, "_by_operator", lambda *args: None)
    slow = analysis.run(subject).results["ParcelAggregation"]
    (key,) = fast
    np.testing.assert_allclose(fast[key].values, slow[key].values, rtol=1e-6, atol=1e-7)


def test_a_map_with_nan_takes_the_resampling_path(shared_atlases):
    grid = standard_grid(SIX, 2)
    values = np.random.default_rng(5).standard_normal(grid.shape)
    values[45, 54, 45] = np.nan
    subject = _subject_with_map(values, grid)
    analysis = ParcelAggregation("Fake.t", ["Schaefer2018_100Parcels7Networks"], method="mean", atlas_dir=shared_atlases)
    (table,) = analysis.run(subject).results["ParcelAggregation"].values()
    assert np.isfinite(table.values).all()  # non-finite voxels are ignored, as documented


def test_warm_up_builds_the_operator_the_first_map_then_uses(shared_atlases, monkeypatch):
    from lacuna.analysis.regional import parcel_operator as operators

    grid = standard_grid(SIX, 2)
    analysis = ParcelAggregation("Fake.t", ["Schaefer2018_100Parcels7Networks"], method="mean", atlas_dir=shared_atlases)
    operators._CACHE.clear()
    analysis.warm_up_for(grid, SIX)
    assert len(operators._CACHE) == 1
    built = []
    monkeypatch.setattr(operators, "ParcelOperator", lambda *args: built.append(args))
    subject = _subject_with_map(np.random.default_rng(6).standard_normal(grid.shape), grid)
    analysis.run(subject)
    assert built == []  # the first map found its operator ready


def test_an_operator_asked_for_by_two_threads_at_once_is_built_once(monkeypatch):
    import threading
    import time

    from lacuna.analysis.regional import parcel_operator as operators

    image = _label_image(TARGET, seed=3)
    real = operators.ParcelOperator
    built = []

    def slow_build(source, target_image):
        built.append(source)
        time.sleep(0.2)  # long enough for the other thread to ask meanwhile
        return real(source, target_image)

    monkeypatch.setattr(operators, "ParcelOperator", slow_build)
    found = []
    threads = [threading.Thread(target=lambda: found.append(parcel_operator(SOURCE, image))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert found[0] is found[1]


def test_a_second_operator_is_read_from_the_data_cache_with_the_same_numbers(isolated_data_dir, monkeypatch):
    from lacuna.analysis.regional import parcel_operator as operators

    image = _label_image(TARGET, seed=4)
    values = np.random.default_rng(8).standard_normal(SOURCE.shape)
    first = ParcelOperator(SOURCE, image)
    assert len(list((isolated_data_dir / "derived" / "parcel-operators").glob("*.npz"))) == 1
    monkeypatch.setattr(operators.ParcelOperator, "_region_sums", lambda self: pytest.fail("built again"))
    second = ParcelOperator(SOURCE, image)
    for method in ("mean", "sum"):
        np.testing.assert_array_equal(second.apply(values, method), first.apply(values, method))
    resampled = resample_from_to(nib.Nifti1Image(values, SOURCE.affine), (TARGET.shape, TARGET.affine), order=1).get_fdata()
    expected = _plain_statistics(resampled, image.data, image.region_ids, "max", 0.0)
    np.testing.assert_allclose(second.apply(values, "max"), expected, rtol=1e-10, atol=1e-12)  # membership made on demand


def test_changed_atlas_values_are_never_served_a_cached_operator(isolated_data_dir):
    image = _label_image(TARGET, seed=4)
    changed = _label_image(TARGET, seed=5)  # same grid, names and ids; other voxels
    values = np.random.default_rng(9).standard_normal(SOURCE.shape)
    ParcelOperator(SOURCE, image)
    resampled = resample_from_to(nib.Nifti1Image(values, SOURCE.affine), (TARGET.shape, TARGET.affine), order=1).get_fdata()
    expected = _plain_statistics(resampled, changed.data, changed.region_ids, "mean", 0.0)
    np.testing.assert_allclose(ParcelOperator(SOURCE, changed).apply(values, "mean"), expected, rtol=1e-10, atol=1e-12)
    assert len(list((isolated_data_dir / "derived" / "parcel-operators").glob("*.npz"))) == 2


def test_a_corrupt_or_unwritable_cache_only_costs_a_rebuild(isolated_data_dir, monkeypatch):
    image = _label_image(TARGET, seed=6)
    values = np.random.default_rng(10).standard_normal(SOURCE.shape)
    expected = ParcelOperator(SOURCE, image).apply(values, "mean")
    (stored,) = (isolated_data_dir / "derived" / "parcel-operators").glob("*.npz")
    stored.write_bytes(b"not a zip file")
    np.testing.assert_array_equal(ParcelOperator(SOURCE, image).apply(values, "mean"), expected)
    readable_again = np.load(stored)  # rewritten by the rebuild
    assert "weights" in readable_again.files
    blocked = isolated_data_dir / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LACUNA_DATA_DIR", str(blocked))
    np.testing.assert_array_equal(ParcelOperator(SOURCE, image).apply(values, "mean"), expected)


def test_cache_keys_tell_memory_layouts_apart():
    from lacuna.core.derived_arrays import digest

    c_ordered = np.arange(6, dtype=np.int32).reshape(2, 3)
    same_bytes_other_values = np.ndarray((2, 3), dtype=np.int32, buffer=c_ordered.tobytes(), order="F")
    assert not np.array_equal(c_ordered, same_bytes_other_values)
    assert digest(c_ordered) != digest(same_bytes_other_values)
    assert digest(c_ordered) == digest(c_ordered.copy())
