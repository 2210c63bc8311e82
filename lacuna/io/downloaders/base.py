"""Shared pieces of the connectome downloaders.

* The four public dataclasses of the fetch API: :class:`ConnectomeSource` (what can be
  fetched and from where), :class:`FetchConfig` (what the user asked for),
  :class:`FetchProgress` (what a ``progress_callback`` receives) and
  :class:`FetchResult` (what a fetch returns).
* The catalogue of fetchable connectomes (:func:`connectome_sources`), with the server
  overrides of the environment (``LACUNA_DATAVERSE_URL``, ``LACUNA_HCP1065_URL``)
  applied when it is read.
* Small helpers the source clients share: :class:`RemoteFile`, :func:`request_json`
  (a JSON API call with retries), :func:`safe_filename`, :class:`StepMarkers` (the
  marker files that make a re-run skip completed steps) and the free-disk-space check.

API keys never enter a message, a log record, a marker file or a ``repr``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests

from lacuna.core.atomic import write_json
from lacuna.core.errors import AuthenticationError, DownloadError
from lacuna.core.provenance import utc_now
from lacuna.io.download import download_file, redact_url

log = logging.getLogger(__name__)

#: Seconds before the first retry of a failed request (doubled for each later one).
#: Read at call time, so tests can shorten it.
RETRY_BACKOFF_SECONDS = 1.0
#: Further attempts after the first on transient failures (connection errors, 5xx, 429).
RETRIES = 4
#: Seconds to wait for a connection and for each read.
TIMEOUT_SECONDS = 60.0

ConnectomeType = Literal["functional", "structural"]
SourceType = Literal["dataverse", "figshare", "github"]
Phase = Literal["download", "processing", "registration"]


# --------------------------------------------------------------------------------------
# The public dataclasses
# --------------------------------------------------------------------------------------


@dataclass
class ConnectomeSource:
    """Configuration for a fetchable connectome source.

    Attributes
    ----------
    name : str
        Unique identifier (e.g. ``'gsp1000'``, ``'dtor985'``).
    display_name : str
        Human-readable name (e.g. ``'GSP1000 Functional Connectome'``).
    description : str
        User-facing description of the connectome.
    type : {"functional", "structural"}
        Connectome type; picks the processing pipeline.
    source_type : {"dataverse", "figshare", "github"}
        Download source, which decides the authentication and handling.
    space : str
        Coordinate space of the published data.
    n_subjects : int
        Number of subjects in the connectome.
    estimated_size_gb : float
        Estimated download size in GB, for user information.
    citation : str
        Citation text for this connectome dataset.
    default_batches : int
        Default number of HDF5 batch files (functional only).
    requires_mask : bool
        Whether a brain mask is needed for processing.
    mask_url : str, optional
        URL to download a brain mask from, if required.
    persistent_id : str, optional
        DOI of a Dataverse dataset (e.g. ``'doi:10.7910/DVN/ILXIKS'``).
    dataverse_server : str
        Dataverse server URL.
    article_id : int, optional
        Figshare article ID for API-based downloads.
    download_url : str, optional
        Direct download URL (deprecated for Figshare, use ``article_id``; the HCP1065
        release asset).
    """

    name: str
    display_name: str
    description: str
    type: ConnectomeType
    source_type: SourceType
    space: str = "MNI152NLin6Asym"
    n_subjects: int = 0
    estimated_size_gb: float = 0.0
    citation: str = ""
    default_batches: int = 10
    requires_mask: bool = False
    mask_url: str | None = None
    persistent_id: str | None = None
    dataverse_server: str = "https://dataverse.harvard.edu"
    article_id: int | None = None
    download_url: str | None = None


@dataclass
class FetchConfig:
    """Configuration for a connectome fetch operation.

    Attributes
    ----------
    connectome : str
        Connectome name to fetch (e.g. ``'gsp1000'``, ``'dtor985'``).
    output_dir : Path
        Directory for processed output files.
    api_key : str, optional
        API key (Dataverse for GSP1000, Figshare for dTOR985). Else the
        ``DATAVERSE_API_KEY`` / ``FIGSHARE_API_KEY`` variable or the credentials file
        are used (:meth:`get_api_key`). Never shown in the ``repr``.
    batches : int
        Number of HDF5 batch files for functional connectomes.
    force : bool
        Overwrite existing files and registrations.
    keep_original : bool
        Keep original downloaded files after processing.
    register : bool
        Automatically register the connectome after processing.
    register_name : str, optional
        Custom name for registration; defaults to the source's name (e.g. 'GSP1000').
    resume : bool
        Resume interrupted downloads (``False`` discards partial files first).
    """

    connectome: str
    output_dir: Path
    api_key: str | None = field(default=None, repr=False)
    batches: int = 10
    force: bool = False
    keep_original: bool = True
    register: bool = True
    register_name: str | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        self.connectome = str(self.connectome).lower()
        self.output_dir = Path(self.output_dir).expanduser()
        if int(self.batches) < 1:
            raise ValueError(f"batches must be at least 1, got {self.batches}")
        self.batches = int(self.batches)

    @classmethod
    def from_cli_args(cls, args: Any) -> FetchConfig:
        """Create a config from CLI arguments.

        Parameters
        ----------
        args : argparse.Namespace or mapping
            Attributes (or keys) ``connectome`` (or ``name``), ``output_dir``,
            ``api_key``, ``batches``, ``force``, ``no_keep_original`` (or
            ``keep_original``), ``no_register`` (or ``register``), ``register_name``,
            ``resume``; missing ones take their defaults. Without ``output_dir`` the
            folder is ``<data dir>/connectomes/<name>``.

        Returns
        -------
        FetchConfig
        """
        get = args.get if isinstance(args, Mapping) else (lambda key, default=None: getattr(args, key, default))
        name = str(get("connectome") or get("name") or "").lower()
        if not name:
            raise ValueError("no connectome given; choose one of " + ", ".join(SOURCE_NAMES))
        output_dir = get("output_dir") or default_output_dir(name)
        keep_original = get("keep_original", True) and not get("no_keep_original", False)
        register = get("register", True) and not get("no_register", False)
        batches = get("batches")
        return cls(
            connectome=name,
            output_dir=Path(output_dir),
            api_key=get("api_key"),
            batches=10 if batches is None else batches,
            force=bool(get("force", False)),
            keep_original=bool(keep_original),
            register=bool(register),
            register_name=get("register_name"),
            resume=bool(get("resume", True)),
        )

    def get_api_key(self) -> str | None:
        """The API key: from this config, else the environment variable, else the
        credentials file (``<data dir>/credentials.json``).

        Returns
        -------
        str or None
            None when the source needs no key or none is configured.
        """
        from lacuna.io.downloaders.credentials import SERVICE_OF_SOURCE, resolve_api_key

        service = SERVICE_OF_SOURCE.get(self.connectome)
        if service is None:
            return None
        return resolve_api_key(service, self.api_key)


@dataclass
class FetchProgress:
    """Progress information for fetch operations.

    Attributes
    ----------
    phase : {"download", "processing", "registration"}
        Current operation phase.
    current_file : str
        Name of the file currently being processed.
    files_completed : int
        Number of files completed (in this phase).
    files_total : int
        Total number of files to process (in this phase).
    bytes_transferred : int
        Bytes transferred in the current download.
    bytes_total : int
        Total bytes of the current download (0 when unknown).
    message : str
        Human-readable status message.
    """

    phase: str
    current_file: str
    files_completed: int
    files_total: int
    bytes_transferred: int = 0
    bytes_total: int = 0
    message: str = ""

    @property
    def download_percent(self) -> float:
        """Current file download percentage (0 when the size is unknown)."""
        if self.bytes_total <= 0:
            return 0.0
        return min(100.0, 100.0 * self.bytes_transferred / self.bytes_total)

    @property
    def percent_complete(self) -> float:
        """Overall percentage of the phase: completed files plus the current file's
        downloaded fraction."""
        if self.files_total <= 0:
            return 0.0
        fraction = self.download_percent / 100 if self.files_completed < self.files_total else 0.0
        return min(100.0, 100.0 * (self.files_completed + fraction) / self.files_total)


@dataclass
class FetchResult:
    """Result of a connectome fetch operation.

    Attributes
    ----------
    success : bool
        Whether the operation completed successfully.
    connectome_name : str
        Name of the fetched connectome.
    output_dir : Path
        Directory containing the processed files.
    output_files : list of Path
        Created output files.
    registered : bool
        Whether the connectome was registered.
    register_name : str, optional
        Name used for registration, or None if not registered.
    duration_seconds, download_time_seconds, processing_time_seconds : float
        Total time, time spent downloading, time spent processing.
    error : str, optional
        Error message if ``success`` is False.
    warnings : list of str
        Non-fatal warnings encountered.
    """

    success: bool
    connectome_name: str
    output_dir: Path
    output_files: list[Path] = field(default_factory=list)
    registered: bool = False
    register_name: str | None = None
    duration_seconds: float = 0.0
    download_time_seconds: float = 0.0
    processing_time_seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable summary (what ``lacuna fetch`` prints at the end)."""
        if not self.success:
            lines = [f"Fetching {self.connectome_name} failed: {self.error or 'unknown error'}"]
        else:
            lines = [
                f"Fetched {self.connectome_name} into {self.output_dir}",
                f"  time: {self.duration_seconds:.1f} s ({self.download_time_seconds:.1f} s downloading, "
                f"{self.processing_time_seconds:.1f} s processing)",
                f"  output files: {len(self.output_files)}"
                + (f" ({self.output_files[0].name}{', ...' if len(self.output_files) > 1 else ''})" if self.output_files else ""),
            ]
            if self.registered and self.register_name:
                lines.append(f"  registered as: {self.register_name} (see `lacuna connectomes list`)")
            else:
                lines.append("  registered as: not registered")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------

