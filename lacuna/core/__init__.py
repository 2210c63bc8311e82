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
from lacuna.core.results import ConnectivityMatrix, ParcelData, ScalarMetric, VoxelMap
from lacuna.core.subject import SubjectData

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
