"""Fetching connectomes end to end against local fake Dataverse, Figshare and GitHub
servers (tests/fake_servers.py): downloads, resume, retries, checksums, safe
extraction, conversion, registration, the CLI, and keys that never leak."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from nibabel.streamlines import Field, Tractogram, TrkFile

from fake_servers import (
    LIST_PATH,
    FakeServer,
    datafile_path,
    md5,
    serve_dataverse,
    serve_figshare,
    serve_github_release,
)
from lacuna.resources.connectomes import get_registered_connectome, list_connectomes
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import AuthenticationError, DownloadError, ProcessingError
from lacuna.core.spaces import standard_grid
from lacuna.core.subject import SubjectData
from lacuna.io import (
    ConnectomeSource,
    FetchConfig,
    FetchProgress,
    FetchResult,
    fetch_connectome,
    fetch_dtor985,
    fetch_gsp1000,
    fetch_hcp1065,
    get_fetch_status,
    list_fetchable_connectomes,
)
from lacuna.net import http as base
from lacuna.net.archives import UnsafeArchiveError, extract_tar, extract_zip
from lacuna.net.disk import InsufficientDiskSpaceError
from lacuna.resources.fetching.sources import default_output_dir
from lacuna.net.credentials import credentials_path, resolve_api_key, save_api_key

KEY = "dv-SECRET-0123456789abcdef"
FIGSHARE_KEY = "fs-SECRET-fedcba9876543210"
PID = "doi:10.7910/DVN/ILXIKS"
ARTICLE = 25209947
GRID = standard_grid("MNI152NLin6Asym", 2)
MASK_BOX = (slice(40, 46), slice(50, 56), slice(38, 43))  # 180 voxels
N_TIMEPOINTS = 10


# --------------------------------------------------------------------------------------
# Synthetic payloads (built once per session)
# --------------------------------------------------------------------------------------


def _nifti_bytes(img, folder: Path, name: str) -> bytes:
    path = folder / name
    nib.save(img, path)
    return path.read_bytes()


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def gsp_payload(tmp_path_factory):
    """Brain mask, a README and two tarballs of two subjects each (4-D images on the FSL
    2 mm grid, 10 timepoints, signal inside the mask only)."""
    folder = tmp_path_factory.mktemp("gsp_payload")
    rng = np.random.default_rng(1)
    mask = np.zeros(GRID.shape, np.uint8)
    mask[MASK_BOX] = 1
    mask_bytes = _nifti_bytes(nib.Nifti1Image(mask, GRID.affine), folder, "mask.nii.gz")
    tarballs = {}
    for part in range(2):
        members = {}
        for number in range(2):
            subject = f"sub-{part * 2 + number + 1:04d}"
            data = np.zeros((*GRID.shape, N_TIMEPOINTS), np.int16)
            shared = rng.normal(0, 20, N_TIMEPOINTS)
            box = rng.normal(0, 30, (*data[MASK_BOX].shape,)) + 1000 + shared
            data[MASK_BOX] = box.astype(np.int16)
            img = nib.Nifti1Image(data, GRID.affine)
            name = f"{subject}/func/{subject}_bld001_rest_skip4_stc_mc_bp_sm6_finalmask.nii.gz"
            members[name] = _nifti_bytes(img, folder, f"{subject}.nii.gz")
            members[f"{subject}/func/{subject}_bld001_rest_motion.txt"] = b"0 0 0\n"
        tarballs[f"GSP_part{part + 1}.tar"] = _tar(members)
    return {
        "mask": mask_bytes,
        "readme": b"GSP1000 preprocessed for lesion network mapping\n",
        "tarballs": tarballs,
    }


def _dataverse_files(payload, **overrides) -> list[dict]:
    files = [
        {"id": 11, "name": "MNI152_T1_2mm_Brain_Mask.nii.gz", "content": payload["mask"]},
        {"id": 12, "name": "README.txt", "content": payload["readme"]},
    ]
    for number, (name, content) in enumerate(payload["tarballs"].items()):
        files.append({"id": 21 + number, "name": name, "content": content})
    for entry in files:
        entry.update(overrides.get(entry["name"], {}))
    return files


def _trk_bytes(folder: Path, name: str, n_streamlines: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    streamlines = [
        (rng.uniform(-40, 40, 3) + np.cumsum(rng.normal(0, 1, (int(rng.integers(5, 15)), 3)), axis=0)).astype(np.float32)
        for _ in range(n_streamlines)
    ]
    header = {
        Field.VOXEL_TO_RASMM: standard_grid("MNI152NLin2009cAsym", 1).affine,
        Field.VOXEL_SIZES: (1.0, 1.0, 1.0),
        Field.DIMENSIONS: (193, 229, 193),
        Field.VOXEL_ORDER: "RAS",
    }
    path = folder / name
    TrkFile(Tractogram(streamlines, affine_to_rasmm=np.eye(4)), header=header).save(str(path))
    return path.read_bytes()


@pytest.fixture(scope="session")
def trk_payload(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trk_payload")
    tracts = {
        "hcp1065_avg_tracts_trk/association/AF_L.trk": _trk_bytes(folder, "af.trk", 5, 1),
        "hcp1065_avg_tracts_trk/projection/CST_R.trk": _trk_bytes(folder, "cst.trk", 7, 2),
        "hcp1065_avg_tracts_trk/cranial_nerve/CNII_L.trk": _trk_bytes(folder, "cn.trk", 3, 3),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in tracts.items():
            archive.writestr(name, data)
    return {"dtor": _trk_bytes(folder, "dtor.trk", 20, 4), "hcp_zip": buffer.getvalue(), "hcp_count": 12}


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_and_offline(monkeypatch):
    """No waiting between retries; no key or server from the user's environment."""
    monkeypatch.setattr(base, "RETRY_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(base, "TIMEOUT_SECONDS", 10.0)
    for variable in ("DATAVERSE_API_KEY", "FIGSHARE_API_KEY", "LACUNA_DATAVERSE_URL",
                     "LACUNA_FIGSHARE_API_URL", "LACUNA_HCP1065_URL"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def server(monkeypatch):
    with FakeServer() as srv:
        monkeypatch.setenv("LACUNA_DATAVERSE_URL", srv.url())
        monkeypatch.setenv("LACUNA_FIGSHARE_API_URL", srv.url("/v2"))
        yield srv


@pytest.fixture
def dataverse(server, gsp_payload):
    files = _dataverse_files(gsp_payload)
    serve_dataverse(server, KEY, PID, files)
    server.files = files
    return server


def _gsp_out() -> Path:
    return default_output_dir("gsp1000")


def _datafile_hits(server) -> int:
    return sum(1 for r in server.requests if r.path.startswith("/api/access/datafile/"))


def _lesion(tmp_path) -> SubjectData:
    data = np.zeros(GRID.shape, np.uint8)
    data[41:43, 51:53, 40] = 1  # 4 voxels inside the brain mask box
    path = tmp_path / "sub-01_space-MNI152NLin6Asym_label-lesion_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, GRID.affine), path)
    return SubjectData.from_nifti(path)


# --------------------------------------------------------------------------------------
# GSP1000 (Dataverse)
# --------------------------------------------------------------------------------------


def test_gsp1000_end_to_end_registers_a_connectome_the_analysis_uses(dataverse, tmp_path):
    seen: list[FetchProgress] = []
    result = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2, progress_callback=seen.append)

    assert result.success and result.registered and result.register_name == "GSP1000"
    batches_dir = _gsp_out() / "batches"
    assert result.output_dir == batches_dir
    assert [p.name for p in result.output_files] == ["gsp1000_chunk_000.h5", "gsp1000_chunk_001.h5"]
    registered = get_registered_connectome("GSP1000")
    assert registered.kind == "functional" and registered.space == "MNI152NLin6Asym"
    assert registered.resolution == 2.0 and registered.n_subjects == 4
    assert "Holmes" in registered.citation
    # Stored relative to the data directory, so a moved cache still resolves.
    stored = json.loads((get_data_dir() / "connectomes.json").read_text())["connectomes"]["GSP1000"]
    assert stored["path"] == "connectomes/gsp1000/batches"
    # Every request carried the key; tarballs are gone once unpacked, the mask stays.
    assert all(r.headers.get("X-Dataverse-key") == KEY for r in dataverse.requests)
    assert not list((_gsp_out() / "downloads").glob("*.tar"))
    assert (_gsp_out() / "downloads" / "MNI152_T1_2mm_Brain_Mask.nii.gz").is_file()
    assert len(list((_gsp_out() / "raw").glob("sub-*/func/*finalmask.nii.gz"))) == 4
    # Progress: all three phases, byte counts for downloads.
    assert {p.phase for p in seen} == {"download", "processing", "registration"}
    assert any(p.bytes_total and p.bytes_transferred == p.bytes_total for p in seen)
    assert "registered as: GSP1000" in result.summary()

    mapped = __import__("lacuna.analysis.functional.network_mapping", fromlist=["x"]).FunctionalNetworkMapping(
        "GSP1000"
    ).run(_lesion(tmp_path))
    outputs = mapped.results["FunctionalNetworkMapping"]
    assert outputs["GSP1000_n_subjects"].value == 4
    z = outputs["GSP1000_z"].data
    assert z.shape == GRID.shape and np.isfinite(z).all() and np.abs(z[MASK_BOX]).sum() > 0


def test_gsp1000_test_mode_fetches_metadata_and_the_first_tarball_only(dataverse):
    result = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=5, test_mode=True)
    assert result.success
    served = {r.path for r in dataverse.requests if r.path.startswith("/api/access/")}
    assert served == {datafile_path(11), datafile_path(12), datafile_path(21)}
    assert get_registered_connectome("GSP1000").n_subjects == 2
    assert len(result.output_files) == 2  # ceil(2 subjects / 5 batches) = 1 per file
    assert any("test mode" in w for w in result.warnings)
    # The full run afterwards reuses the unpacked first tarball and converts all four.
    dataverse.reset_log()
    full = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2)
    assert {r.path for r in dataverse.requests if r.path.startswith("/api/access/")} == {datafile_path(22)}
    assert get_registered_connectome("GSP1000").n_subjects == 4 and len(full.output_files) == 2