DATAVERSE_URL_ENV = "LACUNA_DATAVERSE_URL"
FIGSHARE_API_URL_ENV = "LACUNA_FIGSHARE_API_URL"
HCP1065_URL_ENV = "LACUNA_HCP1065_URL"

DEFAULT_DATAVERSE_SERVER = "https://dataverse.harvard.edu"
DEFAULT_FIGSHARE_API_URL = "https://api.figshare.com/v2"
#: Public release asset of the HCP1065 tract atlas (best knowledge, not verified from
#: here; the repository may also be reachable as ``data-others/atlas``, GitHub
#: redirects renamed repositories). Override with ``LACUNA_HCP1065_URL``.
DEFAULT_HCP1065_URL = "https://github.com/frankyeh/data-atlas/releases/download/hcp1065/hcp1065_avg_tracts_trk.zip"

#: Name each source is registered under by default.
DEFAULT_REGISTER_NAMES = {"gsp1000": "GSP1000", "dtor985": "dTOR985", "hcp1065": "HCP1065"}
SOURCE_NAMES = tuple(DEFAULT_REGISTER_NAMES)


def _env_url(variable: str, default: str) -> str:
    return (os.environ.get(variable) or default).rstrip("/")


def connectome_sources() -> dict[str, ConnectomeSource]:
    """The fetchable connectomes by name, with environment overrides applied.

    ``LACUNA_DATAVERSE_URL`` replaces ``dataverse_server`` of GSP1000 and
    ``LACUNA_HCP1065_URL`` the ``download_url`` of HCP1065 (the Figshare API base,
    ``LACUNA_FIGSHARE_API_URL``, has no field and is read by the Figshare client).
    """
    return {
        "gsp1000": ConnectomeSource(
            name="gsp1000",
            display_name="GSP1000 Functional Connectome",
            description=(
                "Resting-state fMRI of 1000 healthy young adults of the Brain Genomics "
                "Superstruct Project (GSP), preprocessed for lesion network mapping; converted "
                "to HDF5 batch files on the FSL MNI152 2 mm grid. Needs a Harvard Dataverse API "
                "token with access to the dataset."
            ),
            type="functional",
            source_type="dataverse",
            space="MNI152NLin6Asym",
            n_subjects=1000,
            estimated_size_gb=200.0,
            citation=(
                "Yeo BTT et al. (2011) J Neurophysiol 106:1125-1165; Holmes AJ et al. (2015) "
                "Brain Genomics Superstruct Project initial data release. Sci Data 2:150031; "
                "Cohen A et al. (2020) GSP1000 preprocessed connectome, Harvard Dataverse, "
                "doi:10.7910/DVN/ILXIKS"
            ),
            default_batches=10,
            requires_mask=True,
            persistent_id="doi:10.7910/DVN/ILXIKS",
            dataverse_server=_env_url(DATAVERSE_URL_ENV, DEFAULT_DATAVERSE_SERVER),
        ),
        "dtor985": ConnectomeSource(
            name="dtor985",
            display_name="dTOR985 Structural Connectome",
            description=(
                "Normative whole-brain tractogram of 985 healthy subjects (diffusion MRI, "
                "Toronto/HCP), as one TrackVis file converted to MRtrix3 .tck. Published in "
                "MNI152NLin2009bAsym; Lacuna registers it as MNI152NLin2009cAsym, treating the "
                "2009b and 2009c releases of the ICBM 2009 nonlinear asymmetric template as "
                "aligned."
            ),
            type="structural",
            source_type="figshare",
            space="MNI152NLin2009bAsym",
            n_subjects=985,
            estimated_size_gb=11.0,
            citation=(
                "Elias GJB et al. (2024) A large normative connectome for exploring the "
                "tractographic correlates of focal brain interventions. Sci Data 11:353, "
                "doi:10.1038/s41597-024-03197-0 (figshare article 25209947; space "
                "MNI152NLin2009bAsym, used as MNI152NLin2009cAsym)"
            ),
            article_id=25209947,
        ),
        "hcp1065": ConnectomeSource(
            name="hcp1065",
            display_name="HCP1065 Structural Connectome",
            description=(
                "Population-averaged tractography atlas of 1065 Human Connectome Project "
                "subjects: the per-tract TrackVis files (cranial nerves excluded) merged into "
                "one MRtrix3 .tck. Space MNI152NLin2009aAsym, used as MNI152NLin2009cAsym. "
                "License CC BY-SA 4.0."
            ),
            type="structural",
            source_type="github",
            space="MNI152NLin2009aAsym",
            n_subjects=1065,
            estimated_size_gb=1.5,
            citation=(
                "Yeh FC (2022) Population-based tract-to-region connectome of the human brain "
                "and its hierarchical topology. Nat Commun 13:4933, "
                "doi:10.1038/s41467-022-32595-4; Yeh FC et al. (2018) NeuroImage 178:57-68"
            ),
            download_url=_env_url(HCP1065_URL_ENV, DEFAULT_HCP1065_URL),
        ),
    }


