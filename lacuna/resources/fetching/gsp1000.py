"""GSP1000 from Harvard Dataverse: download, verify, unpack, convert to HDF5 batch files
and register as a functional connectome (:func:`fetch_gsp1000`).

Every completed step writes a marker, so the same call after an interruption resumes
(partial files continue with an HTTP ``Range`` request) and a completed fetch makes no
network request at all.
"""

from __future__ import annotations

import math
from pathlib import Path

from lacuna.core.errors import AuthenticationError, DownloadError, LacunaError, ProcessingError
from lacuna.formats.gsp1000 import GSP_PATTERN, gsp1000_to_hdf5
from lacuna.net.archives import extract_tar
from lacuna.net.credentials import resolve_api_key
from lacuna.net.disk import check_disk_space
from lacuna.net.http import redact_url
from lacuna.resources import connectomes as registry
from lacuna.resources.fetching.dataverse import AUTH_HELP as DATAVERSE_HELP
from lacuna.resources.fetching.dataverse import DataverseClient
from lacuna.resources.fetching.records import FetchResult
from lacuna.resources.fetching.remote import RemoteFile
from lacuna.resources.fetching.run import (
    BATCHES,
    RAW,
    FetchRun,
    ProgressCallback,
    check_register_name,
    download_step,
    exclusive,
    products,
    register_step,
    space_factor,
)
from lacuna.resources.fetching.sources import ConnectomeSource, get_source


def fetch_gsp1000(
    output_dir: str | Path,
    *,
    api_key: str | None = None,
    batches: int = 10,
    test_mode: bool = False,
    skip_checksum: bool = False,
    register: bool = True,
    register_name: str = "GSP1000",
    force: bool = False,
    progress_callback: ProgressCallback | None = None,
    verbose: bool = False,
) -> FetchResult:
    """Download, process, and register the GSP1000 functional connectome.

    Downloads the Brain Genomics Superstruct Project 1000-subject resting-state fMRI
    dataset from Harvard Dataverse (the brain mask, the other metadata files and the
    subject tarballs, each verified against its listed MD5), unpacks the tarballs into
    ``output_dir/raw`` (each tarball is deleted once unpacked), converts the
    ``sub-*/func/*bld001_rest_*_finalmask.nii.gz`` images to ``batches`` HDF5 files in
    ``output_dir/batches`` and registers them (MNI152NLin6Asym, 2 mm). Interrupted runs
    resume (module docs).

    Parameters
    ----------
    output_dir : str or Path
        Directory for the downloads and the HDF5 batch files.
    api_key : str, optional
        Harvard Dataverse API token. If not provided, ``DATAVERSE_API_KEY``, then the
        credentials file of the data cache are used.
    batches : int
        Number of HDF5 batch files to create. More batches = lower RAM usage.
        Recommendations: 4GB RAM → 100, 8GB → 50, 16GB → 25, 32GB+ → 10.
    test_mode : bool
        If True, downloads the metadata files and the first tarball only (~2GB) to
        test the full pipeline.
    skip_checksum : bool
        Skip checksum (and size) verification. Use when Dataverse metadata is outdated.
    register : bool
        Automatically register the connectome after processing.
    register_name : str
        Name for connectome registration.
    force : bool
        Download, convert and register again, replacing existing files and
        registrations.
    progress_callback : callable, optional
        Function called with :class:`FetchProgress` updates during operation.
    verbose : bool
        Print informational messages.

    Returns
    -------
    FetchResult
        Result containing output paths, registration status, and timing.

    Raises
    ------
    AuthenticationError
        If the API key is missing or invalid.
    DownloadError
        If a download fails after retries, a checksum does not match, or the disk is
        too small (:class:`~lacuna.net.disk.InsufficientDiskSpaceError`).
    ProcessingError
        If unpacking (e.g. an unsafe archive member) or the NIfTI to HDF5 conversion
        fails.

    Examples
    --------
    >>> from lacuna.io import fetch_gsp1000
    >>> result = fetch_gsp1000(
    ...     output_dir="/data/connectomes/gsp1000",
    ...     api_key="your-dataverse-api-key",
    ...     batches=50
    ... )
    >>> print(result.summary())
    """
    if int(batches) < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    check_register_name(register, register_name)
    source = get_source("gsp1000")
    run = FetchRun(source, output_dir, progress_callback, verbose, force)
    batches_dir = run.output_dir / BATCHES
    with exclusive(run.output_dir):
        if force:
            run.reset()
        params = {"batches": int(batches), "test_mode": bool(test_mode)}
        if run.markers.done("converted", **params) and products(source, run.output_dir):
            run.report("processing", f"GSP1000 is already converted in {batches_dir}")
        else:
            mask, functional = _gsp_download(run, api_key, test_mode, skip_checksum)
            _gsp_convert(run, mask, functional, params)
        outputs = products(source, run.output_dir)
        registered_as = None
        if register:
            registered_as = register_step(
                run,
                register_name,
                batches_dir,
                lambda: registry.register_functional_connectome(
                    register_name,
                    batches_dir,
                    source.space,
                    2.0,
                    description=source.description + (" (test mode: first tarball only)" if test_mode else ""),
                    citation=source.citation,
                    overwrite=True,
                ),
            )
    if test_mode:
        run.warn("test mode: only the first tarball was fetched; run again without test mode for all subjects")
    return run.result(batches_dir, outputs, registered_as)


