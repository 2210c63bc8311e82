"""Workflows: the participant and group levels and the demo, orchestrating BIDS input,
analyses and derivatives for one run (:class:`~lacuna.workflows.config.RunConfig`).

Sits below :mod:`lacuna.cli` only; see ARCHITECTURE.md.
"""
