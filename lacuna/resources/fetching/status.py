"""What can be fetched (:func:`list_fetchable_connectomes`) and what has been
(:func:`get_fetch_status`)."""

from __future__ import annotations

from pathlib import Path

from lacuna.net.steps import MARKER_DIR, StepMarkers
from lacuna.resources.fetching.run import default_register_name, products, registered
from lacuna.resources.fetching.sources import ConnectomeSource, connectome_sources, default_output_dir, get_source


def list_fetchable_connectomes() -> list[ConnectomeSource]:
    """List all connectomes available for fetching.

    Returns
    -------
    list of ConnectomeSource
        Available connectome sources with metadata (server overrides of the
        environment applied).

    Examples
    --------
    >>> from lacuna.io import list_fetchable_connectomes
    >>> for source in list_fetchable_connectomes():
    ...     print(f"{source.name}: {source.display_name}")
    """
    return list(connectome_sources().values())


def get_fetch_status(name: str) -> dict:
    """Get the current status of a connectome (downloaded, processed, registered).

    Looks in the folder of its registration (under the default name, e.g. GSP1000) and
    in the default folder ``<data dir>/connectomes/<name>``.

    Parameters
    ----------
    name : str
        Connectome name ('gsp1000', 'dtor985', 'hcp1065'; case-insensitive).

    Returns
    -------
    dict
        ``downloaded``, ``processed``, ``registered`` (bool), ``location`` (Path of the
        output folder, or None) and ``size_bytes`` (int, or None without a folder).

    Raises
    ------
    ValueError
        If the name is not a fetchable connectome.
    """
    source = get_source(name)
    folders = _candidate_folders(source)
    folder = next((f for f in folders if (f / MARKER_DIR).is_dir()), None)
    folder = folder or next((f for f in folders if f.is_dir()), None)
    markers = StepMarkers(folder) if folder else None
    recorded = (markers.read("registered") or {}) if markers else {}
    entry = registered(recorded.get("name") or default_register_name(source))
    processed = bool(markers and markers.read("converted") and products(source, folder))
    return {
        "downloaded": bool(markers and (markers.read("downloaded") or processed)),
        "processed": processed,
        "registered": entry is not None and entry.path.exists(),
        "location": folder,
        "size_bytes": _folder_size(folder) if folder else None,
    }


def _candidate_folders(source: ConnectomeSource) -> list[Path]:
    folders = []
    entry = registered(default_register_name(source))
    if entry is not None:
        folders.append(entry.path.parent)
    folders.append(default_output_dir(source.name))
    return folders


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
