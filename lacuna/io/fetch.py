"""Fetch normative connectomes: download, verify, unpack, convert and register.

One call takes a user from nothing to a registered, analysis-ready connectome:

* :func:`fetch_gsp1000` — GSP1000 resting-state fMRI from Harvard Dataverse, converted
  to HDF5 batch files and registered as a functional connectome;
* :func:`fetch_dtor985` — the dTOR985 tractogram from Figshare, converted to ``.tck``
  and registered as a structural connectome;
* :func:`fetch_hcp1065` — the HCP1065 tract atlas (zip of ``.trk`` files, GitHub
  release), merged into one ``.tck`` without the cranial nerves and registered.

Layout of an output folder (default ``<data dir>/connectomes/<name>``)::

    downloads/      downloaded files (GSP1000 tarballs are deleted once unpacked)
    raw/            GSP1000: the unpacked sub-*/func/ images
    tracts/         HCP1065: the unpacked .trk files
    batches/        GSP1000: the HDF5 batch files (registered)
    dTOR985.tck     dTOR985 / HCP1065.tck: the tractogram (registered)
    .lacuna_fetch/  one marker file per completed step

Resuming: downloads stream into ``<file>.part`` and continue with an HTTP ``Range``
request after an interruption; every completed step (a file downloaded and verified, a
tarball unpacked, the conversion, the registration) writes a marker atomically, so
running the same call again after any interruption skips what is done and finishes
the job; a completed fetch makes no network request at all. ``force`` starts over.

API keys come from the argument, the environment (``DATAVERSE_API_KEY``,
``FIGSHARE_API_KEY``) or ``<data dir>/credentials.json``; they are sent only to their
service and never logged, stored in markers, results or the registry.
"""

from __future__ import annotations

import fcntl
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lacuna.assets import connectomes as registry
from lacuna.assets.connectomes import get_connectome_path
from lacuna.core.datadir import get_data_dir
from lacuna.core.errors import AuthenticationError, DownloadError, LacunaError, ProcessingError
from lacuna.core.spaces import canonical_space
from lacuna.io.convert import GSP_PATTERN, gsp1000_to_hdf5, merge_trk_to_tck, trk_to_tck
from lacuna.io.download import md5_file, redact_url
from lacuna.io.downloaders.archives import extract_tar, extract_zip
from lacuna.io.downloaders.base import (
    DEFAULT_REGISTER_NAMES,
    MARKER_DIR,
    ConnectomeSource,
    FetchConfig,
    FetchProgress,
    FetchResult,
    RemoteFile,
    StepMarkers,
    check_disk_space,
    connectome_sources,
    default_output_dir,
    format_bytes,
    get_source,
)
from lacuna.io.downloaders.credentials import resolve_api_key
from lacuna.io.downloaders.dataverse import AUTH_HELP as DATAVERSE_HELP
from lacuna.io.downloaders.dataverse import DataverseClient
from lacuna.io.downloaders.figshare import AUTH_HELP as FIGSHARE_HELP
from lacuna.io.downloaders.figshare import FigshareClient
from lacuna.io.downloaders.github import download_release_asset, hcp1065_url, release_asset

__all__ = [
    "fetch_connectome",
    "fetch_dtor985",
    "fetch_from_config",
    "fetch_gsp1000",
    "fetch_hcp1065",
    "get_connectome_path",
    "get_data_dir",
    "get_fetch_status",
    "list_fetchable_connectomes",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[FetchProgress], None]

