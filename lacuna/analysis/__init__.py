"""Analyses: each configured once and run on many lesions."""

from lacuna._lazy import lazy_exports

__all__ = [
    "Analysis",
    "BatchAnalysis",
    "FunctionalNetworkMapping",
    "ParcelAggregation",
    "RegionalDamage",
    "StructuralNetworkMapping",
]

# Imported on first use: functional mapping alone loads the compiled kernels (numba).
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Analysis": "lacuna.analysis.base",
        "BatchAnalysis": "lacuna.analysis.base",
        "FunctionalNetworkMapping": "lacuna.analysis.functional.network_mapping",
        "ParcelAggregation": "lacuna.analysis.regional.aggregation",
        "RegionalDamage": "lacuna.analysis.regional.damage",
        "StructuralNetworkMapping": "lacuna.analysis.structural.network_mapping",
    },
)
