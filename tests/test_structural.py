"""Structural LNM: tractogram reading, the index, the analysis and the BIDS App.

Every number is checked against a plain per-streamline reference written from the
definitions (MRtrix3's rules: vertex nearest voxel, Hermite upsampling, radial endpoint
search; exact segment traversal by a 3-D DDA), independent of the vectorised code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import write_itk_transform
from nibabel.streamlines import Tractogram, TckFile
from scipy.spatial import cKDTree

from lacuna.analysis import StructuralNetworkMapping
from lacuna.resources.connectomes import ConnectomeError, register_structural_connectome
from lacuna.core.errors import AnalysisError
from lacuna.core.spaces import resample_mask, standard_grid
from lacuna.core.subject import SubjectData
from lacuna.formats import tractogram_index
from lacuna.formats.streamline_voxels import upsample
from lacuna.formats.tck import iter_streamline_chunks, read_tractogram_info
from lacuna.formats.tractogram_index import TractogramIndex

SPACE = "MNI152NLin6Asym"
GRID = standard_grid(SPACE, 2)
SCHAEFER = "Schaefer2018_100Parcels7Networks"
SCHAEFER_FILE = f"tpl-{SPACE}_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg.nii.gz"
CENTRE = np.array([0.0, -18.0, 12.0])


# --------------------------------------------------------------------------------------
# Synthetic tractograms and independent references
# --------------------------------------------------------------------------------------


def synthetic_streamlines(n: int, seed: int = 0, step: float = 1.0, pool: np.ndarray | None = None) -> list[np.ndarray]:
    """Curved streamlines between endpoints (from ``pool`` + jitter, else an ellipsoid
    shell), bent towards the deep white matter; plus edge cases at the end: a 1-vertex
    streamline, a 2-vertex one and one leaving the grid."""
    rng = np.random.default_rng(seed)
    streamlines = []
    for _ in range(n):
        if pool is not None:
            a, b = pool[rng.integers(0, len(pool), 2)] + rng.uniform(-3, 3, (2, 3))
        else:
            d = rng.standard_normal((2, 3))
            a, b = CENTRE + d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(0.6, 1.0, (2, 1)) * [65, 90, 65]
        control = 0.5 * (a + b) + rng.uniform(0.2, 0.6) * (CENTRE - 0.5 * (a + b)) + rng.normal(0, 4, 3)
        length = np.linalg.norm(control - a) + np.linalg.norm(b - control)
        t = np.linspace(0, 1, max(2, int(length / step) + 1))[:, None]
        points = (1 - t) ** 2 * a + 2 * (1 - t) * t * control + t**2 * b + rng.normal(0, 0.1 * step, (t.size, 3))
        streamlines.append(points.astype(np.float32))
    streamlines.append(np.array([[10.3, -20.1, 5.7]], np.float32))
    streamlines.append(np.array([[-10.2, 4.9, 20.2], [-9.1, 5.6, 21.0]], np.float32))
    streamlines.append(np.array([[80.0 + i, 0.3, 1.2] for i in range(30)], np.float32))  # leaves the grid
    return streamlines


def write_tck(path: Path, streamlines: list[np.ndarray], step: float | None = 1.0) -> Path:
    header = {"step_size": f"{step:g}"} if step else {}
    TckFile(Tractogram(streamlines, affine_to_rasmm=np.eye(4)), header=header).save(str(path))
    return path


def cortex_pool(atlas_dir: Path) -> np.ndarray:
    img = nib.load(atlas_dir / SCHAEFER_FILE)
    ijk = np.argwhere(np.asanyarray(img.dataobj) > 0)[::50]
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]


def std_round(x: float) -> int:
    """C++ std::round: halves away from zero."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def voxel_coordinates(points, grid=GRID):
    inverse = np.linalg.inv(grid.affine)
    return [inverse[:3, :3] @ np.asarray(p, float) + inverse[:3, 3] for p in points]


def flat_ids(cells, grid=GRID) -> set[int]:
    out = set()
    for i, j, k in cells:
        if 0 <= i < grid.shape[0] and 0 <= j < grid.shape[1] and 0 <= k < grid.shape[2]:
            out.add((i * grid.shape[1] + j) * grid.shape[2] + k)
    return out


def ref_vertex_voxels(streamline) -> set[int]:
    return flat_ids([tuple(std_round(c) for c in v) for v in voxel_coordinates(streamline)])