def get_source(name: str) -> ConnectomeSource:
    """The catalogue entry ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        If no fetchable connectome has that name (the message lists them).
    """
    sources = connectome_sources()
    key = str(name).lower()
    if key not in sources:
        raise ValueError(f"unknown connectome {name!r}; fetchable connectomes: {', '.join(sources)}")
    return sources[key]


def default_output_dir(name: str) -> Path:
    """``<data dir>/connectomes/<name>``: where ``lacuna fetch`` puts a connectome."""
    from lacuna.core.datadir import get_data_dir

    return get_data_dir() / "connectomes" / str(name).lower()


# --------------------------------------------------------------------------------------
# Remote files and JSON APIs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file offered by a download source.

    Attributes
    ----------
    name : str
        File name (checked by :func:`safe_filename`).
    url : str
        Download address.
    size : int, optional
        Size in bytes, when listed.
    md5 : str, optional
        Hexadecimal MD5, when listed.
    file_id : str, optional
        The source's identifier of the file.
    """

    name: str
    url: str
    size: int | None = None
    md5: str | None = None
    file_id: str | None = None


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f]")


def download_remote(
    remote: RemoteFile,
    dest: str | Path,
    *,
    headers: Mapping[str, str],
    auth_help: str,
    verify: bool = True,
    progress=None,
) -> Path:
    """Download a listed file with the shared retry policy, checking its listed size and
    MD5 when ``verify``; errors name the file, and a refused key says how to get one."""
    try:
        return download_file(
            remote.url,
            dest,
            headers=headers,
            expected_md5=remote.md5 if verify else None,
            expected_size=remote.size if verify else None,
            retries=RETRIES,
            backoff=RETRY_BACKOFF_SECONDS,
            timeout=TIMEOUT_SECONDS,
            progress=progress,
        )
    except AuthenticationError as exc:
        raise AuthenticationError(f"{exc} {auth_help}") from None
    except DownloadError as exc:
        raise DownloadError(f"{remote.name}: {exc}") from None


def safe_filename(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no folders, no ``..``), else raise.

    Raises
    ------
    DownloadError
        For a name that would leave the download folder.
    """
    text = str(name or "")
    if not text or text in (".", "..") or _UNSAFE_NAME.search(text):
        raise DownloadError(f"{where} lists a file with an unusable name {text!r}; refusing to download it")
    return text