DOWNLOADS, RAW, BATCHES, TRACTS = "downloads", "raw", "batches", "tracts"
#: File name of the registered tractogram of each structural source.
TRACTOGRAM_FILES = {"dtor985": "dTOR985.tck", "hcp1065": "HCP1065.tck"}
#: Disk space needed per listed byte still to fetch (download + unpacked + converted;
#: GSP1000 tarballs are deleted once unpacked).
SPACE_FACTOR = {"gsp1000": 2.0, "dtor985": 2.0, "hcp1065": 3.0}
#: Spaces the published data are registered as. dTOR985 is published in
#: MNI152NLin2009bAsym, which Lacuna treats as aligned to MNI152NLin2009cAsym (two
#: releases of the ICBM 2009 nonlinear asymmetric template); 2009aAsym maps to 2009cAsym
#: through :data:`lacuna.core.spaces.EQUIVALENT_SPACES`.
REGISTRY_SPACE = {"MNI152NLin2009bAsym": "MNI152NLin2009cAsym"}
_REGISTER_NAME = re.compile(r"^[A-Za-z0-9]+$")


# --------------------------------------------------------------------------------------
# Catalogue and status
# --------------------------------------------------------------------------------------


def list_fetchable_connectomes() -> list[ConnectomeSource]:
    """List all connectomes available for fetching.

    Returns
    -------
    list of ConnectomeSource
        Available connectome sources with metadata (server overrides of the
        environment applied).

    Examples
    --------
    >>> from lacuna.io import list_fetchable_connectomes
    >>> for source in list_fetchable_connectomes():
    ...     print(f"{source.name}: {source.display_name}")
    """
    return list(connectome_sources().values())


def get_fetch_status(name: str) -> dict:
    """Get the current status of a connectome (downloaded, processed, registered).

    Looks in the folder of its registration (under the default name, e.g. GSP1000) and
    in the default folder ``<data dir>/connectomes/<name>``.

    Parameters
    ----------
    name : str
        Connectome name ('gsp1000', 'dtor985', 'hcp1065'; case-insensitive).

    Returns
    -------
    dict
        ``downloaded``, ``processed``, ``registered`` (bool), ``location`` (Path of the
        output folder, or None) and ``size_bytes`` (int, or None without a folder).

    Raises
    ------
    ValueError
        If the name is not a fetchable connectome.
    """
    source = get_source(name)
    folders = _candidate_folders(source)
    folder = next((f for f in folders if (f / MARKER_DIR).is_dir()), None)
    folder = folder or next((f for f in folders if f.is_dir()), None)
    markers = StepMarkers(folder) if folder else None
    recorded = (markers.read("registered") or {}) if markers else {}
    entry = _registered(recorded.get("name") or _default_register_name(source))
    processed = bool(markers and markers.read("converted") and _products(source, folder))
    return {
        "downloaded": bool(markers and (markers.read("downloaded") or processed)),
        "processed": processed,
        "registered": entry is not None and entry.path.exists(),
        "location": folder,
        "size_bytes": _folder_size(folder) if folder else None,
    }


def _candidate_folders(source: ConnectomeSource) -> list[Path]:
    folders = []
    entry = _registered(_default_register_name(source))
    if entry is not None:
        folders.append(entry.path.parent)
    folders.append(default_output_dir(source.name))
    return folders


def _products(source: ConnectomeSource, folder: Path) -> list[Path]:
    if source.type == "functional":
        return sorted((folder / BATCHES).glob("*.h5"))
    tractogram = folder / TRACTOGRAM_FILES[source.name]
    return [tractogram] if tractogram.is_file() else []


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _registered(name: str) -> registry.RegisteredConnectome | None:
    try:
        return {c.name: c for c in registry.list_connectomes()}.get(name)
    except registry.ConnectomeError:
        return None


def _default_register_name(source: ConnectomeSource) -> str:
    return DEFAULT_REGISTER_NAMES[source.name]


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def fetch_connectome(name: str, output_dir: str | Path, **kwargs) -> FetchResult:
    """Generic fetch function that dispatches to specific connectome fetchers.

    Parameters
    ----------
    name : str
        Connectome name ('gsp1000', 'dtor985', 'hcp1065'; case-insensitive).
    output_dir : str or Path
        Directory for output files.
    **kwargs
        Additional arguments passed to the specific fetch function.

    Returns
    -------
    FetchResult
        Result from the specific fetch operation.

    Raises
    ------
    ValueError
        If the connectome name is not recognized.

    Examples
    --------
    >>> from lacuna.io import fetch_connectome
    >>> result = fetch_connectome("gsp1000", "/data", api_key="key", batches=50)
    """
    fetchers = {"gsp1000": fetch_gsp1000, "dtor985": fetch_dtor985, "hcp1065": fetch_hcp1065}
    key = str(name).lower()
    if key not in fetchers:
        raise ValueError(f"unknown connectome {name!r}; fetchable connectomes: {', '.join(fetchers)}")
    return fetchers[key](output_dir, **kwargs)


