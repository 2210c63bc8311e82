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
