"""The map encoder writes standard gzip: zlib, Python's gzip, the gzip command and
nibabel read back exactly the bytes given, whatever the runs and segment sizes."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import time
import zlib

import nibabel as nib
import numpy as np
import pytest

from lacuna.core.map_gzip import MIN_RUN_VOXELS, gzip_map_bytes
from lacuna.core.nifti_files import float_map_bytes
from lacuna.core.spaces import standard_grid


def _runs(rng: np.random.Generator, n_words: int) -> np.ndarray:
    """Words in runs of 1-80 of a few values (0, 1.0f, all bits set), some broken by
    random words: every block boundary the encoder can meet."""
    values = rng.choice(np.array([0, 0x3F800000, 0xFFFFFFFF, 7], dtype=np.uint32), size=n_words + 1)
    words = np.repeat(values, rng.integers(1, 80, size=values.size))[:n_words].copy()
    if n_words:
        words[rng.integers(0, n_words, size=5)] = rng.integers(0, 2**32 - 1, size=5, dtype=np.uint32)
    return words


@pytest.mark.parametrize("seed", range(4))
def test_random_runs_decompress_exactly(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        words = _runs(rng, int(rng.integers(0, 600)))
        prefix = rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        encoded = gzip_map_bytes(prefix, words)
        assert zlib.decompress(encoded, wbits=31) == prefix + words.tobytes()
        assert gzip.decompress(encoded) == prefix + words.tobytes()


@pytest.mark.parametrize(
    "words",
    [
        np.zeros(0, dtype=np.uint32),
        np.zeros(MIN_RUN_VOXELS - 1, dtype=np.uint32),  # too short for a run: stored
        np.zeros(MIN_RUN_VOXELS, dtype=np.uint32),
        np.zeros(3_000_000, dtype=np.uint32),  # one run of 12 MB: thousands of matches
        np.arange(100_000, dtype=np.uint32),  # no run, 400 kB: several stored blocks of 64 kB
        np.repeat(np.arange(3, dtype=np.uint32), [65, 64, 66]),  # last-match lengths near 258
    ],
    ids=["empty", "short", "shortest-run", "long-run", "no-run", "match-tails"],
)
def test_edge_cases_decompress_exactly(words):
    prefix = b"header" * 7
    encoded = gzip_map_bytes(prefix, words)
    assert zlib.decompress(encoded, wbits=31) == prefix + words.tobytes()


def test_runs_are_deflated_and_values_stored():
    rng = np.random.default_rng(5)
    volume = np.zeros((91, 109, 91), dtype=np.float32, order="F")
    volume[20:70, 20:90, 15:75] = rng.standard_normal((50, 70, 60))
    encoded = gzip_map_bytes(b"", volume)
    values = 50 * 70 * 60 * 4
    assert values < len(encoded) < 1.1 * values  # runs nearly free, values as they are
    assert zlib.decompress(encoded, wbits=31) == volume.tobytes(order="F")


@pytest.mark.skipif(shutil.which("gzip") is None, reason="no gzip command")
def test_the_gzip_command_reads_a_map(tmp_path):
    grid = standard_grid("MNI152NLin6Asym", 2)
    volume = np.ones(grid.shape, dtype=np.float32, order="F")  # a p map outside the brain
    volume[10:80, 10:100, 10:80] = np.random.default_rng(6).uniform(size=(70, 90, 70))
    path = tmp_path / "map.nii.gz"
    path.write_bytes(float_map_bytes(volume, grid.affine, path.name, stored_values=True))
    subprocess.run(["gzip", "-t", str(path)], check=True)
    unpacked = subprocess.run(["gzip", "-dc", str(path)], check=True, capture_output=True).stdout
    assert unpacked == float_map_bytes(volume, grid.affine, "map.nii")
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), volume)


def test_c_ordered_maps_are_written_in_nifti_order(tmp_path):
    grid = standard_grid("MNI152NLin6Asym", 2)
    volume = np.zeros(grid.shape, dtype=np.float32)  # C order in memory
    volume[30:60, 40:50, 20:25] = np.arange(30 * 10 * 5, dtype=np.float32).reshape(30, 10, 5)
    path = tmp_path / "map.nii.gz"
    path.write_bytes(float_map_bytes(volume, grid.affine, path.name, stored_values=True))
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), volume)


def test_voxel_maps_choose_the_encoder_by_density():
    """Dense statistics are stored (fast); sparse maps are deflated whole (small)."""
    from lacuna.core.results import VoxelMap

    grid = standard_grid("MNI152NLin6Asym", 2)
    sparse = np.zeros(grid.shape, dtype=np.float32)
    sparse[40:50, 50:60, 40:50] = np.arange(1000, dtype=np.float32).reshape(10, 10, 10) % 7
    as_sparse = VoxelMap("count", sparse, grid.affine, "MNI152NLin6Asym", 2.0).file_bytes("m.nii.gz")
    as_dense = VoxelMap("count", sparse, grid.affine, "MNI152NLin6Asym", 2.0, dense=True).file_bytes("m.nii.gz")
    assert gzip.decompress(as_sparse) == gzip.decompress(as_dense)
    assert len(as_sparse) < len(as_dense) / 2


def _ellipsoid_outside(shape) -> np.ndarray:
    """True outside an ellipsoidal 'brain', flat in Fortran (NIfTI) order."""
    i, j, k = np.indices(shape)
    centre = (np.array(shape) - 1) / 2
    inside = ((i - centre[0]) / 30) ** 2 + ((j - centre[1]) / 40) ** 2 + ((k - centre[2]) / 30) ** 2 < 1
    return ~inside.reshape(-1, order="F")


def test_maps_holding_the_expected_runs_decompress_exactly():
    """Maps of a size whose constant voxels were announced are written from a template
    (one per header and fill value); whatever they hold elsewhere (plateaus inside the
    'brain', a different fill, a voxel breaking a run), they decompress exactly."""
    from lacuna.core.map_gzip import expect_constant

    shape = (41, 53, 47)  # a size no other test uses
    outside = _ellipsoid_outside(shape)
    expect_constant(outside)
    rng = np.random.default_rng(8)
    maps = []
    for fill in (0.0, 1.0, 0.0, 1.0):  # the second map of each fill reuses its template
        flat = np.full(outside.size, fill, dtype=np.float32)
        flat[~outside] = rng.standard_normal(int((~outside).sum()))
        maps.append(flat)
    plateau = maps[1].copy()
    plateau[np.flatnonzero(~outside)[:5000]] = 1.0  # e.g. FDR p capped at 1, touching the fill
    broken = maps[0].copy()
    broken[np.flatnonzero(outside)[100]] = 3.0  # the announced runs do not all hold
    nan_fill = np.where(outside, np.float32(np.nan), maps[2])
    for prefix in (b"", b"header" * 50):
        for flat in maps + [plateau, broken, nan_fill]:
            volume = flat.reshape(shape, order="F")
            encoded = gzip_map_bytes(prefix, volume)
            assert zlib.decompress(encoded, wbits=31) == prefix + volume.tobytes(order="F")
            assert gzip.decompress(encoded) == prefix + volume.tobytes(order="F")
    # The template gives the same length as planning the stream anew.
    first, again = (bytes(gzip_map_bytes(b"h", maps[i].reshape(shape, order="F"))) for i in (0, 2))
    assert len(first) == len(again) and len(first) < 1.2 * 4 * int((~outside).sum())


@pytest.mark.skipif(shutil.which("gzip") is None, reason="no gzip command")
def test_the_gzip_command_reads_a_templated_map(tmp_path):
    from lacuna.core.map_gzip import expect_constant

    grid = standard_grid("MNI152NLin6Asym", 2)
    outside = _ellipsoid_outside(grid.shape)
    expect_constant(outside)
    for number in range(2):
        flat = np.ones(outside.size, dtype=np.float32)
        flat[~outside] = np.random.default_rng(number).uniform(size=int((~outside).sum()))
        volume = flat.reshape(grid.shape, order="F")
        path = tmp_path / f"map{number}.nii.gz"
        path.write_bytes(float_map_bytes(volume, grid.affine, path.name, stored_values=True))
        subprocess.run(["gzip", "-t", str(path)], check=True)
        np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), volume)


def test_prepare_loads_the_kernels_without_announcing_runs():
    from lacuna.core import map_gzip

    before = {size: list(known) for size, known in map_gzip._EXPECTED.items()}
    map_gzip.prepare()
    map_gzip.prepare()  # returns at once
    assert {size: list(known) for size, known in map_gzip._EXPECTED.items()} == before
    volume = np.zeros((4, 4, 4), dtype=np.float32, order="F")
    volume[1:3, 1:3, 1:3] = 0.25
    assert zlib.decompress(gzip_map_bytes(b"h", volume), wbits=31) == b"h" + volume.tobytes(order="F")


def test_a_planned_stream_serves_the_first_map_from_its_template(monkeypatch):
    """After ``plan`` (in the background, as during a connectome pass) the first real
    map of that header and fill is filled from the template, not planned again, and
    decompresses exactly."""
    from lacuna.core import map_gzip

    shape = (37, 29, 33)  # a size no other test uses
    outside = _ellipsoid_outside(shape)
    map_gzip.expect_constant(outside)
    planned = []
    map_gzip.prepare_in_background(then=lambda: planned.append(map_gzip.plan(b"head", outside.size, 1.0)))
    for _ in range(500):
        if planned:
            break
        time.sleep(0.01)
    assert planned

    def not_again(*args):
        raise AssertionError("planned again")

    monkeypatch.setattr(map_gzip, "_deflate_planned", not_again)
    flat = np.ones(outside.size, dtype=np.float32)
    flat[~outside] = np.random.default_rng(3).uniform(size=int((~outside).sum()))
    encoded = gzip_map_bytes(b"head", flat.reshape(shape, order="F"))
    assert gzip.decompress(encoded) == b"head" + flat.tobytes()