def test_missing_key_fails_before_any_request(dataverse):
    with pytest.raises(AuthenticationError, match="API Token") as caught:
        fetch_gsp1000(_gsp_out())
    assert "DATAVERSE_API_KEY" in str(caught.value)
    assert dataverse.requests == []


def test_wrong_key_is_refused_with_instructions_and_not_shown(dataverse):
    wrong = "dv-WRONG-key-zzzz"
    with pytest.raises(AuthenticationError) as caught:
        fetch_gsp1000(_gsp_out(), api_key=wrong)
    text = str(caught.value)
    assert "401" in text and "API Token" in text and "--api-key" in text
    assert wrong not in text and wrong not in repr(caught.value)
    assert len(dataverse.requests) == 1  # no retry on 401


def test_refused_file_access_is_an_authentication_error(server, gsp_payload):
    files = _dataverse_files(gsp_payload, **{"GSP_part1.tar": {"access_status": 403}})
    serve_dataverse(server, KEY, PID, files)
    server.routes[datafile_path(21)].auth = ("X-Dataverse-key", "only-for-others")
    with pytest.raises(AuthenticationError, match="403"):
        fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert len(server.hits(datafile_path(21))) == 1


def test_missing_file_is_a_clear_download_error(server, gsp_payload):
    files = _dataverse_files(gsp_payload, **{"GSP_part2.tar": {"listed_only": True}})
    serve_dataverse(server, KEY, PID, files)
    with pytest.raises(DownloadError, match="404") as caught:
        fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert "GSP_part2.tar" in str(caught.value)
    assert len(server.hits(datafile_path(22))) == 1  # not retried