def ref_upsample(streamline, ratio: int) -> list[np.ndarray]:
    """MRtrix3's Upsampler, vertex by vertex (src/dwi/tractography/resampling/upsampler.cpp)."""
    f = np.float32
    pts = [np.asarray(p, f) for p in streamline]
    if ratio == 1 or len(pts) < 2:
        return pts
    padded = [pts[0] + (pts[0] - pts[1]), *pts, pts[-1] + (pts[-1] - pts[-2])]
    tension = f(0.5) * f(0.1)
    out = []
    for i in range(3, len(padded)):
        a, b, c, d = padded[i - 3], padded[i - 2], padded[i - 1], padded[i]
        out.append(b)
        for k in range(1, ratio):
            p = f(k / f(ratio))  # float32 arithmetic, as MRtrix3
            w = [
                (f(0.5) - tension) * (f(2) * (p * p) - (p * p) * p - p),
                f(1) + (f(1.5) + tension) * ((p * p) * p) - (f(2.5) + tension) * (p * p),
                (f(2) + f(2) * tension) * (p * p) + (f(0.5) - tension) * p - (f(1.5) + tension) * ((p * p) * p),
                (f(0.5) - tension) * ((p * p) * p - p * p),
            ]
            out.append(w[0] * a + w[1] * b + w[2] * c + w[3] * d)
    out.append(padded[-2])
    return out


def ref_map_voxels(streamline, ratio: int) -> set[int]:
    return ref_vertex_voxels(ref_upsample(streamline, ratio))


def ref_traversal(streamline) -> set[int]:
    """Voxels crossed by each straight segment: a 3-D DDA (Amanatides & Woo)."""
    coords = voxel_coordinates(streamline)
    cells = [tuple(int(math.floor(c + 0.5)) for c in coords[0])]
    for p, q in zip(coords[:-1], coords[1:]):
        cell = [int(math.floor(c + 0.5)) for c in p]
        end = [int(math.floor(c + 0.5)) for c in q]
        d = q - p
        step = [int(np.sign(x)) for x in d]
        t_max = [((cell[a] + 0.5 * step[a]) - p[a]) / d[a] if step[a] else math.inf for a in range(3)]
        t_delta = [abs(1 / d[a]) if step[a] else math.inf for a in range(3)]
        cells.append(tuple(cell))
        while cell != end:
            axis = int(np.argmin(t_max))
            cell[axis] += step[axis]
            t_max[axis] += t_delta[axis]
            cells.append(tuple(cell))
    return flat_ids(cells)


def sphere_mask(centre, radius, grid=GRID) -> np.ndarray:
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return (np.linalg.norm(xyz - np.asarray(centre, float), axis=1) <= radius).reshape(grid.shape).astype(np.uint8)


def subject(mask: np.ndarray, grid=GRID, subject_id: str = "01") -> SubjectData:
    return SubjectData(nib.Nifti1Image(mask, grid.affine), SPACE, metadata={"subject_id": subject_id})


@pytest.fixture(scope="module")
def small_tck(tmp_path_factory, shared_atlases):
    """~400 streamlines with cortical endpoints, 1 mm steps (tckmap ratio 2 on 2 mm)."""
    folder = tmp_path_factory.mktemp("tck")
    streamlines = synthetic_streamlines(400, seed=3, pool=cortex_pool(shared_atlases))
    return write_tck(folder / "small.tck", streamlines), streamlines


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def test_tck_reader_matches_nibabel_across_chunk_sizes(tmp_path):
    streamlines = synthetic_streamlines(50, seed=1)
    path = write_tck(tmp_path / "t.tck", streamlines)
    for max_points in (7, 100, 10**6):  # 7: shorter than most streamlines (the window grows)
        chunks = list(iter_streamline_chunks(path, max_points))
        lengths = np.concatenate([c[1] for c in chunks])
        points = np.concatenate([c[0] for c in chunks])
        assert lengths.tolist() == [len(s) for s in streamlines]
        np.testing.assert_array_equal(points, np.concatenate(streamlines))
    # Big-endian data and a header without step size.
    raw = path.read_bytes()
    offset = int(raw.split(b"file: . ")[1].split(b"\n")[0])
    data = np.frombuffer(raw[offset:], "<f4").astype(">f4")
    header = raw[:offset].replace(b"Float32LE", b"Float32BE").replace(b"step_size: 1\n", b"step_size: x\n")
    (tmp_path / "be.tck").write_bytes(header + data.tobytes())
    points, lengths = next(iter_streamline_chunks(tmp_path / "be.tck"))
    np.testing.assert_array_equal(points, np.concatenate(streamlines))
    assert read_tractogram_info(tmp_path / "be.tck").step_size is None