def _gsp_client(run: FetchRun, api_key: str | None) -> DataverseClient:
    key = resolve_api_key("dataverse", api_key)
    if key is None:
        raise AuthenticationError(f"GSP1000 needs a Harvard Dataverse API token and none was given. {DATAVERSE_HELP}")
    return DataverseClient(run.source.dataverse_server, key)


def _gsp_download(run: FetchRun, api_key: str | None, test_mode: bool, skip_checksum: bool) -> tuple[Path, list[str]]:
    """Download the metadata files and (the first, in test mode) tarballs, unpack the
    tarballs. Returns the brain mask and the functional images (relative to raw/)."""
    source = run.source
    client = _gsp_client(run, api_key)
    run.report("download", f"listing the files of {source.persistent_id} on {redact_url(client.server)}")
    with run.timed("download_time"):
        files = client.list_files(source.persistent_id)
    tarballs = sorted((f for f in files if f.name.endswith(".tar")), key=lambda f: f.name)
    metadata = [f for f in files if not f.name.endswith(".tar")]
    if not tarballs:
        raise DownloadError(f"the dataset {source.persistent_id} lists no .tar files; has it changed?")
    if test_mode:
        tarballs = tarballs[:1]
    mask_file = _pick_mask(metadata, source)
    pending = [f for f in metadata if not (run.downloads / f.name).is_file()]
    pending += [t for t in tarballs if not _unpacked(run, t)]
    needed = space_factor(source) * sum(f.size or 0 for f in pending)
    check_disk_space(run.output_dir, needed, f"GSP1000 ({len(pending)} files to fetch, unpack and convert)")
    total = len(metadata) + len(tarballs)
    for index, remote in enumerate(metadata):
        download_step(run, client.download, remote, verify=not skip_checksum, index=index, total=total)
    functional: list[str] = []
    for index, tarball in enumerate(tarballs, start=len(metadata)):
        if not _unpacked(run, tarball):
            path = download_step(run, client.download, tarball, verify=not skip_checksum, index=index, total=total)
            _unpack_gsp(run, tarball, path, index, total)
        functional.extend(run.markers.read(f"extract_{tarball.name}").get("functional", []))
    run.markers.mark("downloaded", files=[f.name for f in metadata + tarballs], test_mode=test_mode)
    return run.downloads / mask_file.name, sorted(set(functional))


def _pick_mask(metadata: list[RemoteFile], source: ConnectomeSource) -> RemoteFile:
    """The brain mask among the metadata files (a NIfTI named *mask*, *brain* preferred)."""
    masks = [f for f in metadata if f.name.lower().endswith((".nii", ".nii.gz")) and "mask" in f.name.lower()]
    if not masks:
        raise ProcessingError(
            f"the dataset {source.persistent_id} lists no brain mask NIfTI (a .nii/.nii.gz file named "
            f"*mask*) among {', '.join(f.name for f in metadata) or 'no metadata files'}"
        )
    return sorted(masks, key=lambda f: ("brain" not in f.name.lower(), f.name))[0]


def _unpacked(run: FetchRun, tarball: RemoteFile) -> bool:
    info = run.markers.read(f"extract_{tarball.name}")
    return bool(info) and (not tarball.md5 or info.get("md5") == tarball.md5)


def _unpack_gsp(run: FetchRun, tarball: RemoteFile, path: Path, index: int, total: int) -> None:
    raw = run.output_dir / RAW
    run.report("processing", f"unpacking {tarball.name}", current_file=tarball.name, done=index, total=total)
    with run.timed("processing_time"):
        written = extract_tar(path, raw)
    pattern_parts = GSP_PATTERN.split("/")
    functional = sorted(
        p.relative_to(raw).as_posix()
        for p in written
        if len(p.relative_to(raw).parts) == len(pattern_parts) and p.match(GSP_PATTERN)
    )
    run.markers.mark(f"extract_{tarball.name}", md5=tarball.md5, size=tarball.size, files=len(written), functional=functional)
    path.unlink(missing_ok=True)  # the unpacked images are the originals now


def _gsp_convert(run: FetchRun, mask: Path, functional: list[str], params: dict) -> None:
    """Convert the unpacked images into ``batches`` HDF5 files (resuming a conversion
    with the same settings; otherwise starting it afresh)."""
    n_subjects = len(functional)
    if n_subjects == 0:
        raise ProcessingError(f"the GSP1000 tarballs hold no files matching {GSP_PATTERN}")
    per_chunk = math.ceil(n_subjects / params["batches"])
    settings = {**params, "n_subjects": n_subjects, "subjects_per_chunk": per_chunk}
    batches_dir = run.output_dir / BATCHES
    if not run.markers.done("converting", **settings):
        for stale in batches_dir.glob("*.h5"):
            stale.unlink()
        run.markers.remove("converted")
        run.markers.mark("converting", **settings)
    n_files = math.ceil(n_subjects / per_chunk)
    run.report("processing", f"converting {n_subjects} subjects into {n_files} HDF5 batch files in {batches_dir}",
               done=0, total=n_files)
    with run.timed("processing_time"):
        try:
            files = gsp1000_to_hdf5(
                run.output_dir / RAW,
                mask,
                batches_dir,
                per_chunk,
                max_subjects=n_subjects if params["test_mode"] else None,
            )
        except (LacunaError, ValueError, FileNotFoundError, OSError, KeyError) as exc:
            raise ProcessingError(f"converting GSP1000 to HDF5 failed: {exc}") from exc
    run.markers.mark("converted", **settings, files=[f.name for f in files])
    run.report("processing", f"converted {n_subjects} subjects into {len(files)} HDF5 batch files",
               done=len(files), total=n_files)
