"""GitHub release assets: public files, downloaded with redirects followed.

The HCP1065 tract atlas is a zip of TrackVis files attached to a release of
``frankyeh/data-atlas``; ``LACUNA_HCP1065_URL`` points elsewhere (a mirror, a test
server). Release downloads redirect to a storage host; the size is taken from a ``HEAD``
request when the server gives one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lacuna.core import settings
from lacuna.core.errors import DownloadError
from lacuna.net.download import download_file
from lacuna.net.http import content_length, fetch_policy, redact_url
from lacuna.resources.fetching.remote import RemoteFile, safe_filename


def hcp1065_url(url: str | None = None) -> str:
    """The HCP1065 zip: ``url``, else ``$LACUNA_HCP1065_URL``, else the public asset."""
    return url or settings.hcp1065_url()


def release_asset(url: str, default_name: str) -> RemoteFile:
    """A :class:`RemoteFile` for a release asset: name from the URL path, size from a
    ``HEAD`` request (None when the server does not say)."""
    name = unquote(Path(urlsplit(url).path).name) or default_name
    name = safe_filename(name, redact_url(url))
    return RemoteFile(name=name, url=url, size=content_length(url))


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
    policy = fetch_policy()
    try:
        return download_file(
            remote.url,
            dest,
            expected_md5=remote.md5,
            retries=policy.retries,
            backoff=policy.backoff,
            timeout=policy.timeout,
            progress=progress,
        )
    except DownloadError as exc:
        raise type(exc)(f"{remote.name}: {exc}") from exc
