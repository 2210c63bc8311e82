"""The structural connectomes: dTOR985 from Figshare (:func:`fetch_dtor985`) and the
HCP1065 tract atlas from a GitHub release (:func:`fetch_hcp1065`), converted to one
``.tck`` each and registered; re-runs resume as in :mod:`.gsp1000`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lacuna.core.errors import AuthenticationError, DownloadError, LacunaError, ProcessingError
from lacuna.core.spaces import canonical_space
from lacuna.formats.tractograms import merge_trk_to_tck, trk_to_tck
from lacuna.net.archives import extract_zip
from lacuna.net.credentials import resolve_api_key
from lacuna.net.disk import check_disk_space
from lacuna.net.http import redact_url
from lacuna.resources import connectomes as registry
from lacuna.resources.fetching.figshare import AUTH_HELP as FIGSHARE_HELP
from lacuna.resources.fetching.figshare import FigshareClient
from lacuna.resources.fetching.github import download_release_asset, hcp1065_url, release_asset
from lacuna.resources.fetching.records import FetchResult
from lacuna.resources.fetching.remote import RemoteFile
from lacuna.resources.fetching.run import (
    REGISTRY_SPACE,
    TRACTOGRAM_FILES,
    TRACTS,
    FetchRun,
    ProgressCallback,
    check_register_name,
    discard,
    download_step,
    exclusive,
    register_step,
    space_factor,
)
from lacuna.resources.fetching.sources import get_source


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
    check_register_name(register, register_name)
    source = get_source("dtor985")
    run = FetchRun(source, output_dir, progress_callback, verbose, force)
    tractogram = run.output_dir / TRACTOGRAM_FILES["dtor985"]
    with exclusive(run.output_dir):
        if force:
            run.reset()
        if run.markers.done("converted") and tractogram.is_file():
            run.report("processing", f"dTOR985 is already converted: {tractogram}")
        else:
            trk = _dtor_download(run, api_key)
            _convert_tractogram(run, lambda: trk_to_tck(trk, tractogram, overwrite=True), trk.name, tractogram)
            run.markers.mark("converted", source=trk.name, output=tractogram.name)
        if not keep_original:
            discard(run, [p for p in run.downloads.glob("*.trk*") if not p.name.endswith(".part")])
        registered_as = _register_structural(run, register, register_name, tractogram)
    return run.result(run.output_dir, [tractogram], registered_as)


def _dtor_download(run: FetchRun, api_key: str | None) -> Path:
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
        check_disk_space(run.output_dir, space_factor(source) * (remote.size or source.estimated_size_gb * 1e9),
                         "dTOR985 (download and conversion)")
    trk = download_step(run, client.download, remote, verify=True, index=0, total=1)
    run.markers.mark("downloaded", files=[remote.name])
    return trk


def _pick_tractogram(files: list[RemoteFile], run: FetchRun) -> RemoteFile:
    tractograms = [f for f in files if f.name.lower().endswith((".trk", ".trk.gz"))]
    if not tractograms:
        names = ", ".join(f.name for f in files) or "none"
        raise DownloadError(f"Figshare article {run.source.article_id} lists no .trk file (files: {names}); has it changed?")
    chosen = max(tractograms, key=lambda f: f.size or 0)
    if len(tractograms) > 1:
        run.warn(f"the article lists {len(tractograms)} .trk files; using the largest, {chosen.name}")
    return chosen


def _convert_tractogram(run: FetchRun, convert: Callable[[], Path], what: str, tractogram: Path) -> None:
    run.report("processing", f"converting {what} to {tractogram.name}", done=0, total=1)
    with run.timed("processing_time"):
        try:
            convert()
        except (LacunaError, ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
            raise ProcessingError(f"converting {what} to {tractogram} failed: {exc}") from exc
    run.report("processing", f"wrote {tractogram}", done=1, total=1)


def _register_structural(run: FetchRun, register: bool, name: str, tractogram: Path) -> str | None:
    if not register:
        return None
    source = run.source
    space = canonical_space(REGISTRY_SPACE.get(source.space, source.space))
    return register_step(
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
    check_register_name(register, register_name)
    source = get_source("hcp1065")
    run = FetchRun(source, output_dir, progress_callback, verbose, force)
    tractogram = run.output_dir / TRACTOGRAM_FILES["hcp1065"]
    tracts = run.output_dir / TRACTS
    with exclusive(run.output_dir):
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
            discard(run, [run.downloads, tracts])
        registered_as = _register_structural(run, register, register_name, tractogram)
    return run.result(run.output_dir, [tractogram], registered_as)


def _hcp_download(run: FetchRun, tracts: Path) -> None:
    url = hcp1065_url(run.source.download_url)
    remote = release_asset(url, "hcp1065_tracts.zip")
    step = f"extract_{remote.name}"
    if run.markers.done(step, url=redact_url(url)) and tracts.is_dir():
        return
    if not (run.downloads / remote.name).is_file():
        size = remote.size or run.source.estimated_size_gb * 1e9
        check_disk_space(run.output_dir, space_factor(run.source) * size, "HCP1065 (download, unpacking and merging)")

    def fetch(remote, dest, *, verify, progress):
        try:
            return download_release_asset(remote, dest, progress=progress)
        except DownloadError as exc:
            raise type(exc)(f"{exc} (set LACUNA_HCP1065_URL to use a mirror)") from exc

    archive = download_step(run, fetch, remote, verify=True, index=0, total=1)
    run.markers.mark("downloaded", files=[remote.name], url=redact_url(url))
    run.report("processing", f"unpacking {remote.name}", current_file=remote.name, done=0, total=1)
    shutil.rmtree(tracts, ignore_errors=True)
    with run.timed("processing_time"):
        written = extract_zip(archive, tracts)
    run.markers.mark(step, url=redact_url(url), files=len(written))