def request_json(url: str, *, headers: Mapping[str, str] | None = None, params=None, auth_help: str = "") -> Any:
    """GET a JSON document, retrying connection errors, time-outs, 429 and 5xx.

    Parameters
    ----------
    url : str
        Address of the API call.
    headers : mapping, optional
        Request headers (API keys); their values never appear in messages.
    params : mapping, optional
        Query parameters.
    auth_help : str
        Sentence appended to authentication errors: how to get a valid key.

    Raises
    ------
    AuthenticationError
        On HTTP 401/403.
    DownloadError
        On 404 or another client error, an invalid JSON body, or after the retries.
    """
    shown = redact_url(url)
    last = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            delay = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.warning("request to %s failed (%s); retrying in %g s", shown, last, delay)
            time.sleep(delay)
        try:
            response = requests.get(url, headers=dict(headers or {}), params=params, timeout=TIMEOUT_SECONDS)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last = type(exc).__name__
            continue
        except requests.RequestException as exc:
            raise DownloadError(f"cannot reach {shown}: {type(exc).__name__}") from None
        status = response.status_code
        if status in (401, 403):
            raise AuthenticationError(
                f"the server refused the credentials for {shown} (HTTP {status}). {auth_help}".strip()
            )
        if status == 404:
            raise DownloadError(f"{shown} was not found on the server (HTTP 404); check the address and identifier.")
        if status >= 500 or status == 429:
            last = f"HTTP {status}"
            continue
        if status != 200:
            raise DownloadError(f"the server answered HTTP {status} for {shown}; check the address.")
        try:
            return response.json()
        except ValueError:
            raise DownloadError(f"{shown} did not answer with JSON; is it the right server?") from None
    raise DownloadError(
        f"could not reach {shown} after {RETRIES + 1} attempts (last error: {last}). Check the "
        "network connection and try again."
    )


