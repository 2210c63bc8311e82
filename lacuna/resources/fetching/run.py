"""One fetch run: its folder and lock, step markers, progress reports, timers, and the
download and registration steps every pipeline shares.

Layout of an output folder (default ``<data dir>/connectomes/<name>``)::

    downloads/      downloaded files (GSP1000 tarballs are deleted once unpacked)
    raw/            GSP1000: the unpacked sub-*/func/ images
    tracts/         HCP1065: the unpacked .trk files
    batches/        GSP1000: the HDF5 batch files (registered)
    dTOR985.tck     dTOR985 / HCP1065.tck: the tractogram (registered)
    .lacuna_fetch/  one marker file per completed step
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lacuna.core.errors import DownloadError, LacunaError, ProcessingError
from lacuna.core.locks import file_lock
from lacuna.net.disk import format_bytes
from lacuna.net.download import md5_file
from lacuna.net.steps import MARKER_DIR, StepMarkers
from lacuna.resources import connectomes as registry
from lacuna.resources.fetching.records import FetchProgress, FetchResult
from lacuna.resources.fetching.remote import RemoteFile
from lacuna.resources.fetching.sources import DEFAULT_REGISTER_NAMES, ConnectomeSource

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


def products(source: ConnectomeSource, folder: Path) -> list[Path]:
    """The registered outputs of ``source`` in ``folder``: batch files or the tractogram."""
    if source.type == "functional":
        return sorted((folder / BATCHES).glob("*.h5"))
    tractogram = folder / TRACTOGRAM_FILES[source.name]
    return [tractogram] if tractogram.is_file() else []


def registered(name: str) -> registry.RegisteredConnectome | None:
    """The connectome registered as ``name``, or None (also for an unreadable registry)."""
    try:
        return {c.name: c for c in registry.list_connectomes()}.get(name)
    except registry.ConnectomeError:
        return None


def default_register_name(source: ConnectomeSource) -> str:
    """The name ``source`` is registered under by default (``GSP1000``)."""
    return DEFAULT_REGISTER_NAMES[source.name]


class FetchRun:
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
def exclusive(output_dir: Path) -> Iterator[None]:
    """Hold a lock on ``output_dir`` so two fetches never write the same folder."""
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(output_dir / MARKER_DIR / "lock", wait=False))
        except BlockingIOError as exc:
            raise DownloadError(
                f"another fetch is writing to {output_dir}; wait for it to finish, or fetch "
                "into another folder"
            ) from exc
        yield


def check_register_name(register: bool, name: str) -> None:
    """Refuse a registration name that cannot become part of BIDS file names."""
    if register and (not isinstance(name, str) or not _REGISTER_NAME.match(name)):
        raise ValueError(
            f"invalid register_name {name!r}: use letters and digits only (e.g. GSP1000), "
            "because the name becomes part of BIDS file names"
        )


def download_step(run: FetchRun, fetch, remote: RemoteFile, *, verify: bool, index: int, total: int) -> Path:
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
            raise DownloadError(f"writing {dest} failed ({exc}); check the disk and try again") from exc
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


def _local_md5_matches(run: FetchRun, dest: Path, remote: RemoteFile) -> bool:
    """Verify a file downloaded earlier without verification (``skip_checksum``)."""
    run.report("download", f"verifying {remote.name}", current_file=remote.name)
    return md5_file(dest).lower() == str(remote.md5).lower()


def register_step(run: FetchRun, name: str, path: Path, register_fn: Callable[[], object]) -> str | None:
    """Register ``path`` as ``name``; keep another registration of that name unless
    ``force`` (with a warning). Returns the name registered, or None."""
    run.report("registration", f"registering {name}", done=0, total=1)
    existing = registered(name)
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


def space_factor(source: ConnectomeSource) -> float:
    """Disk space needed per listed byte of ``source`` (:data:`SPACE_FACTOR`)."""
    return SPACE_FACTOR.get(source.name, 2.0)


def discard(run: FetchRun, paths: list[Path]) -> None:
    """``keep_original=False``: delete original downloads / unpacked files."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        log.info("deleted %s (keep_original=False)", path)
