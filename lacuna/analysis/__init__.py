"""Analyses: each configured once and run on many lesions."""

from lacuna.analysis.base import Analysis, BatchAnalysis
from lacuna.analysis.functional_network_mapping import FunctionalNetworkMapping
from lacuna.analysis.parcel_aggregation import ParcelAggregation
from lacuna.analysis.regional_damage import RegionalDamage
from lacuna.analysis.structural_network_mapping import StructuralNetworkMapping

__all__ = [
    "Analysis",
    "BatchAnalysis",
    "FunctionalNetworkMapping",
    "ParcelAggregation",
    "RegionalDamage",
    "StructuralNetworkMapping",
]
