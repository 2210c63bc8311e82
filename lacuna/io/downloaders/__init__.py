"""Kept for the documented path :mod:`lacuna.io.downloaders.base`; the downloaders
themselves are in :mod:`lacuna.resources.fetching`."""

from lacuna.io.downloaders.base import ConnectomeSource, FetchConfig, FetchProgress, FetchResult

__all__ = ["ConnectomeSource", "FetchConfig", "FetchProgress", "FetchResult"]
