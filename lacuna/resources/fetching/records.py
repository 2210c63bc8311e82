"""The records of the fetch API: what the user asked for (:class:`FetchConfig`), what a
``progress_callback`` receives (:class:`FetchProgress`) and what a fetch returns
(:class:`FetchResult`). API keys never enter a ``repr``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lacuna.net.credentials import SERVICE_OF_SOURCE, resolve_api_key
from lacuna.resources.fetching.sources import SOURCE_NAMES, default_output_dir

Phase = Literal["download", "processing", "registration"]


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
