"""Write files so that a crash never leaves a complete-looking partial file.

Content goes to a hidden temporary file beside the target (same folder, same
extension, so format-sniffing writers like nibabel work), which is then renamed over
the target in one ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import threading
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
    stem, ext = _split_extension(path.name)
    temporary = path.with_name(f".{stem}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}{ext}")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half
    (``durable``: see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_bytes(data)
    return path


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


def write_json(path: str | Path, data, indent: int | None = 2, durable: bool = True) -> Path:
    """Write ``data`` as JSON atomically (NaN becomes null; ``durable``: see
    :func:`atomic_path`); returns the path."""
    path = Path(path)
    text = json.dumps(_json_safe(data), indent=indent or None, sort_keys=False, default=str)
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
    return path


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left in ``folder`` by a killed run; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TEMP_MARKER in p.name]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
