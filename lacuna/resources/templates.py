"""TemplateFlow transforms between the MNI spaces, fetched into the data cache.

``tpl-<B>_from-<A>_mode-image_xfm.h5`` is an ITK composite transform (HDF5) that
resamples an image of space A onto a grid of space B: ITK transforms map points of the
reference (B) into the moving image (A), in LPS millimetres. Files are downloaded on
first use from ``$LACUNA_TEMPLATEFLOW_URL`` (default TemplateFlow's public store; also a
local folder or a ``file://`` URL), laid out as the store: ``<base>/tpl-<B>/<file>``,
into ``<data dir>/templateflow/tpl-<B>/``. Files already on ``LACUNA_DATA_PATH`` or in
TemplateFlow's own cache (``$TEMPLATEFLOW_HOME/tpl-<B>/``) are used as they are.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache
from pathlib import Path

from lacuna.core import settings
from lacuna.core.datadir import find_data_file, get_data_dir
from lacuna.core.errors import DownloadError, SpaceError
from lacuna.core.locks import file_lock
from lacuna.core.spaces import canonical_space

log = logging.getLogger(__name__)

TEMPLATEFLOW_URL_ENV = settings.TEMPLATEFLOW_URL
TEMPLATEFLOW_HOME_ENV = settings.TEMPLATEFLOW_HOME  # TemplateFlow's own cache


def transform_file_name(source: str, target: str) -> str:
    """TemplateFlow name of the transform resampling ``source`` images onto ``target``."""
    return f"tpl-{target}_from-{source}_mode-image_xfm.h5"


def transform_path(source: str, target: str) -> Path:
    """The cached transform file from ``source`` to ``target``, fetched if missing.

    Raises
    ------
    SpaceError
        If either space is unsupported, or both are the same.
    DownloadError
        If the file cannot be downloaded or is not a readable ITK transform.
    """
    source, target = canonical_space(source), canonical_space(target)
    if source == target:
        raise SpaceError(f"no transform needed from {source} to itself")
    name = transform_file_name(source, target)
    relative = Path("templateflow", f"tpl-{target}", name)
    found = find_data_file(relative) or _in_templateflow_home(target, name)
    if found is not None:
        return found
    # The HTTP stack (requests, 60 ms to import) loads only when something is downloaded.
    from lacuna.net.download import SMALL_FILE_BACKOFF, SMALL_FILE_RETRIES, download_file
    from lacuna.net.http import redact_url

    path = get_data_dir() / relative
    url = f"{settings.templateflow_url()}/tpl-{target}/{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / ".download.lock"):
        if not path.is_file():
            log.info("downloading the %s -> %s transform from %s", source, target, redact_url(url))
            download_file(url, path, retries=SMALL_FILE_RETRIES, backoff=SMALL_FILE_BACKOFF)
            try:
                load_transform(path)
            except Exception as exc:
                path.unlink(missing_ok=True)
                raise DownloadError(
                    f"{redact_url(url)} is not a readable ITK transform ({exc}); it was deleted. "
                    f"Set {TEMPLATEFLOW_URL_ENV} to a TemplateFlow mirror, or place {name} in {path.parent}"
                ) from exc
    return path


def _in_templateflow_home(template: str, name: str) -> Path | None:
    """The file in TemplateFlow's own cache (``$TEMPLATEFLOW_HOME/tpl-<template>/``),
    used as it is, when there."""
    home = settings.templateflow_home()
    if home is None:
        return None
    path = home / f"tpl-{template}" / name
    return path if path.is_file() else None


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int):
    import nitransforms as nt

    # fmt="itk": nitransforms >= 25 would otherwise read .h5 files as X5 (pitfall 14).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Reference space not set")
        return nt.manip.load(path, fmt="itk")


def load_transform(path: str | Path):
    """The ITK composite transform in ``path`` as a nitransforms chain (cached)."""
    path = Path(path)
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)