def test_trk_gives_the_same_index_as_tck(tmp_path):
    streamlines = synthetic_streamlines(60, seed=2)
    tck = write_tck(tmp_path / "t.tck", streamlines)
    trk = tmp_path / "t.trk"
    nib.streamlines.save(Tractogram(streamlines, affine_to_rasmm=np.eye(4)), str(trk), header={
        "voxel_to_rasmm": GRID.affine, "voxel_sizes": (2.0, 2.0, 2.0), "dimensions": GRID.shape, "voxel_order": "LAS"})
    points = np.concatenate([c[0] for c in iter_streamline_chunks(trk, 50)])
    np.testing.assert_allclose(points, np.concatenate(streamlines), atol=1e-4)
    a = TractogramIndex.open(tck, GRID, upsample=2)
    b = TractogramIndex.open(trk, GRID, upsample=2)
    assert a.n_streamlines == b.n_streamlines == len(streamlines)
    assert np.abs(a.total_count - b.total_count).sum() <= 2  # float rounding of the trk round trip


# --------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------


def test_upsampling_matches_mrtrix_reference():
    streamlines = synthetic_streamlines(20, seed=4, step=2.0)
    points = np.concatenate(streamlines)
    lengths = np.array([len(s) for s in streamlines])
    for ratio in (2, 3, 7):
        up, up_lengths = upsample(points, lengths, ratio)
        expected = [ref_upsample(s, ratio) for s in streamlines]
        assert up_lengths.tolist() == [len(e) for e in expected]
        np.testing.assert_allclose(up, np.concatenate([np.array(e) for e in expected]), atol=1e-4)


def test_mrtrix_index_matches_reference(small_tck):
    path, streamlines = small_tck
    index = TractogramIndex.open(path, GRID)
    assert index.mode == "mrtrix" and index.upsample_ratio == 2  # ceil(1 / (2 * 0.333))
    assert index.n_streamlines == len(streamlines)
    total = np.zeros(index.n_voxels, np.int64)
    crossing: dict[int, list[int]] = {}
    for number, streamline in enumerate(streamlines):
        expected = ref_map_voxels(streamline, 2)
        assert set(index.voxels_of(number).tolist()) == expected, number
        total[list(expected)] += 1
        for voxel in ref_vertex_voxels(streamline):
            crossing.setdefault(voxel, []).append(number)
        np.testing.assert_array_equal(index.endpoints[number], np.array([streamline[0], streamline[-1]]))
    np.testing.assert_array_equal(index.total_count, total)
    for voxel in list(crossing)[::37]:
        assert index.streamlines_through([voxel]).tolist() == crossing[voxel]
    # The inverse map as a whole.
    assert index.inverse_indptr[-1] == sum(len(v) for v in crossing.values())


def test_traversal_index_matches_dda_reference(tmp_path):
    streamlines = synthetic_streamlines(80, seed=5, step=3.0)  # long steps: traversal matters
    path = write_tck(tmp_path / "t.tck", streamlines, step=3.0)
    index = TractogramIndex.open(path, GRID, mode="traversal")
    vertex_only = TractogramIndex.open(path, GRID, upsample=1)
    missed = 0
    for number, streamline in enumerate(streamlines):
        expected = ref_traversal(streamline)
        assert set(index.voxels_of(number).tolist()) == expected, number
        assert set(vertex_only.voxels_of(number).tolist()) <= expected
        missed += len(expected) - vertex_only.voxels_of(number).size
    assert missed > 0  # vertices 3 mm apart skip voxels of 2 mm


def test_index_is_cached_and_rebuilt_when_the_tractogram_changes(tmp_path, monkeypatch):
    path = write_tck(tmp_path / "t.tck", synthetic_streamlines(30, seed=6))
    first = TractogramIndex.open(path, GRID)
    assert first.directory.parent == tractogram_index.index_root()
    calls = []
    original = tractogram_index._build
    monkeypatch.setattr(tractogram_index, "_build", lambda *a, **k: (calls.append(1), original(*a, **k)))
    assert TractogramIndex.open(path, GRID).directory == first.directory and not calls
    write_tck(path, synthetic_streamlines(40, seed=7))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = TractogramIndex.open(path, GRID)
    assert calls and second.directory != first.directory and second.n_streamlines == 43
    assert not first.directory.exists()  # the stale index is removed
    assert not list(tractogram_index.index_root().glob(".*.tmp-*"))


