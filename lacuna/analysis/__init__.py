"""Analyses: each configured once and run on many lesions."""

from lacuna.analysis.base import Analysis
from lacuna.analysis.parcel_aggregation import ParcelAggregation
from lacuna.analysis.regional_damage import RegionalDamage

__all__ = ["Analysis", "ParcelAggregation", "RegionalDamage"]
