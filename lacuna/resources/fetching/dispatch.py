"""Fetching by name (:func:`fetch_connectome`) or from a :class:`FetchConfig`
(:func:`fetch_from_config`, what ``lacuna fetch`` calls)."""

from __future__ import annotations

import logging
from pathlib import Path

from lacuna.resources.fetching.gsp1000 import fetch_gsp1000
from lacuna.resources.fetching.records import FetchConfig, FetchResult
from lacuna.resources.fetching.run import DOWNLOADS
from lacuna.resources.fetching.sources import get_source
from lacuna.resources.fetching.tractograms import fetch_dtor985, fetch_hcp1065

log = logging.getLogger(__name__)


def fetch_connectome(name: str, output_dir: str | Path, **kwargs) -> FetchResult:
    """Generic fetch function that dispatches to specific connectome fetchers.

    Parameters
    ----------
    name : str
        Connectome name ('gsp1000', 'dtor985', 'hcp1065'; case-insensitive).
    output_dir : str or Path
        Directory for output files.
    **kwargs
        Additional arguments passed to the specific fetch function.

    Returns
    -------
    FetchResult
        Result from the specific fetch operation.

    Raises
    ------
    ValueError
        If the connectome name is not recognized.

    Examples
    --------
    >>> from lacuna.io import fetch_connectome
    >>> result = fetch_connectome("gsp1000", "/data", api_key="key", batches=50)
    """
    fetchers = {"gsp1000": fetch_gsp1000, "dtor985": fetch_dtor985, "hcp1065": fetch_hcp1065}
    key = str(name).lower()
    if key not in fetchers:
        raise ValueError(f"unknown connectome {name!r}; fetchable connectomes: {', '.join(fetchers)}")
    return fetchers[key](output_dir, **kwargs)


def fetch_from_config(config: FetchConfig, **extra) -> FetchResult:
    """Run the fetch a :class:`FetchConfig` describes (what ``lacuna fetch`` calls).

    Only the settings that apply to the source are passed on (``api_key`` to GSP1000
    and dTOR985, ``batches`` to GSP1000, ``keep_original`` to the tractograms);
    ``resume=False`` deletes partial downloads first.

    Parameters
    ----------
    config : FetchConfig
    **extra
        Further arguments of the fetch function (``test_mode``, ``skip_checksum``,
        ``progress_callback``, ``verbose``).

    Returns
    -------
    FetchResult
    """
    source = get_source(config.connectome)
    kwargs: dict = {"register": config.register, "force": config.force}
    if config.register_name:
        kwargs["register_name"] = config.register_name
    if source.source_type in ("dataverse", "figshare"):
        kwargs["api_key"] = config.api_key
    if source.type == "functional":
        kwargs["batches"] = config.batches
    else:
        kwargs["keep_original"] = config.keep_original
    if not config.resume:
        for part in (Path(config.output_dir) / DOWNLOADS).glob("*.part"):
            log.info("resume=False: deleting the partial download %s", part)
            part.unlink()
    return fetch_connectome(source.name, config.output_dir, **kwargs, **extra)