def test_index_warns_without_step_size(tmp_path, caplog):
    path = write_tck(tmp_path / "t.tck", synthetic_streamlines(10, seed=8, step=2.0), step=None)
    index = TractogramIndex.open(path, GRID)
    assert index.upsample_ratio == 1 and "upsample=" in caplog.text


# --------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------


def _reference_results(streamlines, lesion: np.ndarray):
    lesion_ids = set(np.flatnonzero(lesion.ravel()).tolist())
    cut = [n for n, s in enumerate(streamlines) if ref_vertex_voxels(s) & lesion_ids]
    count = np.zeros(lesion.size)
    total = np.zeros(lesion.size)
    for n, s in enumerate(streamlines):
        voxels = list(ref_map_voxels(s, 2))
        total[voxels] += 1
        if n in cut:
            count[voxels] += 1
    fraction = np.divide(count, total, out=np.zeros_like(count), where=total > 0)
    return cut, count.reshape(lesion.shape), fraction.reshape(lesion.shape)


def _reference_parcels(streamlines, atlas_dir: Path, radius: float):
    img = nib.load(atlas_dir / SCHAEFER_FILE)
    labels = np.asanyarray(img.dataobj).astype(int)
    ijk = np.argwhere(labels > 0)
    tree = cKDTree(ijk @ img.affine[:3, :3].T + img.affine[:3, 3])
    inverse = np.linalg.inv(img.affine)
    pairs = []
    for s in streamlines:
        ends = []
        for p in (s[0], s[-1]):
            if radius == 0:
                v = [std_round(c) for c in inverse[:3, :3] @ p + inverse[:3, 3]]
                inside = all(0 <= v[a] < labels.shape[a] for a in range(3))
                ends.append(labels[tuple(v)] - 1 if inside else -1)
            else:
                dist, nearest = tree.query(p, distance_upper_bound=radius)
                ends.append(labels[tuple(ijk[nearest])] - 1 if np.isfinite(dist) else -1)
        pairs.append(ends)
    return np.array(pairs)


@pytest.mark.parametrize("radius", [4.0, 0.0])
def test_analysis_matches_reference(small_tck, shared_atlases, radius):
    path, streamlines = small_tck
    lesion = sphere_mask((-24, -14, 20), 12)
    analysis = StructuralNetworkMapping(
        path, parcellations=[SCHAEFER], space=SPACE, atlas_dir=shared_atlases, endpoint_radius=radius, return_in_input_space=False
    )
    results = analysis.run(subject(lesion)).results["StructuralNetworkMapping"]
    cut, count, fraction = _reference_results(streamlines, lesion)
    assert len(cut) > 5
    name = "small"
    assert results[f"{name}_n_streamlines_cut"].value == len(cut)
    assert results[f"{name}_n_streamlines_total"].value == len(streamlines)
    assert results[f"{name}_percent_disconnected"].value == pytest.approx(100 * len(cut) / len(streamlines))
    assert results[f"{name}_lesion_voxels_used"].value == int(lesion.sum())
    np.testing.assert_array_equal(results[f"{name}_count"].data, count)
    np.testing.assert_allclose(results[f"{name}_disconnection"].data, fraction, atol=1e-6)
    disconnection = results[f"{name}_disconnection"]
    assert disconnection.suffix == "probseg" and disconnection.desc == "snmsmalldisconnection"
    assert results[f"{name}_count"].desc == "snmsmallcount" and results[f"{name}_count"].suffix == "statmap"
    # Parcels: endpoint assignment by an independent KD-tree search.
    pairs = _reference_parcels(streamlines, shared_atlases, radius)
    n_regions = 100
    total = np.zeros((n_regions, n_regions))
    cut_matrix = np.zeros((n_regions, n_regions))
    per_parcel = np.zeros(n_regions)
    cut_parcel = np.zeros(n_regions)
    for n, (a, b) in enumerate(pairs):
        for region in {a, b} - {-1}:
            per_parcel[region] += 1
            cut_parcel[region] += n in cut
        if a >= 0 and b >= 0:
            total[a, b] += 1
            if a != b:
                total[b, a] += 1
            if n in cut:
                cut_matrix[a, b] += 1
                if a != b:
                    cut_matrix[b, a] += 1
    matrix = results[f"{name}_matrix_streamlines_{SCHAEFER}"]
    assert matrix.measure == "smallstreamlines" and total.sum() > 0
    np.testing.assert_array_equal(matrix.matrix, total)
    np.testing.assert_array_equal(results[f"{name}_matrix_streamlinescut_{SCHAEFER}"].matrix, cut_matrix)
    expected_fraction = np.divide(cut_matrix, total, out=np.zeros_like(total), where=total > 0)
    np.testing.assert_allclose(results[f"{name}_matrix_fractioncut_{SCHAEFER}"].matrix, expected_fraction)
    np.testing.assert_array_equal(results[f"{name}_streamlines_total_{SCHAEFER}"].values, per_parcel)
    np.testing.assert_array_equal(results[f"{name}_streamlines_cut_{SCHAEFER}"].values, cut_parcel)
    parcel_fraction = results[f"{name}_fraction_cut_{SCHAEFER}"]
    assert parcel_fraction.table == "snmsmall"
    np.testing.assert_allclose(parcel_fraction.values[per_parcel > 0], (cut_parcel / np.maximum(per_parcel, 1))[per_parcel > 0])
    assert np.isnan(parcel_fraction.values[per_parcel == 0]).all()


