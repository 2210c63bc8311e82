"""Tests of the parcellation registry (lacuna.resources.parcellations)."""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fake_servers import FolderServer

from lacuna.resources.parcellations import downloads as pm
from lacuna.resources.parcellations import images as images_module
from lacuna.resources.parcellations import (
    CATALOGUE,
    CatalogueEntry,
    Parcellation,
    clear_parcellation_cache,
    fetch_parcellation,
    get_parcellation,
    list_parcellations,
    read_labels,
    read_parcellation,
    register_parcellation,
    registered_parcellations,
    scan_atlas_dir,
    unregister_parcellation,
)
from lacuna.core.errors import ParcellationError, SpaceError

ATLASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases"
needs_atlases = pytest.mark.skipif(not ATLASES.is_dir(), reason=f"{ATLASES} not available")

SCHAEFER100 = "tpl-MNI152NLin6Asym_res-01_atlas-Schaefer2018_desc-100Parcels7Networks_dseg"
TIAN_S1 = "tpl-MNI152NLin6Asym_res-01_atlas-TianSubcortex_desc-3TS1_dseg"
HCP = "tpl-MNI152NLin2009aAsym_res-01_atlas-HCP1065_desc-thr0p1_probseg"


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Every test gets its own empty data directory and no atlas mirror."""
    folder = tmp_path / "lacuna-data"
    monkeypatch.setenv("LACUNA_DATA_DIR", str(folder))
    monkeypatch.delenv(pm.ATLAS_URL_ENV, raising=False)
    clear_parcellation_cache()
    yield folder
    clear_parcellation_cache()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_image(path: Path, data: np.ndarray, affine=None, slope=None) -> Path:
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0)
    nib.save(img, path)
    return path


def label_volume() -> np.ndarray:
    data = np.zeros((6, 5, 4), dtype=np.int16)
    data[0:2] = 1
    data[2:4] = 2
    data[4:6, 0] = 3
    return data


# --------------------------------------------------------------------------------------
# Labels files
# --------------------------------------------------------------------------------------


def test_labels_one_name_per_line_with_blank_lines(tmp_path):
    path = write_text(tmp_path / "l.txt", "\nLeft Thalamus\n\nRight_Thalamus\r\n  Cortex  \n\n")
    assert read_labels(path) == ([1, 2, 3], ["Left Thalamus", "Right_Thalamus", "Cortex"])


def test_labels_without_trailing_newline(tmp_path):
    path = write_text(tmp_path / "l.txt", "A\nB")
    assert read_labels(path) == ([1, 2], ["A", "B"])


def test_labels_id_name_lines(tmp_path):
    path = write_text(tmp_path / "l.txt", "0 Background\n10  Left Amygdala\n\n3\tRight\n")
    assert read_labels(path) == ([3, 10], ["Right", "Left Amygdala"])


def test_labels_names_starting_with_digits_are_names(tmp_path):
    path = write_text(tmp_path / "l.txt", "7Networks_LH_Vis_1\n7Networks_LH_Vis_2\n")
    assert read_labels(path) == ([1, 2], ["7Networks_LH_Vis_1", "7Networks_LH_Vis_2"])


def test_labels_tsv_with_index_and_name(tmp_path):
    text = "index\tname\tcolor\n1\tVis_1\t#781286\n\n2\tVis 2\t#781287\n5\tDefault\t#000\n"
    path = write_text(tmp_path / "l.tsv", text)
    assert read_labels(path) == ([1, 2, 5], ["Vis_1", "Vis 2", "Default"])


def test_labels_tsv_columns_in_any_order(tmp_path):
    path = write_text(tmp_path / "l.tsv", "name\tindex\nA\t2\nB\t1\n")
    assert read_labels(path) == ([1, 2], ["B", "A"])


def test_labels_workbench_label_table(tmp_path):
    path = write_text(tmp_path / "l.txt", "HIP-rh\n1 171 243 85 255\nAMY-rh\n2 86 162 74 255\n")
    assert read_labels(path) == ([1, 2], ["HIP-rh", "AMY-rh"])


def test_labels_tsv_bad_row_names_line(tmp_path):
    path = write_text(tmp_path / "l.tsv", "index\tname\n1\tA\nx\tB\n")
    with pytest.raises(ParcellationError, match=r"l\.tsv, line 3"):
        read_labels(path)


def test_labels_duplicate_ids_rejected(tmp_path):
    path = write_text(tmp_path / "l.txt", "1 A\n2 B\n1 C\n")
    with pytest.raises(ParcellationError, match="more than once"):
        read_labels(path)


def test_labels_empty_file_rejected(tmp_path):
    path = write_text(tmp_path / "l.txt", "\n \n")
    with pytest.raises(ParcellationError, match="empty"):
        read_labels(path)


def test_labels_missing_file(tmp_path):
    with pytest.raises(ParcellationError, match="cannot read the labels file"):
        read_labels(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------


def test_3d_labels_and_mismatch_warnings(tmp_path, caplog):
    image = write_image(tmp_path / "a.nii.gz", label_volume().astype(np.float32))
    labels = write_text(tmp_path / "a.txt", "1 one\n2 two\n4 four\n")
    with caplog.at_level(logging.INFO):
        parc = read_parcellation("Toy", image, labels)
    assert parc.data.dtype == np.int32
    assert parc.region_ids == [1, 2, 4]
    assert parc.region_names == ["one", "two", "four"]
    assert not parc.probabilistic and parc.scale == 1.0
    assert "label values 3 occur in the image" in caplog.text
    assert "regions 4" in caplog.text
    assert parc.grid.shape == (6, 5, 4)


def test_3d_without_labels_names_present_values(tmp_path):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    parc = read_parcellation("Toy", image)
    assert parc.region_ids == [1, 2, 3]
    assert parc.region_names == ["region_1", "region_2", "region_3"]


def test_3d_non_integer_values_rejected(tmp_path):
    data = label_volume().astype(np.float32)
    data[0, 0, 0] = 1.5
    image = write_image(tmp_path / "a.nii.gz", data)
    with pytest.raises(ParcellationError, match="non-integer") as info:
        read_parcellation("Toy", image)
    assert "a.nii.gz" in str(info.value)


def test_3d_negative_labels_rejected(tmp_path):
    data = label_volume()
    data[0, 0, 0] = -1
    with pytest.raises(ParcellationError, match="negative"):
        read_parcellation("Toy", write_image(tmp_path / "a.nii.gz", data))


def test_4d_uint8_with_slope_keeps_stored_type(tmp_path):
    data = np.zeros((4, 4, 4, 3), dtype=np.uint8)
    data[..., 1] = 255
    data[0, 0, 0, 2] = 128
    image = write_image(tmp_path / "p.nii.gz", data, slope=1 / 255)
    parc = read_parcellation("Prob", image, write_text(tmp_path / "p.txt", "a\nb\nc\n"))
    assert parc.probabilistic and parc.data.dtype == np.uint8
    assert parc.scale == pytest.approx(1 / 255)
    assert parc.region_ids == [1, 2, 3]
    assert parc.probability_map(1).max() == pytest.approx(1.0)
    assert parc.probability_map(2)[0, 0, 0] == pytest.approx(128 / 255)


def test_4d_integer_without_slope_above_one_rejected(tmp_path):
    data = np.full((3, 3, 3, 2), 200, dtype=np.uint8)
    with pytest.raises(ParcellationError, match="scl_slope"):
        read_parcellation("Prob", write_image(tmp_path / "p.nii.gz", data))


def test_4d_float_out_of_range_rejected(tmp_path):
    data = np.full((3, 3, 3, 2), 0.5, dtype=np.float32)
    data[0, 0, 0, 0] = 1.5
    with pytest.raises(ParcellationError, match=r"\[0, 1\]"):
        read_parcellation("Prob", write_image(tmp_path / "p.nii.gz", data))


def test_4d_label_count_must_match_volumes(tmp_path):
    image = write_image(tmp_path / "p.nii.gz", np.zeros((3, 3, 3, 2), dtype=np.float32))
    labels = write_text(tmp_path / "p.txt", "a\nb\nc\n")
    with pytest.raises(ParcellationError, match="3 regions but the 4-D image") as info:
        read_parcellation("Prob", image, labels)
    assert "p.txt" in str(info.value)


def test_corrupt_image_rejected(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti" * 100))
    with pytest.raises(ParcellationError, match="bad.nii.gz"):
        read_parcellation("Bad", path)


def test_load_is_cached_and_refreshed_when_file_changes(tmp_path):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    parc = Parcellation("Toy", image, None, "MNI152NLin6Asym")
    first = parc.load()
    assert parc.load() is first
    data = label_volume()
    data[0, 0, 0] = 9
    write_image(image, data)
    assert 9 in parc.load().region_ids


def test_label_data_cached_by_file_bytes_and_read_back_mapped(tmp_path, data_dir, monkeypatch):
    data = label_volume()
    data[5, 4, 3] = 7
    image = write_image(tmp_path / "a.nii.gz", data)
    labels = write_text(tmp_path / "a.txt", "1 one\n2 two\n3 three\n7 seven\n8 eight\n")
    first = read_parcellation("Toy", image, labels)
    assert list((data_dir / "derived" / "atlas-labels").iterdir())  # kept for the next run

    def fail(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images_module, "_derive_label_voxels", fail)
    again = read_parcellation("Toy", image, labels)
    assert isinstance(again.data.base, np.memmap) or isinstance(again.data, np.memmap)
    assert not again.data.flags.writeable
    expected = np.asarray(nib.load(image).dataobj)  # nibabel's own reading
    for parc in (first, again):
        np.testing.assert_array_equal(parc.data, expected)
        assert parc.data.dtype == np.int32
        np.testing.assert_array_equal(parc.voxel_counts, [np.sum(expected == i) for i in (1, 2, 3, 7, 8)])
        np.testing.assert_array_equal(parc.affine, nib.load(image).affine)
        assert parc.data_key == first.data_key

    changed = data.copy()
    changed[0, 0, 0] = 8
    write_image(image, changed)  # new bytes: decoded, not served the old labels
    with pytest.raises(AssertionError, match="decoded again"):
        read_parcellation("Toy", image, labels)


def test_unreadable_label_cache_is_derived_again(tmp_path, data_dir):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    read_parcellation("Toy", image)
    (cached,) = (data_dir / "derived" / "atlas-labels").iterdir()
    (cached / "labels.npy").write_bytes(b"garbage")
    parc = read_parcellation("Toy", image)
    np.testing.assert_array_equal(parc.data, label_volume())
    assert parc.region_ids == [1, 2, 3]


def test_parcellation_pickles_without_data(tmp_path):
    parc = Parcellation("Toy_A", write_image(tmp_path / "a.nii.gz", label_volume()), None, "X")
    parc.load()
    copy = pickle.loads(pickle.dumps(parc))
    assert copy == parc and copy._cache == {}
    assert (copy.atlas, copy.desc) == ("Toy", "A")
    assert Parcellation("Toy", parc.image_path, None, "X").desc is None


# --------------------------------------------------------------------------------------
# The real atlases
# --------------------------------------------------------------------------------------


@needs_atlases
def test_real_schaefer_100():
    parc = read_parcellation(
        "Schaefer2018_100Parcels7Networks",
        ATLASES / f"{SCHAEFER100}.nii.gz",
        ATLASES / f"{SCHAEFER100}.txt",
    )
    assert parc.n_regions == 100 and parc.region_ids == list(range(1, 101))
    assert parc.region_names[0] == "7Networks_LH_Vis_1"
    assert parc.grid.shape == (182, 218, 182)
    expected = np.diag([-1.0, 1.0, 1.0, 1.0])
    expected[:3, 3] = (90, -126, -72)
    np.testing.assert_allclose(parc.affine, expected)
    assert nib.aff2axcodes(parc.affine) == ("L", "A", "S")


@needs_atlases
def test_real_tian_header_wins_over_res_entity():
    parc = read_parcellation(
        "TianSubcortex_3TS1", ATLASES / f"{TIAN_S1}.nii.gz", ATLASES / f"{TIAN_S1}.txt"
    )
    assert parc.n_regions == 16
    np.testing.assert_allclose(parc.grid.voxel_sizes, [2, 2, 2])
    assert parc.grid.shape == (97, 115, 97)


@needs_atlases
def test_real_hcp1065_is_4d_uint8():
    parc = read_parcellation("HCP1065_thr0p1", ATLASES / f"{HCP}.nii.gz", ATLASES / f"{HCP}.txt")
    assert parc.probabilistic and parc.n_regions == 64
    assert parc.data.dtype == np.uint8 and parc.data.shape[3] == 64
    assert parc.region_names[0] == "Arcuate_Fasciculus_L"
    assert parc.scale == 1.0


@needs_atlases
def test_scan_shared_atlas_dir():
    found = scan_atlas_dir(ATLASES)
    for name in (
        "Schaefer2018_100Parcels7Networks",
        "TianSubcortex_3TS1",
        "Schaefer2018TianS1_400Parcels17Networks",
        "HCP1065_thr0p1",
    ):
        assert name in found
    hcp = found["HCP1065_thr0p1"]
    assert hcp.space == "MNI152NLin2009aAsym"
    assert hcp.labels_path == ATLASES / f"{HCP}.txt"
    assert (hcp.atlas, hcp.desc) == ("HCP1065", "thr0p1")
    assert set(found) == set(CATALOGUE)


@needs_atlases
def test_catalogue_file_names_match_the_mirror_layout():
    for entry in CATALOGUE.values():
        assert (ATLASES / entry.image_file).is_file(), entry.image_file
        assert (ATLASES / entry.labels_file).is_file(), entry.labels_file


def test_catalogue_default_sources():
    entry = CATALOGUE["Schaefer2018_400Parcels17Networks"]
    image_url, labels_url, labels_file = pm._sources(entry)
    assert image_url.startswith("https://templateflow.s3.amazonaws.com/tpl-MNI152NLin6Asym/")
    assert image_url.endswith(entry.image_file)
    assert labels_url.endswith(
        "tpl-MNI152NLin6Asym_atlas-Schaefer2018_desc-400Parcels17Networks_dseg.tsv"
    )
    assert labels_file == entry.stem + ".tsv"
    assert "Cereb Cortex" in entry.citation
    assert "Nat Neurosci" in CATALOGUE["TianSubcortex_3TS2"].citation
    assert "13:4933" in CATALOGUE["HCP1065_thr0p1"].citation


def test_scan_atlas_dir_templateflow_layout(tmp_path):
    folder = tmp_path / "atlases"
    folder.mkdir()
    tpl = "tpl-MNI152NLin2009cAsym"
    write_image(folder / f"{tpl}_res-02_atlas-Toy_desc-3Regions_dseg.nii.gz", label_volume())
    write_text(folder / f"{tpl}_atlas-Toy_dseg.tsv", "index\tname\n1\ta\n")
    table = "index\tname\n1\ta\n2\tb\n3\tc\n"
    write_text(folder / f"{tpl}_atlas-Toy_desc-3Regions_dseg.tsv", table)
    write_image(folder / "tpl-MNI152NLin2009cAsym_atlas-Plain_dseg.nii", label_volume())
    write_image(folder / "not-an-atlas.nii.gz", label_volume())
    write_image(folder / "tpl-MNI152NLin2009cAsym_atlas-Toy_T1w.nii.gz", label_volume())
    found = scan_atlas_dir(folder)
    assert sorted(found) == ["Plain", "Toy_3Regions"]
    assert found["Toy_3Regions"].labels_path.name.endswith("desc-3Regions_dseg.tsv")
    assert found["Toy_3Regions"].load().region_names == ["a", "b", "c"]
    assert found["Plain"].labels_path is None
    with pytest.raises(ParcellationError, match="does not exist"):
        scan_atlas_dir(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# Downloads from a mirror ($LACUNA_ATLAS_URL)
# --------------------------------------------------------------------------------------


@needs_atlases
def test_download_from_mirror_then_cache(monkeypatch, data_dir, caplog):
    with FolderServer(ATLASES) as server:
        monkeypatch.setenv(pm.ATLAS_URL_ENV, server.url + "/")
        with caplog.at_level(logging.INFO):
            parc = get_parcellation("TianSubcortex_3TS1")
        assert f"downloading TianSubcortex_3TS1 from {server.url}/{TIAN_S1}.nii.gz" in caplog.text
        assert parc.image_path == data_dir / "atlases" / f"{TIAN_S1}.nii.gz"
        assert parc.labels_path == data_dir / "atlases" / f"{TIAN_S1}.txt"
        assert parc.load().n_regions == 16
        assert parc.citation.startswith("Tian")
        assert sorted(server.paths) == sorted([f"/{TIAN_S1}.nii.gz", f"/{TIAN_S1}.txt"])
        clear_parcellation_cache()
        again = get_parcellation("TianSubcortex_3TS1")
        assert again == parc
        assert len(server.paths) == 2
    assert sorted(p.name for p in (data_dir / "atlases").iterdir()) == [
        f"{TIAN_S1}.nii.gz",
        f"{TIAN_S1}.txt",
    ]
    info = {i.name: i for i in list_parcellations()}
    assert info["TianSubcortex_3TS1"].cached and info["TianSubcortex_3TS1"].source == "catalogue"
    assert not info["TianSubcortex_3TS2"].cached


@needs_atlases
def test_corrupt_download_leaves_nothing(monkeypatch, data_dir, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{TIAN_S1}.nii.gz").write_bytes(b"<html>not found</html>")
    shutil.copy(ATLASES / f"{TIAN_S1}.txt", mirror)
    with FolderServer(mirror) as server:
        monkeypatch.setenv(pm.ATLAS_URL_ENV, server.url)
        with pytest.raises(ParcellationError, match="TianSubcortex_3TS1") as info:
            get_parcellation("TianSubcortex_3TS1")
    assert "not a valid parcellation" in str(info.value)
    assert list((data_dir / "atlases").iterdir()) == []


def test_missing_file_on_mirror_mentions_mirror_variable(monkeypatch, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with FolderServer(tmp_path / "empty") as server:
        monkeypatch.setenv(pm.ATLAS_URL_ENV, server.url)
        with pytest.raises(ParcellationError, match=pm.ATLAS_URL_ENV):
            get_parcellation("Schaefer2018_100Parcels7Networks")
    assert list((data_dir / "atlases").iterdir()) == []


def test_default_source_tsv_labels_and_plain_nii(data_dir, tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    write_image(upstream / "toy.nii", label_volume())  # served uncompressed
    write_text(upstream / "toy_dseg.tsv", "index\tname\n1\ta\n2\tb\n3\tc\n")
    with FolderServer(upstream) as server:
        entry = CatalogueEntry(
            name="Toy_3Regions",
            space="MNI152NLin6Asym",
            image_file="tpl-MNI152NLin6Asym_res-01_atlas-Toy_desc-3Regions_dseg.nii.gz",
            labels_file="tpl-MNI152NLin6Asym_res-01_atlas-Toy_desc-3Regions_dseg.txt",
            citation="",
            licence="",
            image_url=f"{server.url}/toy.nii",
            labels_url=f"{server.url}/toy_dseg.tsv",
        )
        parc = fetch_parcellation(entry)
    assert parc.labels_path.name == entry.stem + ".tsv"
    assert parc.image_path.read_bytes()[:2] == b"\x1f\x8b"
    assert parc.load().region_names == ["a", "b", "c"]


# --------------------------------------------------------------------------------------
# Resolution order and errors
# --------------------------------------------------------------------------------------


def test_resolution_order_registered_then_atlas_dir(tmp_path):
    folder = tmp_path / "atlases"
    folder.mkdir()
    in_dir = write_image(
        folder / "tpl-MNI152NLin6Asym_atlas-Toy_desc-A_dseg.nii.gz", label_volume()
    )
    assert get_parcellation("Toy_A", atlas_dir=folder).image_path == in_dir
    own = write_image(tmp_path / "own.nii.gz", label_volume())
    register_parcellation("Toy_A", own, space="MNI152NLin6Asym")
    assert get_parcellation("Toy_A", atlas_dir=folder).image_path == own
    sources = {i.name: i.source for i in list_parcellations(atlas_dir=folder)}
    assert sources["Toy_A"] == "registered"
    assert sources["Schaefer2018_100Parcels7Networks"] == "catalogue"


def test_atlas_dir_unsupported_space_raises_space_error(tmp_path):
    write_image(tmp_path / "tpl-Fancy_atlas-Toy_dseg.nii.gz", label_volume())
    with pytest.raises(SpaceError, match="tpl-Fancy_atlas-Toy_dseg"):
        get_parcellation("Toy", atlas_dir=tmp_path)


def test_unknown_name_lists_available_and_how_to_register(tmp_path):
    with pytest.raises(ParcellationError) as info:
        get_parcellation("Schaefer2018_100Parcels7Network")
    message = str(info.value)
    assert "Did you mean Schaefer2018_100Parcels7Networks" in message
    assert "HCP1065_thr0p1" in message and "register_parcellation" in message


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def test_register_persists_across_processes(tmp_path, data_dir):
    image = write_image(tmp_path / "tpl-MNI152NLin2009cAsym_mine.nii.gz", label_volume())
    labels = write_text(tmp_path / "mine.txt", "a\nb\nc\n")
    parc = register_parcellation("Mine_V1", image, labels, citation="me 2024")
    assert parc.space == "MNI152NLin2009cAsym"  # from the tpl- entity
    stored = json.loads((data_dir / "parcellations.json").read_text())
    assert stored["parcellations"]["Mine_V1"]["image_path"] == str(image.resolve())
    clear_parcellation_cache()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        names = pool.apply(_region_names_in_child, ("Mine_V1",))
    assert names == ["a", "b", "c"]
    assert registered_parcellations()["Mine_V1"].citation == "me 2024"


def _region_names_in_child(name):
    return get_parcellation(name).load().region_names


@pytest.mark.parametrize("name", ["My-Atlas", "a_b_c", "", "atlas.nii", "_x", "x_", "Ünï"])
def test_register_rejects_invalid_names(tmp_path, name):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    with pytest.raises(ValueError, match="invalid parcellation name"):
        register_parcellation(name, image, space="MNI152NLin6Asym")


def test_register_validates_space_and_files(tmp_path):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    with pytest.raises(SpaceError):
        register_parcellation("Mine", image, space="Talairach")
    with pytest.raises(ValueError, match="space"):
        register_parcellation("Mine", image)
    with pytest.raises(ParcellationError, match="does not exist"):
        register_parcellation("Mine", tmp_path / "none.nii.gz", space="MNI152NLin6Asym")
    bad = write_image(tmp_path / "bad.nii.gz", np.full((3, 3, 3), 0.5, dtype=np.float32))
    with pytest.raises(ParcellationError, match="non-integer"):
        register_parcellation("Mine", bad, space="MNI152NLin6Asym")
    assert registered_parcellations() == {}


def test_register_refuses_shadowing_unless_overwrite(tmp_path):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    other = write_image(tmp_path / "b.nii.gz", label_volume())
    register_parcellation("Mine", image, space="MNI152NLin6Asym")
    with pytest.raises(ParcellationError, match="already registered"):
        register_parcellation("Mine", other, space="MNI152NLin6Asym")
    register_parcellation("Mine", other, space="MNI152NLin6Asym", overwrite=True)
    assert get_parcellation("Mine").image_path == other.resolve()
    with pytest.raises(ParcellationError, match="catalogue"):
        register_parcellation("TianSubcortex_3TS1", image, space="MNI152NLin6Asym")


def test_unregister_and_missing_files(tmp_path):
    image = write_image(tmp_path / "a.nii.gz", label_volume())
    register_parcellation("Mine", image, space="MNI152NLin6Asym")
    image.unlink()
    with pytest.raises(ParcellationError, match="no longer exists"):
        get_parcellation("Mine")
    unregister_parcellation("Mine")
    assert "Mine" not in registered_parcellations()
    with pytest.raises(ParcellationError, match="no parcellation named 'Mine'"):
        unregister_parcellation("Mine")


def test_corrupt_registry_is_reported(data_dir):
    data_dir.mkdir(parents=True)
    (data_dir / "parcellations.json").write_text("{broken")
    with pytest.raises(ParcellationError, match="parcellations.json"):
        get_parcellation("Anything")


def _register_many(args):
    folder, worker = args
    image = Path(folder) / "shared.nii.gz"
    for i in range(5):
        register_parcellation(f"W{worker}_R{i}", image, space="MNI152NLin6Asym")
    return worker


def test_concurrent_registration_loses_nothing(tmp_path):
    write_image(tmp_path / "shared.nii.gz", label_volume())
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        done = pool.map(_register_many, [(str(tmp_path), w) for w in range(4)])
    assert sorted(done) == [0, 1, 2, 3]
    names = set(registered_parcellations())
    assert names == {f"W{w}_R{i}" for w in range(4) for i in range(5)}


@needs_atlases
@pytest.mark.parametrize("form", ["folder", "file-url"])
def test_mirror_may_be_a_local_folder_or_file_url(monkeypatch, data_dir, form):
    base = str(ATLASES) if form == "folder" else ATLASES.as_uri()
    monkeypatch.setenv(pm.ATLAS_URL_ENV, base)
    parc = get_parcellation("TianSubcortex_3TS1")
    assert parc.image_path == data_dir / "atlases" / f"{TIAN_S1}.nii.gz"
    assert parc.image_path.read_bytes() == (ATLASES / f"{TIAN_S1}.nii.gz").read_bytes()
    assert parc.load().n_regions == 16


def test_missing_file_in_a_local_mirror_names_the_file(monkeypatch, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(pm.ATLAS_URL_ENV, (tmp_path / "empty").as_uri())
    with pytest.raises(ParcellationError, match="does not exist") as info:
        get_parcellation("Schaefer2018_100Parcels7Networks")
    assert str(tmp_path / "empty") in str(info.value) and pm.ATLAS_URL_ENV in str(info.value)
    assert list((data_dir / "atlases").iterdir()) == []
