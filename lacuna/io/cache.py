"""Where Lacuna keeps downloaded data, and writing files there safely.

The data directory holds downloaded atlases (``atlases/``), the registry of user
parcellations (``parcellations.json``) and, later, connectomes. It is chosen by, in
order: ``$LACUNA_DATA_DIR``, ``$XDG_CACHE_HOME/lacuna``, ``~/.cache/lacuna``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def get_data_dir() -> Path:
    """The directory Lacuna stores downloaded data in (absolute; not created here).

    Returns
    -------
    Path
        ``$LACUNA_DATA_DIR`` when set, else ``$XDG_CACHE_HOME/lacuna``, else
        ``~/.cache/lacuna``.
    """
    explicit = os.environ.get("LACUNA_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "lacuna").resolve()
    return (Path.home() / ".cache" / "lacuna").resolve()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    The bytes go to a hidden temporary file (``.<name>.<random>.tmp``) in the same
    directory, are flushed to disk, and the file is renamed over ``path``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))
