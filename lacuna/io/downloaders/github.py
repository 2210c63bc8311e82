"""GitHub release assets: public files, downloaded with redirects followed.

The HCP1065 tract atlas is a zip of TrackVis files attached to a release of
``frankyeh/data-atlas``; ``LACUNA_HCP1065_URL`` points elsewhere (a mirror, a test
server). Release downloads redirect to a storage host; the size is taken from a ``HEAD``
request when the server gives one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from lacuna.core.errors import DownloadError
from lacuna.io.download import download_file, redact_url
from lacuna.io.downloaders import base
from lacuna.io.downloaders.base import RemoteFile, safe_filename

log = logging.getLogger(__name__)


def hcp1065_url(url: str | None = None) -> str:
    """The HCP1065 zip: ``url``, else ``$LACUNA_HCP1065_URL``, else the public asset."""
    return url or os.environ.get(base.HCP1065_URL_ENV) or base.DEFAULT_HCP1065_URL


def release_asset(url: str, default_name: str) -> RemoteFile:
    """A :class:`RemoteFile` for a release asset: name from the URL path, size from a
    ``HEAD`` request (None when the server does not say)."""
    name = unquote(Path(urlsplit(url).path).name) or default_name
    name = safe_filename(name, redact_url(url))
    return RemoteFile(name=name, url=url, size=remote_size(url))


def remote_size(url: str) -> int | None:
    """``Content-Length`` of ``url`` after redirects, or None (errors are not fatal)."""
    try:
        response = requests.head(url, allow_redirects=True, timeout=base.TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        log.debug("HEAD %s failed (%s)", redact_url(url), type(exc).__name__)
        return None
    length = response.headers.get("Content-Length", "")
    if response.status_code == 200 and length.isdigit() and int(length) > 0:
        return int(length)
    return None


def download_release_asset(
    remote: RemoteFile,
    dest: str | Path,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download a public asset to ``dest`` (resuming, retrying; MD5 checked when known).

    The size from ``HEAD`` is not enforced (it only feeds the disk-space check).

    Raises
    ------
    DownloadError
        On 404 or another client error, a size mismatch, or when the retries are
        exhausted.
    """
    try:
        return download_file(
            remote.url,
            dest,
            expected_md5=remote.md5,
            retries=base.RETRIES,
            backoff=base.RETRY_BACKOFF_SECONDS,
            timeout=base.TIMEOUT_SECONDS,
            progress=progress,
        )
    except DownloadError as exc:
        raise type(exc)(f"{remote.name}: {exc}") from None
