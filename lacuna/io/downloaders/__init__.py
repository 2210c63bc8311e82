"""Download sources of the fetchable connectomes (Dataverse, Figshare, GitHub releases).

The dataclasses of the fetch API (:class:`ConnectomeSource`, :class:`FetchConfig`,
:class:`FetchProgress`, :class:`FetchResult`) live in :mod:`.base`; the clients in
:mod:`.dataverse`, :mod:`.figshare` and :mod:`.github`; safe archive extraction in
:mod:`.archives`; the API-key file in :mod:`.credentials`. The pipelines that use them
are in :mod:`lacuna.io.fetch`.
"""

from lacuna.io.downloaders.base import (
    ConnectomeSource,
    FetchConfig,
    FetchProgress,
    FetchResult,
    InsufficientDiskSpaceError,
    RemoteFile,
    connectome_sources,
    get_source,
)

__all__ = [
    "ConnectomeSource",
    "FetchConfig",
    "FetchProgress",
    "FetchResult",
    "InsufficientDiskSpaceError",
    "RemoteFile",
    "connectome_sources",
    "get_source",
]