def test_batch_equals_single_and_errors_stay_per_lesion(small_tck):
    path, _ = small_tck
    grid_1mm = standard_grid(SPACE, 1)
    big = sphere_mask((-24, -14, 20), 14)
    fine = sphere_mask((20, -30, 10), 9, grid_1mm)
    dot = np.zeros(grid_1mm.shape, np.uint8)
    dot[90, 120, 80] = 1  # one 1 mm voxel: an eighth of a 2 mm voxel
    subjects = [subject(big, subject_id="01"), subject(fine, grid_1mm, "02"), subject(dot, grid_1mm, "03")]
    analysis = StructuralNetworkMapping(path, space=SPACE, return_in_input_space=False)
    outcomes = dict(analysis.iter_batch(subjects))
    assert isinstance(outcomes[2], AnalysisError) and "smaller than one voxel" in str(outcomes[2])
    for number in (0, 1):
        alone = StructuralNetworkMapping(path, space=SPACE, return_in_input_space=False).run(subjects[number])
        for key, value in alone.results["StructuralNetworkMapping"].items():
            other = outcomes[number].results["StructuralNetworkMapping"][key]
            if hasattr(value, "data"):
                np.testing.assert_array_equal(value.data, other.data)
            else:
                assert value.value == other.value
    # The 1 mm lesion is the half-coverage resampling of the mask onto the 2 mm grid.
    on_grid = resample_mask(fine, grid_1mm.affine, GRID)
    direct = StructuralNetworkMapping(path, space=SPACE, return_in_input_space=False).run(subject(on_grid.astype(np.uint8)))
    np.testing.assert_array_equal(direct.results["StructuralNetworkMapping"]["small_count"].data, outcomes[1].results["StructuralNetworkMapping"]["small_count"].data)
    # Maps return to the lesion's 1 mm grid by default.
    back = StructuralNetworkMapping(path, space=SPACE).run(subjects[1]).results["StructuralNetworkMapping"]["small_disconnection"]
    assert back.data.shape == grid_1mm.shape and 0 <= back.data.min() and back.data.max() <= 1


def test_connectome_space_is_declared_never_guessed(tmp_path):
    path = write_tck(tmp_path / "tracts.tck", synthetic_streamlines(5, seed=9))
    with pytest.raises(ConnectomeError, match="space of"):
        StructuralNetworkMapping(path)
    (tmp_path / "tracts.json").write_text(json.dumps({"SpatialReference": SPACE}))
    analysis = StructuralNetworkMapping(path)
    assert analysis.space == SPACE and analysis.connectome_name == "tracts"
    seed_spelling = StructuralNetworkMapping(tractogram_path=str(path))  # as in the seed's example
    assert (seed_spelling.tractogram, seed_spelling.space) == (analysis.tractogram, SPACE)
    with pytest.raises(TypeError, match="once"):
        StructuralNetworkMapping(path, tractogram_path=path)
    with pytest.raises(TypeError, match="once"):
        StructuralNetworkMapping()
    with pytest.raises(ConnectomeError, match="declared"):
        StructuralNetworkMapping(path, space="MNI152NLin2009cAsym")
    register_structural_connectome("Tracts9", path, "MNI152NLin2009cAsym")
    for given in ("Tracts9", path):  # by name, or by the registered path
        registered = StructuralNetworkMapping(given)
        assert registered.connectome_name == "Tracts9" and registered.space == "MNI152NLin2009cAsym"
    assert registered.grid.shape == (97, 115, 97)
    with pytest.raises(ValueError, match="mode"):
        StructuralNetworkMapping(path, mode="nearest")