def test_transient_server_errors_are_retried(dataverse):
    dataverse.fail(datafile_path(11), 500, 503)
    dataverse.fail(LIST_PATH, 502)
    assert fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1).success
    assert len(dataverse.hits(datafile_path(11))) == 3
    assert len(dataverse.hits(LIST_PATH)) == 2


def test_connection_cut_mid_file_resumes_with_a_range_request(dataverse, gsp_payload):
    dataverse.fail(datafile_path(11), "cut")
    assert fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1).success
    first, second = dataverse.hits(datafile_path(11))
    size = len(gsp_payload["mask"])
    assert first.sent == size // 2 and first.range_start is None
    assert second.range_start == size // 2 and second.status == 206
    assert first.sent + second.sent == size  # nothing fetched twice
    saved = (_gsp_out() / "downloads" / "MNI152_T1_2mm_Brain_Mask.nii.gz").read_bytes()
    assert md5(saved) == md5(gsp_payload["mask"])


def test_interrupted_run_resumes_the_partial_file_and_skips_completed_steps(dataverse, gsp_payload, monkeypatch):
    monkeypatch.setattr(base, "RETRIES", 1)
    tarball = gsp_payload["tarballs"]["GSP_part2.tar"]
    dataverse.fail(datafile_path(22), "cut", "cut")
    with pytest.raises(DownloadError, match="resumed next time"):
        fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1)
    part = _gsp_out() / "downloads" / "GSP_part2.tar.part"
    kept = part.stat().st_size
    assert kept == len(tarball) // 2 + (len(tarball) - len(tarball) // 2) // 2

    dataverse.reset_log()
    result = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1)
    assert result.success and result.registered
    # Only the list call and the rest of the interrupted tarball were requested.
    assert [r.path for r in dataverse.requests] == [LIST_PATH, datafile_path(22)]
    resumed = dataverse.requests[1]
    assert resumed.range_start == kept and resumed.sent == len(tarball) - kept
    marker = json.loads((_gsp_out() / ".lacuna_fetch" / "download_GSP_part2.tar.json").read_text())
    assert marker["md5"] == md5(tarball) and marker["verified"] is True
    assert get_registered_connectome("GSP1000").n_subjects == 4


