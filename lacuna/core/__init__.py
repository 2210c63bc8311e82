"""Core data types of Lacuna: subjects, results, provenance, spaces and errors."""

from lacuna.core.errors import (
    AnalysisError,
    AuthenticationError,
    BidsError,
    DownloadError,
    LacunaError,
    ParcellationError,
    ProcessingError,
    SpaceError,
    ValidationError,
)
from lacuna._lazy import lazy_exports

__all__ = [
    "AnalysisError",
    "AuthenticationError",
    "BidsError",
    "ConnectivityMatrix",
    "DownloadError",
    "LacunaError",
    "ParcelData",
    "ParcellationError",
    "ProcessingError",
    "ScalarMetric",
    "SpaceError",
    "SubjectData",
    "ValidationError",
    "VoxelMap",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **{name: "lacuna.core.results" for name in ("ConnectivityMatrix", "ParcelData", "ScalarMetric", "VoxelMap")},
        "SubjectData": "lacuna.core.subject",
    },
)
