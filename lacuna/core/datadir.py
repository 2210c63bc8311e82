"""Where Lacuna keeps downloaded data, and writing files there safely.

The data directory holds downloaded atlases (``atlases/``), the registry of user
parcellations (``parcellations.json``) and, later, connectomes. It is chosen by, in
order: ``$LACUNA_DATA_DIR``, ``$XDG_CACHE_HOME/lacuna``, ``~/.cache/lacuna``.
"""

from __future__ import annotations

import os
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


#: Read-only folders searched after the data directory (``os.pathsep``-separated), e.g.
#: the atlases and transforms baked into a container image while ``LACUNA_DATA_DIR``
#: points at a mounted connectome cache.
DATA_PATH_ENV = "LACUNA_DATA_PATH"


def data_search_dirs() -> list[Path]:
    """The data directory, then the folders of ``$LACUNA_DATA_PATH`` (in order)."""
    extra = [Path(p).expanduser() for p in os.environ.get(DATA_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return [get_data_dir(), *extra]


def find_data_file(relative: str | Path) -> Path | None:
    """The first existing ``<folder>/<relative>`` over :func:`data_search_dirs`."""
    for folder in data_search_dirs():
        path = folder / relative
        if path.is_file():
            return path
    return None