def test_probabilistic_atlas_is_skipped_with_a_note(small_tck, tmp_path):
    path, _ = small_tck
    atlas_dir = tmp_path / "atlases"
    atlas_dir.mkdir()
    data = np.zeros((*GRID.shape, 2), np.float32)
    data[20:40, 30:60, 30:60, 0] = 0.8
    nib.save(nib.Nifti1Image(data, GRID.affine), atlas_dir / f"tpl-{SPACE}_res-02_atlas-Prob_probseg.nii.gz")
    (atlas_dir / f"tpl-{SPACE}_res-02_atlas-Prob_probseg.txt").write_text("a\nb\n")
    analysis = StructuralNetworkMapping(path, parcellations=["Prob"], space=SPACE, atlas_dir=atlas_dir)
    out = analysis.run(subject(sphere_mask((-24, -14, 20), 12)))
    assert not any("Prob" in key for key in out.results["StructuralNetworkMapping"])
    assert any("probabilistic" in note for note in out.provenance[-1].notes)


def test_parcellation_in_the_other_space_moves_the_endpoints(small_tck, shared_atlases, tmp_path, isolated_data_dir):
    pytest.importorskip("nitransforms")
    path, _ = small_tck
    # The Schaefer image declared in 2009c, shifted by s: a 6Asym point x is the 2009c point x + s.
    shift = np.array([3.0, -2.0, 1.5])
    img = nib.load(shared_atlases / SCHAEFER_FILE)
    affine = img.affine.copy()
    affine[:3, 3] += shift
    atlas_dir = tmp_path / "atlases"
    atlas_dir.mkdir()
    stem = "tpl-MNI152NLin2009cAsym_res-01_atlas-Shifted_desc-100_dseg"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), atlas_dir / f"{stem}.nii.gz")
    shutil.copy(shared_atlases / SCHAEFER_FILE.replace(".nii.gz", ".txt"), atlas_dir / f"{stem}.txt")
    # tpl-6Asym_from-2009c maps 6Asym points to 2009c points (ITK, LPS).
    xfm = isolated_data_dir / "templateflow" / f"tpl-{SPACE}" / f"tpl-{SPACE}_from-MNI152NLin2009cAsym_mode-image_xfm.h5"
    translation = np.eye(4)
    translation[:3, 3] = shift * [-1, -1, 1]
    write_itk_transform(xfm, translation)
    lesion = subject(sphere_mask((-24, -14, 20), 12))
    moved = StructuralNetworkMapping(path, parcellations=["Shifted_100"], space=SPACE, atlas_dir=atlas_dir).run(lesion)
    plain = StructuralNetworkMapping(path, parcellations=[SCHAEFER], space=SPACE, atlas_dir=shared_atlases).run(lesion)
    a = moved.results["StructuralNetworkMapping"]["small_matrix_streamlines_Shifted_100"].matrix
    b = plain.results["StructuralNetworkMapping"][f"small_matrix_streamlines_{SCHAEFER}"].matrix
    np.testing.assert_array_equal(a, b)
    step = moved.provenance[-1]
    assert any("endpoints moved" in note for note in step.notes)
    assert any(f.role.startswith("transform:") for f in step.inputs)


# --------------------------------------------------------------------------------------
# The BIDS App
# --------------------------------------------------------------------------------------


