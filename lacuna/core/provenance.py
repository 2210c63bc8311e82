"""Provenance: what was done to a subject, with which software, parameters and inputs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from lacuna._version import __version__
from lacuna.core.atomic import write_json
from lacuna.core.datadir import get_data_dir

_HASH_BLOCK = 1 << 20


def utc_now() -> str:
    """Current time as an ISO 8601 UTC timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    if size < PERSISTED_DIGEST_BYTES:
        return _sha256_of(path)
    store = get_data_dir() / _DIGESTS_FILE
    key = f"{path}\t{size}\t{mtime_ns}"
    known = _persisted_digests(str(store)).get(key)
    if known is None:
        known = _sha256_of(path)
        _persist_digest(store, key, known)
    return known


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


#: Files at least this large have their SHA-256 kept in the data directory
#: (``checksums.json``, by path, size and modification time), so a tractogram or atlas
#: is hashed once, not at every run (200 MB take 0.3 s).
PERSISTED_DIGEST_BYTES = 16 * 1024**2
_DIGESTS_FILE = "checksums.json"
_DIGESTS_KEPT = 10_000


@lru_cache(maxsize=4)
def _persisted_digests(store: str) -> dict[str, str]:
    try:
        stored = json.loads(Path(store).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _persist_digest(store: Path, key: str, digest: str) -> None:
    """Add a digest to the store (best effort: a read-only or shared data directory
    only means hashing again next time; concurrent runs may drop each other's entry)."""
    digests = _persisted_digests(str(store))
    digests[key] = digest
    while len(digests) > _DIGESTS_KEPT:
        digests.pop(next(iter(digests)))
    try:
        write_json(store, digests, indent=None, durable=False)
    except OSError:
        pass


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, cached per (path, size, modification time)."""
    path = _absolute(path)
    return _sha256_with_stat(str(path), path.stat())


def _sha256_with_stat(path: str, stat: os.stat_result) -> str:
    key = (path, stat.st_size, stat.st_mtime_ns)
    return _WRITTEN_DIGESTS.get(key) or _sha256_cached(*key)


def read_input_bytes(path: str | Path) -> bytes:
    """The whole content of a small input file (a lesion mask), read in five system
    calls, its SHA-256 remembered for :func:`sha256_file` (provenance then need not
    read the file again).

    Masks are read on a thread beside the main thread's start-up; every system call
    hands the GIL over and may wait up to a switch interval to get it back, so the
    fewer, the sooner the masks are read.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        stat = os.fstat(descriptor)
        pieces = []
        while piece := os.read(descriptor, max(stat.st_size, 1 << 16)):  # the file, then its end
            pieces.append(piece)
    finally:
        os.close(descriptor)
    content = b"".join(pieces)
    if len(content) == stat.st_size and stat.st_size < PERSISTED_DIGEST_BYTES:
        _remember((str(_absolute(path)), stat.st_size, stat.st_mtime_ns), hashlib.sha256(content).hexdigest())
    return content


def resolved_path(path: str | Path) -> Path:
    """``Path(path).resolve()``, with the resolution of every folder kept
    (:func:`forget_resolved_folders` clears it; a run does at its start): a file whose
    folder was seen costs one system call, not one per path component."""
    if ".." in Path(path).parts:
        return Path(os.path.realpath(path))
    return Path(_resolved(os.path.abspath(path)))


def _resolved(absolute: str) -> str:
    if os.path.islink(absolute):
        return os.path.realpath(absolute)
    folder, name = os.path.split(absolute)
    return os.path.join(_resolved_folder(folder), name) if name else absolute


@lru_cache(maxsize=4096)
def _resolved_folder(folder: str) -> str:
    return _resolved(folder)


def forget_resolved_folders() -> None:
    """Forget the folders :func:`resolved_path` resolved (their links may have changed)."""
    _resolved_folder.cache_clear()


def _absolute(path: str | Path) -> Path:
    """The cache key's path: absolute, without following links (``Path.resolve`` costs
    one system call per path component, for every output file)."""
    return Path(os.path.abspath(path))


#: Digests of files this process wrote from memory or read whole, by (path, size,
#: modification time).
_WRITTEN_DIGESTS: dict[tuple[str, int, int], str] = {}
_WRITTEN_DIGESTS_MAX = 100_000


def remember_sha256(path: str | Path, data: bytes) -> str:
    """Record the SHA-256 of ``data`` just written to ``path`` (so that
    :func:`sha256_file` need not read the file back); returns it."""
    digest = hashlib.sha256(data).hexdigest()
    path = _absolute(path)
    stat = path.stat()
    _remember((str(path), stat.st_size, stat.st_mtime_ns), digest)
    return digest


def _remember(key: tuple[str, int, int], digest: str) -> None:
    if len(_WRITTEN_DIGESTS) >= _WRITTEN_DIGESTS_MAX:
        _WRITTEN_DIGESTS.clear()
    _WRITTEN_DIGESTS[key] = digest


#: Files larger than this are identified by size and modification time instead of a
#: SHA-256 (hashing a 100 GB connectome for every run would take minutes).
MAX_HASHED_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class InputFile:
    """A file a step read, identified by path and checksum.

    ``sha256`` is None for files over :data:`MAX_HASHED_BYTES`; ``size_bytes`` and
    ``modified`` identify them instead.
    """

    role: str
    path: str
    sha256: str | None
    size_bytes: int = 0
    modified: str = ""

    @classmethod
    def from_path(cls, role: str, path: str | Path) -> "InputFile":
        """Describe ``path`` (hashing its content unless it is very large)."""
        path = resolved_path(path)
        stat = path.stat()
        digest = _sha256_with_stat(str(path), stat) if stat.st_size <= MAX_HASHED_BYTES else None
        modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds")
        return cls(role=role, path=str(path), sha256=digest, size_bytes=stat.st_size, modified=modified)


#: Distributions whose versions provenance records.
_RECORDED_PACKAGES = ("nibabel", "numpy", "scipy", "pandas", "h5py")


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of Lacuna, Python and the numerical libraries it relies on (read from
    the installed distributions' metadata, so nothing is imported for it)."""
    versions = {"lacuna": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for package in _RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass
class ProvenanceStep:
    """One processing step applied to a subject.

    Attributes
    ----------
    name : str
        Step name, e.g. ``"load"`` or an analysis class name.
    kind : str
        ``"input"``, ``"transform"`` or ``"analysis"``.
    parameters : dict
        Parameters of the step (JSON-serialisable; never secrets).
    inputs : list of InputFile
        Files read by the step, with checksums.
    started, finished : str
        ISO 8601 UTC timestamps.
    notes : list of str
        Warnings or remarks (e.g. resampling applied).
    """

    name: str
    kind: str
    parameters: dict = field(default_factory=dict)
    inputs: list[InputFile] = field(default_factory=list)
    started: str = field(default_factory=utc_now)
    finished: str = ""
    notes: list[str] = field(default_factory=list)
    lacuna_version: str = __version__

    def finish(self) -> "ProvenanceStep":
        """Stamp the end time and return the step."""
        self.finished = utc_now()
        return self

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return asdict(self)
