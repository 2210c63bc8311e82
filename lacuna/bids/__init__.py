"""BIDS: input datasets (layout, sidecars, mask discovery), derivative names, the
derivatives written per mask and per group, their validation and integrity checks.

Sits above :mod:`lacuna.analysis` (it writes analysis results) and below
:mod:`lacuna.workflows`; see ARCHITECTURE.md.
"""