def test_interrupted_conversion_is_resumed_without_downloading_again(dataverse, monkeypatch):
    import lacuna.resources.fetching.gsp1000 as fetch_module

    real = fetch_module.gsp1000_to_hdf5

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(fetch_module, "gsp1000_to_hdf5", crash)
    with pytest.raises(ProcessingError, match="killed"):
        fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2)
    monkeypatch.setattr(fetch_module, "gsp1000_to_hdf5", real)
    dataverse.reset_log()
    assert fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2).registered
    assert [r.path for r in dataverse.requests] == [LIST_PATH]


def test_completed_fetch_makes_no_request_and_force_downloads_again(dataverse):
    fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2)
    dataverse.reset_log()
    again = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2)
    assert again.success and again.registered and dataverse.requests == []
    # Another batch count converts again (from the unpacked images), no download.
    rebatched = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=4)
    assert len(rebatched.output_files) == 4 and _datafile_hits(dataverse) == 0
    forced = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=2, force=True)
    assert forced.registered and len(forced.output_files) == 2
    assert _datafile_hits(dataverse) == 4


def test_checksum_mismatch_deletes_the_file_and_fails(server, gsp_payload):
    files = _dataverse_files(gsp_payload, **{"GSP_part1.tar": {"md5": "0" * 32}})
    serve_dataverse(server, KEY, PID, files)
    with pytest.raises(DownloadError, match="checksum mismatch") as caught:
        fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert "GSP_part1.tar" in str(caught.value)
    downloads = _gsp_out() / "downloads"
    assert not (downloads / "GSP_part1.tar").exists() and not (downloads / "GSP_part1.tar.part").exists()
    # skip_checksum accepts the file (outdated metadata).
    assert fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1, skip_checksum=True).registered


