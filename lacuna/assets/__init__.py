"""Assets Lacuna works with: parcellations (and, later, connectomes)."""

from lacuna.assets.parcellations import (
    CATALOGUE,
    CatalogueEntry,
    Parcellation,
    ParcellationImage,
    ParcellationInfo,
    clear_parcellation_cache,
    fetch_parcellation,
    get_parcellation,
    list_parcellations,
    read_labels,
    read_parcellation,
    register_parcellation,
    registered_parcellations,
    scan_atlas_dir,
    unregister_parcellation,
)

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "Parcellation",
    "ParcellationImage",
    "ParcellationInfo",
    "clear_parcellation_cache",
    "fetch_parcellation",
    "get_parcellation",
    "list_parcellations",
    "read_labels",
    "read_parcellation",
    "register_parcellation",
    "registered_parcellations",
    "scan_atlas_dir",
    "unregister_parcellation",
]
