"""The dataclasses of the fetch API, at their documented path.

They live in :mod:`lacuna.resources.fetching.sources` (:class:`ConnectomeSource`) and
:mod:`lacuna.resources.fetching.records` (:class:`FetchConfig`, :class:`FetchProgress`,
:class:`FetchResult`).
"""

from lacuna.resources.fetching.records import FetchConfig, FetchProgress, FetchResult
from lacuna.resources.fetching.sources import ConnectomeSource

__all__ = ["ConnectomeSource", "FetchConfig", "FetchProgress", "FetchResult"]
