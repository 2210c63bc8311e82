"""Where Lacuna keeps downloaded data.

The data directory holds downloaded atlases (``atlases/``), the registries of user
parcellations and connectomes, transforms and indexes. It is chosen by, in order:
``$LACUNA_DATA_DIR``, ``$XDG_CACHE_HOME/lacuna``, ``~/.cache/lacuna``
(:mod:`lacuna.core.settings`).
"""

from __future__ import annotations

from pathlib import Path

from lacuna.core import settings


def get_data_dir() -> Path:
    """The directory Lacuna stores downloaded data in (absolute; not created here).

    Returns
    -------
    Path
        ``$LACUNA_DATA_DIR`` when set, else ``$XDG_CACHE_HOME/lacuna``, else
        ``~/.cache/lacuna``.
    """
    explicit = settings.data_dir_override()
    if explicit is not None:
        return explicit.expanduser().resolve()
    xdg = settings.xdg_cache_home()
    if xdg is not None:
        return (xdg.expanduser() / "lacuna").resolve()
    return (Path.home() / ".cache" / "lacuna").resolve()


#: Read-only folders searched after the data directory (``os.pathsep``-separated), e.g.
#: the atlases and transforms baked into a container image while ``LACUNA_DATA_DIR``
#: points at a mounted connectome cache.
DATA_PATH_ENV = settings.DATA_PATH


def data_search_dirs() -> list[Path]:
    """The data directory, then the folders of ``$LACUNA_DATA_PATH`` (in order)."""
    return [get_data_dir(), *settings.data_path()]


def find_data_file(relative: str | Path) -> Path | None:
    """The first existing ``<folder>/<relative>`` over :func:`data_search_dirs`."""
    for folder in data_search_dirs():
        path = folder / relative
        if path.is_file():
            return path
    return None