# --------------------------------------------------------------------------------------
# One fetch run: folders, markers, progress, timing
# --------------------------------------------------------------------------------------


class _Run:
    """State of one fetch: output folder, markers, progress reports, timers, warnings."""

    def __init__(self, source, output_dir, callback, verbose, force):
        self.source = source
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.markers = StepMarkers(self.output_dir)
        self.callback = callback
        self.verbose = verbose
        self.force = force
        self.started = time.monotonic()
        self.download_time = 0.0
        self.processing_time = 0.0
        self.warnings: list[str] = []
        self._last_message = None

    @property
    def downloads(self) -> Path:
        return self.output_dir / DOWNLOADS

    def reset(self) -> None:
        """``force``: forget every step and delete the downloads (partial ones too)."""
        log.info("force: starting %s over in %s", self.source.name, self.output_dir)
        self.markers.clear()
        shutil.rmtree(self.downloads, ignore_errors=True)

    def report(self, phase: str, message: str, *, current_file: str = "", done: int = 0, total: int = 0,
               bytes_done: int = 0, bytes_total: int | None = 0) -> None:
        """Log a new message (print it when verbose) and call the progress callback."""
        if message != self._last_message:
            self._last_message = message
            log.info("%s", message)
            if self.verbose:
                print(message, flush=True)
        if self.callback is not None:
            self.callback(FetchProgress(phase, current_file, done, total, bytes_done, bytes_total or 0, message))

    @contextmanager
    def timed(self, attribute: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            setattr(self, attribute, getattr(self, attribute) + time.monotonic() - start)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def result(self, output_dir: Path, output_files: list[Path], registered_as: str | None) -> FetchResult:
        return FetchResult(
            success=True,
            connectome_name=self.source.name,
            output_dir=output_dir,
            output_files=list(output_files),
            registered=registered_as is not None,
            register_name=registered_as,
            duration_seconds=time.monotonic() - self.started,
            download_time_seconds=self.download_time,
            processing_time_seconds=self.processing_time,
            warnings=list(self.warnings),
        )


@contextmanager
def _exclusive(output_dir: Path) -> Iterator[None]:
    """Hold a lock on ``output_dir`` so two fetches never write the same folder."""
    folder = output_dir / MARKER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another fetch is writing to {output_dir}; wait for it to finish, or fetch "
                "into another folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_register_name(register: bool, name: str) -> None:
    if register and (not isinstance(name, str) or not _REGISTER_NAME.match(name)):
        raise ValueError(
            f"invalid register_name {name!r}: use letters and digits only (e.g. GSP1000), "
            "because the name becomes part of BIDS file names"
        )


def _download_step(run: _Run, fetch, remote: RemoteFile, *, verify: bool, index: int, total: int) -> Path:
    """Download ``remote`` into ``downloads/`` unless a marker says it is already there
    (and verified, when ``verify``); then write that marker."""
    dest = run.downloads / remote.name
    step = f"download_{remote.name}"
    info = run.markers.read(step)
    if info and dest.is_file() and _same_file(info, remote, dest, verify):
        if not verify or not remote.md5 or info.get("verified") or _local_md5_matches(run, dest, remote):
            run.report("download", f"{remote.name} already downloaded", current_file=remote.name,
                       done=index + 1, total=total)
            return dest
    run.report("download", f"downloading {remote.name} ({format_bytes(remote.size)})",
               current_file=remote.name, done=index, total=total, bytes_total=remote.size)

    def progress(done: int, size: int | None) -> None:
        run.report("download", f"downloading {remote.name} ({format_bytes(remote.size)})", current_file=remote.name,
                   done=index, total=total, bytes_done=done, bytes_total=size or remote.size)

    with run.timed("download_time"):
        try:
            fetch(remote, dest, verify=verify, progress=progress)
        except OSError as exc:
            raise DownloadError(f"writing {dest} failed ({exc}); check the disk and try again") from None
    run.markers.mark(step, file=remote.name, size=remote.size, md5=remote.md5, verified=bool(verify and remote.md5))
    return dest


def _same_file(info: dict, remote: RemoteFile, dest: Path, verify: bool) -> bool:
    """Whether a download marker describes the listed ``remote`` and ``dest`` fits it
    (its size is only compared with the listed one when verifying)."""
    if remote.md5 and info.get("md5") != remote.md5:
        return False
    if remote.size is not None and info.get("size") != remote.size:
        return False
    return not (verify and remote.size is not None and dest.stat().st_size != remote.size)


def _local_md5_matches(run: _Run, dest: Path, remote: RemoteFile) -> bool:
    """Verify a file downloaded earlier without verification (``skip_checksum``)."""
    run.report("download", f"verifying {remote.name}", current_file=remote.name)
    return md5_file(dest).lower() == str(remote.md5).lower()


def _register(run: _Run, name: str, path: Path, register_fn: Callable[[], object]) -> str | None:
    """Register ``path`` as ``name``; keep another registration of that name unless
    ``force`` (with a warning). Returns the name registered, or None."""
    run.report("registration", f"registering {name}", done=0, total=1)
    existing = _registered(name)
    if existing is not None and existing.path.resolve() != path.resolve() and not run.force:
        run.warn(
            f"a connectome named {name} is already registered at {existing.path}; it was kept. "
            "Pass force=True (--force) to replace it, or register this one under another name "
            "(register_name, --register-name)."
        )
        return None
    try:
        register_fn()
    except (LacunaError, ValueError, FileNotFoundError) as exc:
        raise ProcessingError(f"registering {name} ({path}) failed: {exc}") from exc
    run.markers.mark("registered", name=name, path=str(path))
    run.report("registration", f"registered {name}", done=1, total=1)
    return name


def _space_factor(source: ConnectomeSource) -> float:
    return SPACE_FACTOR.get(source.name, 2.0)


# --------------------------------------------------------------------------------------
# GSP1000
# --------------------------------------------------------------------------------------


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
        too small (:class:`~lacuna.io.downloaders.base.InsufficientDiskSpaceError`).
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
    _check_register_name(register, register_name)
    source = get_source("gsp1000")
    run = _Run(source, output_dir, progress_callback, verbose, force)
    batches_dir = run.output_dir / BATCHES
    with _exclusive(run.output_dir):
        if force:
            run.reset()
        params = {"batches": int(batches), "test_mode": bool(test_mode)}
        if run.markers.done("converted", **params) and _products(source, run.output_dir):
            run.report("processing", f"GSP1000 is already converted in {batches_dir}")
        else:
            mask, functional = _gsp_download(run, api_key, test_mode, skip_checksum)
            _gsp_convert(run, mask, functional, params)
        outputs = _products(source, run.output_dir)
        registered_as = None
        if register:
            registered_as = _register(
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


def _gsp_client(run: _Run, api_key: str | None) -> DataverseClient:
    key = resolve_api_key("dataverse", api_key)
    if key is None:
        raise AuthenticationError(f"GSP1000 needs a Harvard Dataverse API token and none was given. {DATAVERSE_HELP}")
    return DataverseClient(run.source.dataverse_server, key)


def _gsp_download(run: _Run, api_key: str | None, test_mode: bool, skip_checksum: bool) -> tuple[Path, list[str]]:
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
    needed = _space_factor(source) * sum(f.size or 0 for f in pending)
    check_disk_space(run.output_dir, needed, f"GSP1000 ({len(pending)} files to fetch, unpack and convert)")
    total = len(metadata) + len(tarballs)
    for index, remote in enumerate(metadata):
        _download_step(run, client.download, remote, verify=not skip_checksum, index=index, total=total)
    functional: list[str] = []
    for index, tarball in enumerate(tarballs, start=len(metadata)):
        if not _unpacked(run, tarball):
            path = _download_step(run, client.download, tarball, verify=not skip_checksum, index=index, total=total)
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


def _unpacked(run: _Run, tarball: RemoteFile) -> bool:
    info = run.markers.read(f"extract_{tarball.name}")
    return bool(info) and (not tarball.md5 or info.get("md5") == tarball.md5)


def _unpack_gsp(run: _Run, tarball: RemoteFile, path: Path, index: int, total: int) -> None:
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


def _gsp_convert(run: _Run, mask: Path, functional: list[str], params: dict) -> None:
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


# --------------------------------------------------------------------------------------
# dTOR985
# --------------------------------------------------------------------------------------


def fetch_dtor985(
    output_dir: str | Path,
    *,
    api_key: str | None = None,
    keep_original: bool = True,
    register: bool = True,
    register_name: str = "dTOR985",
    force: bool = False,
    progress_callback: ProgressCallback | None = None,
    verbose: bool = False,
) -> FetchResult:
    """Download, convert, and register the dTOR985 structural tractogram.

    Downloads the 985-subject normative tractogram from Figshare (article 25209947) in
    TrackVis (.trk) format, verifies its MD5, converts it to MRtrix3 (.tck) format
    (``output_dir/dTOR985.tck``), and registers it for StructuralNetworkMapping. The
    source is in MNI152NLin2009bAsym; it is registered as MNI152NLin2009cAsym (the two
    releases of the ICBM 2009 nonlinear asymmetric template are treated as aligned).

    Parameters
    ----------
    output_dir : str or Path
        Directory for the output .tck file.
    api_key : str, optional
        Figshare personal token. If not provided, ``FIGSHARE_API_KEY``, then the
        credentials file of the data cache are used. Get one from
        https://figshare.com/account/applications.
    keep_original : bool
        Keep the original .trk file after conversion.
    register : bool
        Automatically register the tractogram after processing.
    register_name : str
        Name for tractogram registration.
    force : bool
        Overwrite existing files and registrations.
    progress_callback : callable, optional
        Function called with :class:`FetchProgress` updates during operation.
    verbose : bool
        Print informational messages.

    Returns
    -------
    FetchResult
        Result containing output path, registration status, and timing.

    Raises
    ------
    DownloadError
        If the download fails or the API key is missing
        (:class:`~lacuna.core.errors.AuthenticationError`, a DownloadError).
    ProcessingError
        If the .trk to .tck conversion fails.

    Examples
    --------
    >>> from lacuna.io import fetch_dtor985
    >>> result = fetch_dtor985("/data/connectomes/dtor985", api_key="YOUR_TOKEN")
    >>> print(result.output_files[0])  # Path to .tck file
    """
    _check_register_name(register, register_name)
    source = get_source("dtor985")
    run = _Run(source, output_dir, progress_callback, verbose, force)
    tractogram = run.output_dir / TRACTOGRAM_FILES["dtor985"]
    with _exclusive(run.output_dir):
        if force:
            run.reset()
        if run.markers.done("converted") and tractogram.is_file():
            run.report("processing", f"dTOR985 is already converted: {tractogram}")
        else:
            trk = _dtor_download(run, api_key)
            _convert_tractogram(run, lambda: trk_to_tck(trk, tractogram, overwrite=True), trk.name, tractogram)
            run.markers.mark("converted", source=trk.name, output=tractogram.name)
        if not keep_original:
            _discard(run, [p for p in run.downloads.glob("*.trk*") if not p.name.endswith(".part")])
        registered_as = _register_structural(run, register, register_name, tractogram)
    return run.result(run.output_dir, [tractogram], registered_as)


def _dtor_download(run: _Run, api_key: str | None) -> Path:
    source = run.source
    key = resolve_api_key("figshare", api_key)
    if key is None:
        raise AuthenticationError(f"dTOR985 is downloaded through the Figshare API, which needs a token; none was given. {FIGSHARE_HELP}")
    client = FigshareClient(api_key=key)
    run.report("download", f"listing the files of Figshare article {source.article_id}")
    with run.timed("download_time"):
        files = client.list_files(source.article_id)
    remote = _pick_tractogram(files, run)
    dest = run.downloads / remote.name
    if not (dest.is_file() and run.markers.read(f"download_{remote.name}")):
        check_disk_space(run.output_dir, _space_factor(source) * (remote.size or source.estimated_size_gb * 1e9),
                         "dTOR985 (download and conversion)")
    trk = _download_step(run, client.download, remote, verify=True, index=0, total=1)
    run.markers.mark("downloaded", files=[remote.name])
    return trk


def _pick_tractogram(files: list[RemoteFile], run: _Run) -> RemoteFile:
    tractograms = [f for f in files if f.name.lower().endswith((".trk", ".trk.gz"))]
    if not tractograms:
        names = ", ".join(f.name for f in files) or "none"
        raise DownloadError(f"Figshare article {run.source.article_id} lists no .trk file (files: {names}); has it changed?")
    chosen = max(tractograms, key=lambda f: f.size or 0)
    if len(tractograms) > 1:
        run.warn(f"the article lists {len(tractograms)} .trk files; using the largest, {chosen.name}")
    return chosen


def _convert_tractogram(run: _Run, convert: Callable[[], Path], what: str, tractogram: Path) -> None:
    run.report("processing", f"converting {what} to {tractogram.name}", done=0, total=1)
    with run.timed("processing_time"):
        try:
            convert()
        except (LacunaError, ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
            raise ProcessingError(f"converting {what} to {tractogram} failed: {exc}") from exc
    run.report("processing", f"wrote {tractogram}", done=1, total=1)


def _register_structural(run: _Run, register: bool, name: str, tractogram: Path) -> str | None:
    if not register:
        return None
    source = run.source
    space = canonical_space(REGISTRY_SPACE.get(source.space, source.space))
    return _register(
        run,
        name,
        tractogram,
        lambda: registry.register_structural_connectome(
            name,
            tractogram,
            space,
            n_subjects=source.n_subjects,
            description=source.description,
            citation=source.citation,
            overwrite=True,
        ),
    )


def _discard(run: _Run, paths: list[Path]) -> None:
    """``keep_original=False``: delete original downloads / unpacked files."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        log.info("deleted %s (keep_original=False)", path)


# --------------------------------------------------------------------------------------
# HCP1065
# --------------------------------------------------------------------------------------


def fetch_hcp1065(
    output_dir: str | Path,
    *,
    keep_original: bool = True,
    register: bool = True,
    register_name: str = "HCP1065",
    force: bool = False,
    progress_callback: ProgressCallback | None = None,
    verbose: bool = False,
) -> FetchResult:
    """Download, merge, and register the HCP1065 structural tractogram.

    Downloads the Human Connectome Project 1065-subject population-averaged tract atlas
    (a zip of TrackVis .trk files, GitHub release of ``frankyeh/data-atlas``, or
    ``$LACUNA_HCP1065_URL``), unpacks it safely into ``output_dir/tracts``, merges all
    tracts except the cranial nerves into ``output_dir/HCP1065.tck`` and registers it
    (MNI152NLin2009aAsym, used as MNI152NLin2009cAsym).

    Parameters
    ----------
    output_dir : str or Path
        Directory for the output .tck file.
    keep_original : bool
        Keep the original .zip file and the extracted tracts after merging.
    register : bool
        Automatically register the tractogram after processing.
    register_name : str
        Name for tractogram registration.
    force : bool
        Overwrite existing files and registrations.
    progress_callback : callable, optional
        Function called with :class:`FetchProgress` updates during operation.
    verbose : bool
        Print informational messages.

    Returns
    -------
    FetchResult
        Result containing output path, registration status, and timing.

    Raises
    ------
    DownloadError
        If the download fails.
    ProcessingError
        If extraction (e.g. an unsafe archive member) or merging fails.

    Examples
    --------
    >>> from lacuna.io import fetch_hcp1065
    >>> result = fetch_hcp1065("/data/connectomes/hcp1065")
    >>> print(result.output_files[0])  # Path to .tck file
    """
    _check_register_name(register, register_name)
    source = get_source("hcp1065")
    run = _Run(source, output_dir, progress_callback, verbose, force)
    tractogram = run.output_dir / TRACTOGRAM_FILES["hcp1065"]
    tracts = run.output_dir / TRACTS
    with _exclusive(run.output_dir):
        if force:
            run.reset()
            shutil.rmtree(tracts, ignore_errors=True)
        if run.markers.done("converted") and tractogram.is_file():
            run.report("processing", f"HCP1065 is already merged: {tractogram}")
        else:
            _hcp_download(run, tracts)
            _convert_tractogram(run, lambda: merge_trk_to_tck(tracts, tractogram, overwrite=True), "the HCP1065 tracts",
                                tractogram)
            run.markers.mark("converted", output=tractogram.name)
        if not keep_original:
            _discard(run, [run.downloads, tracts])
        registered_as = _register_structural(run, register, register_name, tractogram)
    return run.result(run.output_dir, [tractogram], registered_as)


def _hcp_download(run: _Run, tracts: Path) -> None:
    url = hcp1065_url(run.source.download_url)
    remote = release_asset(url, "hcp1065_tracts.zip")
    step = f"extract_{remote.name}"
    if run.markers.done(step, url=redact_url(url)) and tracts.is_dir():
        return
    if not (run.downloads / remote.name).is_file():
        size = remote.size or run.source.estimated_size_gb * 1e9
        check_disk_space(run.output_dir, _space_factor(run.source) * size, "HCP1065 (download, unpacking and merging)")

    def fetch(remote, dest, *, verify, progress):
        try:
            return download_release_asset(remote, dest, progress=progress)
        except DownloadError as exc:
            raise type(exc)(f"{exc} (set LACUNA_HCP1065_URL to use a mirror)") from None

    archive = _download_step(run, fetch, remote, verify=True, index=0, total=1)
    run.markers.mark("downloaded", files=[remote.name], url=redact_url(url))
    run.report("processing", f"unpacking {remote.name}", current_file=remote.name, done=0, total=1)
    shutil.rmtree(tracts, ignore_errors=True)
    with run.timed("processing_time"):
        written = extract_zip(archive, tracts)
    run.markers.mark(step, url=redact_url(url), files=len(written))


def fetch_from_config(config: FetchConfig, **extra) -> FetchResult:
    """Run the fetch a :class:`FetchConfig` describes (what ``lacuna fetch`` calls).

    Only the settings that apply to the source are passed on (``api_key`` to GSP1000
    and dTOR985, ``batches`` to GSP1000, ``keep_original`` to the tractograms);
    ``resume=False`` deletes partial downloads first.

    Parameters
    ----------
    config : FetchConfig
    **extra
        Further arguments of the fetch function (``test_mode``, ``skip_checksum``,
        ``progress_callback``, ``verbose``).

    Returns
    -------
    FetchResult
    """
    source = get_source(config.connectome)
    kwargs: dict = {"register": config.register, "force": config.force}
    if config.register_name:
        kwargs["register_name"] = config.register_name
    if source.source_type in ("dataverse", "figshare"):
        kwargs["api_key"] = config.api_key
    if source.type == "functional":
        kwargs["batches"] = config.batches
    else:
        kwargs["keep_original"] = config.keep_original
    if not config.resume:
        for part in (Path(config.output_dir) / DOWNLOADS).glob("*.part"):
            log.info("resume=False: deleting the partial download %s", part)
            part.unlink()
    return fetch_connectome(source.name, config.output_dir, **kwargs, **extra)