# --------------------------------------------------------------------------------------
# Step markers and disk space
# --------------------------------------------------------------------------------------

MARKER_DIR = ".lacuna_fetch"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class StepMarkers:
    """Marker files of completed fetch steps in ``<output_dir>/.lacuna_fetch/``.

    Each marker is a small JSON file written atomically once its step is complete
    (``download_<file>``: downloaded and verified; ``extract_<file>``; ``downloaded``;
    ``converted``; ``registered``), holding what the step was done with, so a re-run
    skips exactly the steps whose inputs are unchanged.
    """

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir) / MARKER_DIR

    def path(self, step: str) -> Path:
        """Marker file of ``step``."""
        return self.folder / f"{_SLUG.sub('_', step)}.json"

    def read(self, step: str) -> dict | None:
        """Recorded information of a completed step, or None."""
        path = self.path(step)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def done(self, step: str, **expected: Any) -> bool:
        """Whether ``step`` completed with the ``expected`` recorded values."""
        info = self.read(step)
        return info is not None and all(info.get(key) == value for key, value in expected.items())

    def mark(self, step: str, **info: Any) -> None:
        """Record ``step`` as completed (atomically)."""
        write_json(self.path(step), {"step": step, "completed": utc_now(), **info})

    def remove(self, step: str) -> None:
        """Forget one step."""
        self.path(step).unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every step (``force``)."""
        if self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                path.unlink()


class InsufficientDiskSpaceError(DownloadError):
    """Raised before a download when the target file system has too little free space."""


def format_bytes(n: float | None) -> str:
    """``n`` bytes as a short human-readable size (``1.5 GB``)."""
    if n is None:
        return "unknown size"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(folder: Path, needed_bytes: float, what: str) -> None:
    """Raise :class:`InsufficientDiskSpaceError` unless ``folder`` has ``needed_bytes``
    free (``shutil.disk_usage``)."""
    if needed_bytes <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise InsufficientDiskSpaceError(
            f"not enough free disk space in {folder}: {what} needs about "
            f"{format_bytes(math.ceil(needed_bytes))}, but only {format_bytes(free)} is free. "
            "Free some space, or fetch into another folder (--output-dir, or LACUNA_DATA_DIR "
            "for the whole data cache)."
        )