def test_bids_app_structural_participant_and_group(tmp_path, small_tck, shared_atlases):
    from lacuna.cli.main import cli, expand_multi_value_options
    from lacuna.bids.validation import validate_bids_derivatives

    path, streamlines = small_tck
    tck = tmp_path / "tiny.tck"
    shutil.copy(path, tck)
    (tmp_path / "tiny.json").write_text(json.dumps({"SpatialReference": SPACE}))
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "sLNM", "BIDSVersion": "1.10.0"}))
    grid_1mm = standard_grid(SPACE, 1)
    masks = {"01": (sphere_mask((-24, -14, 20), 12), GRID, "2"), "02": (sphere_mask((20, -30, 10), 9, grid_1mm), grid_1mm, "1")}
    for sub, (data, grid, res) in masks.items():
        folder = bids / f"sub-{sub}" / "anat"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, grid.affine), folder / f"sub-{sub}_space-{SPACE}_res-{res}_label-lesion_mask.nii.gz")
    out = tmp_path / "out"

    def run(*args):
        return CliRunner().invoke(cli, expand_multi_value_options([str(a) for a in args]), catch_exceptions=False)

    result = run(bids, out, "participant", "--tractogram", tck, "--atlas-dir", shared_atlases, "--atlas", SCHAEFER, "--skip-bids-validation")
    assert result.exit_code == 0, result.output
    anat = out / "sub-01" / "anat"
    disconnection = anat / f"sub-01_space-{SPACE}_res-2_label-lesion_desc-snmtinydisconnection_probseg.nii.gz"
    _, _, fraction = _reference_results(streamlines, masks["01"][0])
    np.testing.assert_allclose(nib.load(disconnection).get_fdata(), fraction, atol=1e-6)
    assert (anat / f"sub-01_space-{SPACE}_res-2_label-lesion_desc-snmtinycount_statmap.nii.gz").is_file()
    assert (out / "sub-02" / "anat" / f"sub-02_space-{SPACE}_res-1_label-lesion_desc-snmtinydisconnection_probseg.nii.gz").is_file()
    stem = f"sub-01_space-{SPACE}_atlas-Schaefer2018_seg-100Parcels7Networks_label-lesion"
    table = pd.read_csv(anat / f"{stem}_desc-snmtiny_parcelstats.tsv", sep="\t", na_values="n/a")
    assert list(table.columns) == ["index", "name", "streamlines_total", "streamlines_cut", "fraction_cut"]
    for measure in ("streamlines", "streamlinescut", "fractioncut"):
        matrix = pd.read_csv(anat / f"{stem}_desc-structuralnetworkmappingtiny{measure}_relmat.tsv", sep="\t")
        assert matrix.shape == (100, 101)
    scalars = json.loads((anat / "sub-01_label-lesion_scalars.json").read_text())["StructuralNetworkMapping"]
    assert scalars["tiny_n_streamlines_total"]["Value"] == len(streamlines)
    assert "RegionalDamage" in json.loads((anat / "sub-01_label-lesion_scalars.json").read_text())
    assert validate_bids_derivatives(out, raise_on_error=False)["errors"] == []

    group = run(bids, out, "group")
    assert group.exit_code == 0, group.output
    group_table = pd.read_csv(out / "group" / "atlas-Schaefer2018_seg-100Parcels7Networks_desc-snmtinyFractionCut_parcelstats.tsv", sep="\t")
    assert list(group_table["participant_id"]) == ["sub-01", "sub-02"]
    # Group table of the percentage of streamlines disconnected: the reference's numbers.
    group_scalars = pd.read_csv(out / "group" / "desc-structuralnetworkmapping_scalars.tsv", sep="\t")
    assert list(group_scalars["participant_id"]) == ["sub-01", "sub-02"]
    cut_01 = _reference_results(streamlines, masks["01"][0])[0]
    expected = 100.0 * len(cut_01) / len(streamlines)
    assert group_scalars.loc[0, "tiny_percent_disconnected"] == pytest.approx(expected)
    regional = pd.read_csv(out / "group" / "desc-regionaldamage_scalars.tsv", sep="\t")
    assert regional.loc[0, "lesion_volume_mm3"] == pytest.approx(masks["01"][0].sum() * 8.0)
    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if Path(validator).exists():
        official = subprocess.run([validator, str(out)], capture_output=True, text=True)
        assert official.returncode == 0 and "[ERROR]" not in official.stdout, official.stdout[-3000:]
    rerun = run(bids, out, "participant", "--tractogram", tck, "--tractogram", tck, "--atlas-dir", shared_atlases, "--atlas", SCHAEFER, "--skip-bids-validation")
    assert "2 skipped" in rerun.output  # a repeated connectome counts once
