"""Files offered by a download source, and downloading one under the shared policy."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacuna.core.errors import AuthenticationError, DownloadError
from lacuna.net.download import download_file
from lacuna.net.http import fetch_policy


@dataclass(frozen=True)
class RemoteFile:
    """One file offered by a download source.

    Attributes
    ----------
    name : str
        File name (checked by :func:`safe_filename`).
    url : str
        Download address.
    size : int, optional
        Size in bytes, when listed.
    md5 : str, optional
        Hexadecimal MD5, when listed.
    file_id : str, optional
        The source's identifier of the file.
    """

    name: str
    url: str
    size: int | None = None
    md5: str | None = None
    file_id: str | None = None


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f]")


def download_remote(
    remote: RemoteFile,
    dest: str | Path,
    *,
    headers: Mapping[str, str],
    auth_help: str,
    verify: bool = True,
    progress=None,
) -> Path:
    """Download a listed file with the shared retry policy, checking its listed size and
    MD5 when ``verify``; errors name the file, and a refused key says how to get one."""
    policy = fetch_policy()
    try:
        return download_file(
            remote.url,
            dest,
            headers=headers,
            expected_md5=remote.md5 if verify else None,
            expected_size=remote.size if verify else None,
            retries=policy.retries,
            backoff=policy.backoff,
            timeout=policy.timeout,
            progress=progress,
        )
    except AuthenticationError as exc:
        raise AuthenticationError(f"{exc} {auth_help}") from exc
    except DownloadError as exc:
        raise DownloadError(f"{remote.name}: {exc}") from exc


def safe_filename(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no folders, no ``..``), else raise.

    Raises
    ------
    DownloadError
        For a name that would leave the download folder.
    """
    text = str(name or "")
    if not text or text in (".", "..") or _UNSAFE_NAME.search(text):
        raise DownloadError(f"{where} lists a file with an unusable name {text!r}; refusing to download it")
    return text