def test_malicious_tarball_members_are_refused(server, gsp_payload, tmp_path):
    outside = tmp_path / "absolute_evil.txt"
    evil = _tar({"../evil.txt": b"x", str(outside): b"y"})
    files = _dataverse_files(gsp_payload, **{"GSP_part1.tar": {"content": evil}})
    serve_dataverse(server, KEY, PID, files)
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil\.txt"):
        fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert not (_gsp_out() / "evil.txt").exists() and not outside.exists()


def test_not_enough_disk_space_fails_before_downloading(dataverse, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError, match="not enough free disk space") as caught:
        fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert "--output-dir" in str(caught.value)
    assert _datafile_hits(dataverse) == 0


def test_a_second_fetch_into_the_same_folder_is_refused(dataverse):
    import fcntl

    folder = _gsp_out() / ".lacuna_fetch"
    folder.mkdir(parents=True)
    with open(folder / "lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another fetch"):
            fetch_gsp1000(_gsp_out(), api_key=KEY)
    assert dataverse.requests == []


def test_keys_never_reach_logs_errors_markers_or_the_registry(dataverse, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    dataverse.fail(datafile_path(12), 500, "cut")
    result = fetch_gsp1000(_gsp_out(), api_key=KEY, batches=1, verbose=True)
    with pytest.raises(AuthenticationError) as caught:
        fetch_gsp1000(default_output_dir("gsp1000") / "other", api_key=KEY + "x")
    texts = [caplog.text, str(caught.value), repr(result), result.summary(), capsys.readouterr().out,
             repr(FetchConfig("gsp1000", "/tmp/x", api_key=KEY))]
    texts += [p.read_text() for p in get_data_dir().rglob("*.json")]
    assert caplog.text and any("retrying" in r.getMessage() for r in caplog.records)
    for text in texts:
        assert KEY not in text


# --------------------------------------------------------------------------------------
# dTOR985 (Figshare) and HCP1065 (GitHub release)
# --------------------------------------------------------------------------------------


def test_dtor985_end_to_end(server, trk_payload):
    serve_figshare(server, FIGSHARE_KEY, ARTICLE, [
        {"id": 5, "name": "README.md", "content": b"dTOR985"},
        {"id": 6, "name": "dTOR_985_tractogram.trk", "content": trk_payload["dtor"]},
    ], download_host="localhost")
    out = default_output_dir("dtor985")
    result = fetch_dtor985(out, api_key=FIGSHARE_KEY)
    assert result.success and result.registered and result.register_name == "dTOR985"
    tck = out / "dTOR985.tck"
    assert result.output_files == [tck]
    assert len(nib.streamlines.load(str(tck)).streamlines) == 20
    registered = get_registered_connectome("dTOR985")
    assert registered.kind == "structural" and registered.space == "MNI152NLin2009cAsym"
    assert registered.n_subjects == 985 and "2009bAsym" in registered.citation
    listing = server.hits(f"/v2/articles/{ARTICLE}/files")[0]
    assert listing.headers["Authorization"] == f"token {FIGSHARE_KEY}"
    # The download host is another site: the token is not sent there.
    assert "Authorization" not in server.hits("/ndownloader/files/6")[0].headers
    assert not server.hits("/ndownloader/files/5")
    assert (out / "downloads" / "dTOR_985_tractogram.trk").is_file()
    # Re-run: nothing requested; keep_original=False removes the .trk.
    server.reset_log()
    assert fetch_dtor985(out, keep_original=False).registered and server.requests == []
    assert not (out / "downloads" / "dTOR_985_tractogram.trk").exists()


def test_dtor985_needs_a_figshare_token(server):
    with pytest.raises(DownloadError, match="figshare.com/account/applications"):
        fetch_dtor985(default_output_dir("dtor985"))
    assert server.requests == []


def test_dtor985_wrong_token(server, trk_payload):
    serve_figshare(server, FIGSHARE_KEY, ARTICLE, [{"id": 6, "name": "t.trk", "content": trk_payload["dtor"]}])
    with pytest.raises(AuthenticationError, match="403") as caught:
        fetch_dtor985(default_output_dir("dtor985"), api_key="wrong-token")
    assert "wrong-token" not in str(caught.value)


def test_hcp1065_end_to_end_merges_without_cranial_nerves(server, trk_payload, monkeypatch):
    monkeypatch.setenv("LACUNA_HCP1065_URL", serve_github_release(server, trk_payload["hcp_zip"]))
    assert get_fetch_status("hcp1065") == {
        "downloaded": False, "processed": False, "registered": False, "location": None, "size_bytes": None,
    }
    out = default_output_dir("hcp1065")
    result = fetch_hcp1065(out, keep_original=False)
    assert result.success and result.registered
    tck = out / "HCP1065.tck"
    assert len(nib.streamlines.load(str(tck)).streamlines) == trk_payload["hcp_count"]
    registered = get_registered_connectome("HCP1065")
    assert registered.space == "MNI152NLin2009cAsym" and registered.path == tck
    assert not (out / "tracts").exists() and not (out / "downloads").exists()
    status = get_fetch_status("HCP1065")
    assert status["downloaded"] and status["processed"] and status["registered"]
    assert status["location"] == out and status["size_bytes"] >= tck.stat().st_size


def test_hcp1065_malicious_zip_is_refused(server, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tracts/AF_L.trk", b"x")
        archive.writestr("../../evil.trk", b"y")
    monkeypatch.setenv("LACUNA_HCP1065_URL", serve_github_release(server, buffer.getvalue()))
    out = default_output_dir("hcp1065")
    with pytest.raises(UnsafeArchiveError, match="evil"):
        fetch_hcp1065(out)
    assert not (out.parent / "evil.trk").exists() and not (out / "evil.trk").exists()


def test_registration_of_a_taken_name_is_kept_with_a_warning(server, trk_payload, monkeypatch):
    monkeypatch.setenv("LACUNA_HCP1065_URL", serve_github_release(server, trk_payload["hcp_zip"]))
    fetch_hcp1065(default_output_dir("hcp1065"))
    other = fetch_hcp1065(get_data_dir() / "elsewhere")
    assert not other.registered and any("already registered" in w for w in other.warnings)
    assert get_registered_connectome("HCP1065").path.parent == default_output_dir("hcp1065")
    assert fetch_hcp1065(get_data_dir() / "elsewhere", force=True).registered
    assert fetch_hcp1065(get_data_dir() / "third", register_name="HCP1065b").register_name == "HCP1065b"
    assert {c.name for c in list_connectomes()} == {"HCP1065", "HCP1065b"}


# --------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------


def _tar_with(tmp_path, *infos) -> Path:
    path = tmp_path / "archive.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name, kind=tarfile.REGTYPE, link="", data=b"data"):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    "member",
    [
        _info("../escape.txt"),
        _info("sub/../../escape.txt"),
        _info("/tmp/lacuna-absolute-escape.txt"),
        _info("link", tarfile.SYMTYPE, "../outside"),
        _info("link", tarfile.SYMTYPE, "/etc/passwd"),
        _info("sub/link", tarfile.SYMTYPE, "../.."),
        _info("hard", tarfile.LNKTYPE, "../outside"),
        _info("fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-up", "symlink-absolute", "symlink-nested", "hardlink", "fifo"],
)
def test_unsafe_tar_members_are_refused(tmp_path, member):
    archive = _tar_with(tmp_path, member)
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        extract_tar(archive, target)
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/lacuna-absolute-escape.txt").exists()


def test_safe_tar_with_an_inner_link_extracts(tmp_path):
    archive = _tar_with(tmp_path, _info("data/file.txt", data=b"hello"), _info("data/alias", tarfile.SYMTYPE, "file.txt"))
    written = extract_tar(archive, tmp_path / "target")
    assert [p.name for p in written] == ["file.txt"]
    assert (tmp_path / "target" / "data" / "alias").read_bytes() == b"hello"


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/escape.txt", "a\\..\\..\\escape.txt"])
def test_unsafe_zip_members_are_refused(tmp_path, name):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(UnsafeArchiveError):
        extract_zip(archive, tmp_path / "target")
    assert not (tmp_path / "escape.txt").exists()


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(info, "../../etc")
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_zip(archive, tmp_path / "target")


# --------------------------------------------------------------------------------------
# Credentials, dataclasses, catalogue
# --------------------------------------------------------------------------------------


def test_credentials_file_is_private_and_keys_resolve_in_order(monkeypatch):
    path = save_api_key("dataverse", KEY)
    assert path == credentials_path() == get_data_dir() / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"api_keys": {"dataverse": KEY}}
    assert resolve_api_key("dataverse") == KEY
    monkeypatch.setenv("DATAVERSE_API_KEY", "from-env")
    assert resolve_api_key("dataverse") == "from-env"
    assert resolve_api_key("dataverse", "explicit") == "explicit"
    assert FetchConfig("gsp1000", "/x").get_api_key() == "from-env"
    assert FetchConfig("hcp1065", "/x", api_key="k").get_api_key() is None
    with pytest.raises(AuthenticationError) as caught:
        resolve_api_key("figshare", "two words")
    assert "two words" not in str(caught.value)


def test_dataclasses():
    progress = FetchProgress("download", "a.tar", 1, 4, bytes_transferred=50, bytes_total=200)
    assert progress.download_percent == 25.0
    assert progress.percent_complete == pytest.approx(100 * 1.25 / 4)
    assert FetchProgress("processing", "", 0, 0).percent_complete == 0.0
    config = FetchConfig.from_cli_args({"name": "GSP1000", "api_key": KEY, "no_register": True, "batches": 3})
    assert config.connectome == "gsp1000" and not config.register and config.batches == 3
    assert config.output_dir == default_output_dir("gsp1000") and KEY not in repr(config)
    with pytest.raises(ValueError):
        FetchConfig("gsp1000", "/x", batches=0)
    failed = FetchResult(False, "gsp1000", Path("/x"), error="boom")
    assert "failed: boom" in failed.summary()


def test_catalogue_and_server_overrides(monkeypatch):
    sources = {s.name: s for s in list_fetchable_connectomes()}
    assert set(sources) == {"gsp1000", "dtor985", "hcp1065"}
    assert all(isinstance(s, ConnectomeSource) for s in sources.values())
    gsp = sources["gsp1000"]
    assert (gsp.type, gsp.source_type, gsp.persistent_id) == ("functional", "dataverse", PID)
    assert gsp.dataverse_server == "https://dataverse.harvard.edu"
    assert sources["dtor985"].article_id == ARTICLE and sources["dtor985"].space == "MNI152NLin2009bAsym"
    assert "frankyeh/data-atlas" in sources["hcp1065"].download_url
    monkeypatch.setenv("LACUNA_DATAVERSE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("LACUNA_HCP1065_URL", "http://127.0.0.1:9/x.zip")
    sources = {s.name: s for s in list_fetchable_connectomes()}
    assert sources["gsp1000"].dataverse_server == "http://127.0.0.1:9"
    assert sources["hcp1065"].download_url == "http://127.0.0.1:9/x.zip"
    with pytest.raises(ValueError, match="unknown connectome"):
        fetch_connectome("gsp2000", "/tmp/x")
    with pytest.raises(ValueError, match="unknown connectome"):
        get_fetch_status("nope")


def test_fetch_connectome_dispatches(dataverse):
    result = fetch_connectome("GSP1000", _gsp_out(), api_key=KEY, batches=1, register=False)
    assert result.success and not result.registered and result.register_name is None
    assert list_connectomes() == []
    status = get_fetch_status("gsp1000")
    assert status["downloaded"] and status["processed"] and not status["registered"]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(args, **env):
    from lacuna.cli.main import cli

    return CliRunner().invoke(cli, args, env=env or None, catch_exceptions=False)


def test_cli_fetch_list():
    result = _cli(["fetch", "--list"])
    assert result.exit_code == 0, result.output
    for name in ("gsp1000", "dtor985", "hcp1065"):
        assert name in result.stdout
    assert "not fetched" in result.stdout


def test_cli_fetch_gsp1000_with_saved_key_and_status(dataverse):
    result = _cli(["fetch", "gsp1000", "--api-key", KEY, "--save-key", "--test-mode", "--batches", "1"])
    assert result.exit_code == 0, result.output
    assert "registered as: GSP1000" in result.stdout
    assert "[download]" in result.stderr and "[registration]" in result.stderr
    assert KEY not in result.output
    assert stat.S_IMODE(credentials_path().stat().st_mode) == 0o600
    assert get_registered_connectome("GSP1000").n_subjects == 2
    # The saved key is used without --api-key; the full fetch adds the second tarball.
    again = _cli(["fetch", "gsp1000", "--batches", "2"])
    assert again.exit_code == 0, again.output
    assert get_registered_connectome("GSP1000").n_subjects == 4
    status = _cli(["connectomes", "status", "gsp1000"])
    assert status.exit_code == 0
    assert "downloaded: yes  processed: yes  registered: yes" in status.stdout
    assert str(_gsp_out()) in status.stdout


def test_cli_fetch_errors(dataverse, tmp_path):
    wrong = _cli(["fetch", "gsp1000", "--api-key", "bad-key-123", "--output-dir", str(tmp_path / "g")])
    assert wrong.exit_code == 1 and "API Token" in wrong.output and "bad-key-123" not in wrong.output
    assert not credentials_path().exists()
    misplaced = _cli(["fetch", "hcp1065", "--batches", "3"])
    assert misplaced.exit_code == 64 and "gsp1000 only" in misplaced.output  # usage errors
    assert _cli(["fetch"]).exit_code == 64
    assert _cli(["fetch", "gsp1000", "--save-key"]).exit_code == 64
    assert _cli(["connectomes", "status", "nope"]).exit_code == 1


def test_cli_fetch_hcp1065_output_dir(server, trk_payload, tmp_path, monkeypatch):
    monkeypatch.setenv("LACUNA_HCP1065_URL", serve_github_release(server, trk_payload["hcp_zip"]))
    out = tmp_path / "hcp"
    result = _cli(["fetch", "hcp1065", "--output-dir", str(out), "--register-name", "HCPtracts", "--no-keep-original"])
    assert result.exit_code == 0, result.output
    assert get_registered_connectome("HCPtracts").path == out / "HCP1065.tck"
    assert not (out / "tracts").exists()
    assert os.path.isabs(json.loads((get_data_dir() / "connectomes.json").read_text())["connectomes"]["HCPtracts"]["path"])


def test_progress_printer_redraws_on_a_terminal_and_throttles_plain_lines():
    from lacuna.cli.fetch_commands import ProgressPrinter

    terminal = io.StringIO()
    printer = ProgressPrinter(terminal, interactive=True, interval=0)
    for done in (0, 512, 1024):
        printer(FetchProgress("download", "a.tar", 0, 2, done, 1024, "downloading a.tar"))
    printer(FetchProgress("processing", "a.tar", 0, 2, message="unpacking a.tar"))
    printer.close()
    text = terminal.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 2
    assert "100.0% (1.0 KB of 1.0 KB) [1/2]" in text

    plain = io.StringIO()
    printer = ProgressPrinter(plain, interactive=False, interval=3600)
    for done in (0, 512, 1024):
        printer(FetchProgress("download", "a.tar", 0, 1, done, 1024, "downloading a.tar"))
    printer(FetchProgress("registration", "", 0, 1, message="registering GSP1000"))
    assert plain.getvalue().splitlines() == [
        "[download] downloading a.tar   0.0% (0 B of 1.0 KB)",
        "[registration] registering GSP1000",
    ]
