"""Write files so that a crash never leaves a complete-looking partial file.

Content goes to a hidden temporary file beside the target (same folder, same
extension, so format-sniffing writers like nibabel work), which is then renamed over
the target in one ``os.replace``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_EXTENSIONS = (".nii.gz", ".nii", ".tsv", ".json", ".csv", ".txt", ".h5")
TEMP_MARKER = ".tmp-"


def _split_extension(name: str) -> tuple[str, str]:
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    ``durable`` also flushes the content to the disk before the rename, so that even a
    power failure never leaves the new name with incomplete content. Outputs that a
    later, durable file lists with their checksums (a mask's derivatives, whose
    provenance file comes last) skip it: a flush costs a few milliseconds per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(_temporary_for(path))
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _temporary_for(path: Path) -> str:
    folder, name = os.path.split(os.fspath(path))
    stem, ext = _split_extension(name)
    return os.path.join(folder, f".{stem}{TEMP_MARKER}{owner_tag()}-{threading.get_ident()}{ext}")


#: Flags of a temporary opened for writing (no inheritance by child processes).
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` (any bytes-like object) to ``path`` so that readers see the old or
    the new file, never half (``durable``: see :func:`atomic_path`).

    A mask's outputs are thousands of small files written by threads that share the
    GIL, and every system call hands the GIL over and waits to get it back. So the file
    is written through its descriptor (open, write, close, rename: Python's buffered
    ``open`` adds four calls), and the folder is created only when the first attempt
    finds it missing.
    """
    path = Path(path)
    temporary = _temporary_for(path)
    try:
        try:
            descriptor = os.open(temporary, _WRITE_FLAGS, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(temporary, _WRITE_FLAGS, 0o666)
        try:
            _write_all(descriptor, data)
            if durable:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _write_all(descriptor: int, data) -> None:
    """``os.write`` until every byte is written (a write may stop short, e.g. after a
    signal)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(descriptor, view) :]


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_safe(value):
    """Replace NaN/inf (invalid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def json_bytes(data, indent: int | None = 2) -> bytes:
    """``data`` as the UTF-8 bytes of a JSON file (NaN and infinities become null)."""
    try:  # most data has no NaN: encode it without walking it first
        text = json.dumps(data, indent=indent or None, allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(_json_safe(data), indent=indent or None, default=str)
    return (text + "\n").encode("utf-8")


def write_json(path: str | Path, data, indent: int | None = 2, durable: bool = True) -> Path:
    """Write ``data`` as JSON atomically (NaN becomes null; ``durable``: see
    :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, json_bytes(data, indent), durable=durable)


#: Temporaries of another machine (shared file system) older than this are stale.
FOREIGN_TEMPORARY_AGE_S = 7 * 24 * 3600
_OWNER = re.compile(re.escape(TEMP_MARKER) + r"(?P<host>[0-9a-f]{8})(?P<pid>\d+)-")


@functools.cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """Who owns a temporary file: this machine (a hash of its name) and process id."""
    return f"{_host_tag()}{_process_id()}"


@functools.cache
def _process_id() -> int:
    """This process' id, asked once (a system call each time; a forked child asks again)."""
    return os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_process_id.cache_clear)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but is not reaped yet (Linux; False elsewhere). A
    killed run's orphaned workers stay so for as long as the process that adopts them
    does not wait for them (a container's first process often never does); they write
    nothing any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] == "Z"


def is_stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary whose writer is gone: a process of this machine
    that no longer runs, a temporary of another machine older than
    :data:`FOREIGN_TEMPORARY_AGE_S`, or one of an older Lacuna (no owner in its name)
    older than a day. A live run's temporaries are never stale."""
    match = _OWNER.search(path.name)
    if match and match["host"] == _host_tag():
        return not _process_alive(int(match["pid"]))
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return age > (FOREIGN_TEMPORARY_AGE_S if match else 24 * 3600)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left in ``folder`` by runs that were killed; returns how many.

    Only temporaries of dead writers go (:func:`is_stale_temporary`): two runs on the
    same output folder never delete each other's files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TEMP_MARKER in p.name and is_stale_temporary(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
